"""The frozen networks of the real-face recipe reproduce their official implementations.

Vectors in ``tests/data/compat/`` (how each was made: ``tests/data/compat/README.md``):

* ``bisenet_faceparsing_64px.pt`` — face-parsing.PyTorch ``BiSeNet(19)`` logits, through ``load_face_parsing``
  from a ``79999_iter.pth``;
* ``arcface_irse50_idloss.pt`` — e4e's ``IDLoss`` (``model_ir_se50.pth`` in ``Backbone(112, 50, 'ir_se')``,
  crop [35:223, 32:220] of 256 px images, pooled to 112), through ``IDLoss(weights=...)``;
* ``lpips_{alex,vgg}_tv_64px.pt`` — the ``lpips`` package (v0.1 heads) on torchvision AlexNet / VGG16 features,
  through ``LPIPSLoss(backbone_weights=...)`` from a torchvision state dict.

Each test rebuilds the seeded weights, writes them the way the real file is laid out, loads them through the
loader a config path goes through (strict: every key, every shape) and compares the outputs.
"""
import hashlib
from pathlib import Path

import pytest
import torch

from lightning_modules.identity import IDLoss
from lightning_modules.perceptual import LPIPSLoss
from networks.face_parsers import BiSeNet, load_face_parsing
from networks.encoders import IRSEArcFace
from tests.helpers.compat_weights import load_vectors, state_dict_from_vectors

pytestmark = pytest.mark.usefixtures("single_thread")


def _case(vectors, name):
    return next(c for c in vectors["cases"] if c["name"] == name)


def _close(out, ref):
    """Float32 round-off: rtol 1e-4 and atol 1e-4 times the reference's largest magnitude (measured when the
    vectors were added: 2e-6 for BiSeNet logits of magnitude 4, exactly 0 for ArcFace and LPIPS)."""
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


def _spec_of(module):
    return [(k, list(v.shape)) for k, v in module.state_dict().items()]


# ------------------------------------------------------------------------------------------------ BiSeNet
@pytest.fixture(scope="module")
def bisenet_vectors():
    return load_vectors("bisenet_faceparsing_64px.pt")


def test_bisenet_spec_is_our_layout(bisenet_vectors):
    with torch.device("meta"):
        ours = BiSeNet(**bisenet_vectors["config"])
    assert sorted(_spec_of(ours)) == sorted(bisenet_vectors["spec"])


@torch.no_grad()
def test_bisenet_logits_match_face_parsing_pytorch(bisenet_vectors, tmp_path):
    path = tmp_path / "79999_iter.pth"
    torch.save(state_dict_from_vectors(bisenet_vectors), path)
    parser = load_face_parsing("bisenet", path, input_size=64)
    case = _case(bisenet_vectors, "parse")  # [-1, 1] images -> ImageNet normalisation -> main-head logits
    _close(parser(case["image"]), case["logits"])
    raw = _case(bisenet_vectors, "net_raw")  # the bare network, non-square (40 x 72: odd 1/16, 1/32 maps)
    _close(parser.net(raw["input"]), raw["logits"])


# ------------------------------------------------------------------------------------------------ ArcFace ID
@pytest.fixture(scope="module")
def arcface_vectors():
    return load_vectors("arcface_irse50_idloss.pt")


def test_arcface_spec_is_our_layout(arcface_vectors):
    cfg = arcface_vectors["config"]
    with torch.device("meta"):
        ours = IRSEArcFace(cfg["input_size"], cfg["num_layers"], cfg["mode"])
    assert sorted(_spec_of(ours)) == sorted(arcface_vectors["spec"])


@torch.no_grad()
def test_id_loss_matches_e4e(arcface_vectors, tmp_path):
    path = tmp_path / "model_ir_se50.pth"
    state = state_dict_from_vectors(arcface_vectors)
    torch.save(state, path)
    id_loss = IDLoss(weights=str(path))  # what model.identity.weights=PATH builds
    assert id_loss.metric_name == "id" and not id_loss.facenet.training
    ours = id_loss.facenet.state_dict()
    assert all(torch.equal(ours[k], v) for k, v in state.items())
    case = _case(arcface_vectors, "extract_feats")
    images = case["images_uint8"].float() / 127.5 - 1  # 256 px: e4e's crop [35:223, 32:220], pooled to 112
    _close(id_loss.embed(images), case["feats"])
    case = _case(arcface_vectors, "id_loss")  # e4e IDLoss(y_hat=images, y=images.flip(0), x=images)
    per_image = id_loss(images, images.flip(0))
    _close(per_image, 1 - case["diff_target"])
    _close(per_image.mean(), case["loss"])


# ------------------------------------------------------------------------------------------------ LPIPS
TORCHVISION_FILES = {"alex": "alexnet-owt-7be5be79.pth", "vgg": "vgg16-397923af.pth"}


@pytest.mark.parametrize("net", ["alex", "vgg"])
@torch.no_grad()
def test_lpips_matches_lpips_package_on_torchvision_backbone(net, tmp_path):
    import lpips

    vectors = load_vectors(f"lpips_{net}_tv_64px.pt")
    heads = Path(lpips.__file__).parent / "weights" / "v0.1" / f"{net}.pth"
    assert hashlib.sha256(heads.read_bytes()).hexdigest() == vectors["heads_sha256"], (
        f"the installed lpips ships other v0.1 {net} heads than the vectors were made with")
    path = tmp_path / TORCHVISION_FILES[net]
    state = state_dict_from_vectors(vectors)  # torchvision names: features.N.weight / features.N.bias
    torch.save(state, path)
    loss = LPIPSLoss(net=net, backbone_weights=str(path))
    assert loss.metric_name == "lpips"
    backbone = dict(loss.net.net.named_parameters())
    assert len(backbone) == len(state)  # every features entry loaded, none left random
    case = _case(vectors, "distance")
    _close(loss(case["x"], case["y"]), case["dist"])
    case = _case(vectors, "spatial")
    _close(loss.spatial_map(case["x"], case["y"]), case["map"])
