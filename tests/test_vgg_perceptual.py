"""The official stage-2 perceptual loss (lightning_modules.vgg_perceptual) against BasicSR's PerceptualLoss, and the
official stage-2 ID crop (lightning_modules.identity.face_crop "scaled").

``tests/data/compat/vgg19_perceptual_basicsr_64px.pt``: BasicSR's ``PerceptualLoss`` with the options of the official
training config on a seeded VGG19 (how it was made: ``tests/data/compat/README.md``).
"""
import pytest
import torch
import torch.nn.functional as F

from lightning_modules.identity import face_crop
from lightning_modules.vgg_perceptual import OFFICIAL_LAYER_WEIGHTS, VGGPerceptualLoss, gram_matrix
from tests.helpers.compat_weights import load_vectors, state_dict_from_vectors

pytestmark = pytest.mark.usefixtures("single_thread")
VECTORS = load_vectors("vgg19_perceptual_basicsr_64px.pt")


def test_matches_basicsr_perceptual_loss_with_the_official_options(tmp_path):
    assert VECTORS["config"]["layer_weights"] == OFFICIAL_LAYER_WEIGHTS
    path = tmp_path / "vgg19-dcbb9e9d.pth"
    torch.save(state_dict_from_vectors(VECTORS), path)  # the features.* part of torchvision's file
    loss = VGGPerceptualLoss(weights=str(path))
    assert loss.metric_name == "vgg"
    case = VECTORS["cases"][0]
    with torch.no_grad():
        perceptual, style = loss(case["x"], case["y"])
    torch.testing.assert_close(perceptual, case["perceptual"], rtol=1e-5, atol=0)
    torch.testing.assert_close(VECTORS["config"]["style_weight"] * style, case["style"], rtol=1e-5, atol=0)


def test_pre_relu_features_gradients_and_refusals(tmp_path):
    with pytest.raises(ValueError, match="model.vgg.weights=PATH"):
        VGGPerceptualLoss()
    with pytest.raises(ValueError, match="unknown VGG19 layers"):
        VGGPerceptualLoss(allow_random=True, layer_weights={"conv9_1": 1.0})
    with pytest.warns(UserWarning, match="vgg-random"):
        loss = VGGPerceptualLoss(allow_random=True, layer_weights={"conv1_2": 1.0})
    x = (torch.rand(1, 3, 32, 32) * 2 - 1).requires_grad_(True)
    feats = loss.extract(x)
    assert set(feats) == {"conv1_2"} and (feats["conv1_2"] < 0).any()  # before the ReLU
    perceptual, style = loss(x, torch.zeros_like(x))
    perceptual.backward()
    assert x.grad.abs().sum() > 0 and all(p.grad is None for p in loss.parameters())
    f = torch.randn(2, 4, 3, 5)
    torch.testing.assert_close(gram_matrix(f), torch.einsum("bchw,bdhw->bcd", f, f) / 60)
    (tmp_path / "bad.pth").write_bytes(b"")
    with pytest.raises(Exception, match="bad.pth"):
        VGGPerceptualLoss(weights=str(tmp_path / "bad.pth"))


def test_scaled_id_crop_is_the_official_stage2_crop():
    x = torch.rand(1, 3, 1024, 1024)
    torch.testing.assert_close(face_crop(x, "scaled"), F.adaptive_avg_pool2d(x[:, :, 140:-132, 128:-144], 112))
    small = torch.rand(1, 3, 64, 64)  # under 256 px: no crop, only the pooling
    torch.testing.assert_close(face_crop(small, "scaled"), F.adaptive_avg_pool2d(small, 112))
    with pytest.raises(ValueError, match="crop"):
        face_crop(x, "centre")
