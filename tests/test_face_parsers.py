"""networks.face_parsers: BiSeNet (face-parsing.PyTorch layout), the FaceParsing wrapper and load_face_parsing."""
import pytest
import torch
import torch.nn.functional as F

from networks.checkpoints import CheckpointError
from networks.face_parsers import (CELEBAMASK_CLASSES, IMAGENET_MEAN, IMAGENET_STD, SYNTHFACES_CLASSES, BiSeNet,
                                   FaceParsing, load_face_parsing)
from networks.synthfaces_nets import FaceParser, save_aux_net

pytestmark = pytest.mark.usefixtures("single_thread")

# Representative keys of zllrunning/face-parsing.PyTorch's BiSeNet(n_classes=19) state dict (model.py, resnet.py).
OFFICIAL_KEYS = {
    "cp.resnet.conv1.weight": (64, 3, 7, 7),
    "cp.resnet.bn1.running_mean": (64,),
    "cp.resnet.layer1.0.conv1.weight": (64, 64, 3, 3),
    "cp.resnet.layer2.0.downsample.0.weight": (128, 64, 1, 1),
    "cp.resnet.layer2.0.downsample.1.running_var": (128,),
    "cp.resnet.layer3.1.bn2.weight": (256,),
    "cp.resnet.layer4.0.downsample.0.weight": (512, 256, 1, 1),
    "cp.resnet.layer4.1.conv2.weight": (512, 512, 3, 3),
    "cp.resnet.layer4.1.bn2.num_batches_tracked": (),
    "cp.arm16.conv.conv.weight": (128, 256, 3, 3),
    "cp.arm16.conv.bn.bias": (128,),
    "cp.arm16.conv_atten.weight": (128, 128, 1, 1),
    "cp.arm16.bn_atten.running_mean": (128,),
    "cp.arm32.conv.conv.weight": (128, 512, 3, 3),
    "cp.conv_head32.conv.weight": (128, 128, 3, 3),
    "cp.conv_head16.bn.weight": (128,),
    "cp.conv_avg.conv.weight": (128, 512, 1, 1),
    "ffm.convblk.conv.weight": (256, 256, 1, 1),
    "ffm.conv1.weight": (64, 256, 1, 1),
    "ffm.conv2.weight": (256, 64, 1, 1),
    "conv_out.conv.conv.weight": (256, 256, 3, 3),
    "conv_out.conv_out.weight": (19, 256, 1, 1),
    "conv_out16.conv.conv.weight": (64, 128, 3, 3),
    "conv_out16.conv_out.weight": (19, 64, 1, 1),
    "conv_out32.conv.bn.running_var": (64,),
    "conv_out32.conv_out.weight": (19, 64, 1, 1),
}


def _randomise_bn(net, seed=0):
    """Non-trivial BatchNorm statistics/affines so eval-mode outputs depend on every buffer."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return net.eval()


@pytest.fixture(scope="module")
def bisenet():
    torch.manual_seed(0)
    return _randomise_bn(BiSeNet(19))


@pytest.fixture(scope="module")
def bisenet_file(bisenet, tmp_path_factory):
    """The random BiSeNet saved as a DataParallel-style {"state_dict": {"module." + key: tensor}} file."""
    path = tmp_path_factory.mktemp("bisenet") / "79999_iter.pth"
    torch.save({"state_dict": {"module." + k: v for k, v in bisenet.state_dict().items()}}, path)
    return path


def test_class_lists():
    assert len(CELEBAMASK_CLASSES) == 19
    assert CELEBAMASK_CLASSES[0] == "background" and CELEBAMASK_CLASSES[1] == "skin"
    assert CELEBAMASK_CLASSES.index("nose") == 10 and CELEBAMASK_CLASSES.index("u_lip") == 12
    assert CELEBAMASK_CLASSES.index("l_lip") == 13 and CELEBAMASK_CLASSES.index("hair") == 17
    assert CELEBAMASK_CLASSES[-1] == "hat"
    assert SYNTHFACES_CLASSES[:3] == ("background", "skin", "hair") and len(SYNTHFACES_CLASSES) == 12


def test_bisenet_state_dict_matches_official_layout(bisenet):
    own = {k: tuple(v.shape) for k, v in bisenet.state_dict().items()}
    for key, shape in OFFICIAL_KEYS.items():
        assert own.get(key) == shape, key
    assert len(own) == 191
    assert sum(p.numel() for p in bisenet.parameters()) == 13_300_416
    assert {k.split(".")[0] for k in own} == {"cp", "ffm", "conv_out", "conv_out16", "conv_out32"}
    # shape-preserving first blocks have no shortcut conv; no spatial path or classifier
    assert not any(k.startswith(("cp.resnet.layer1.0.downsample", "cp.resnet.fc", "sp.")) for k in own)


def test_resnet_trunk_is_torchvision_resnet18(bisenet):
    torchvision = pytest.importorskip("torchvision")
    ref = torchvision.models.resnet18(weights=None).eval()
    trunk = bisenet.cp.resnet
    ref_state = {k: v for k, v in ref.state_dict().items() if not k.startswith("fc.")}
    assert {k: tuple(v.shape) for k, v in trunk.state_dict().items()} == \
           {k: tuple(v.shape) for k, v in ref_state.items()}
    ref.load_state_dict({**ref.state_dict(), **trunk.state_dict()})
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        feat8, feat16, feat32 = trunk(x)
        h = ref.maxpool(ref.relu(ref.bn1(ref.conv1(x))))
        h8 = ref.layer2(ref.layer1(h))
        h16 = ref.layer3(h8)
        h32 = ref.layer4(h16)
    for got, want in ((feat8, h8), (feat16, h16), (feat32, h32)):
        torch.testing.assert_close(got, want)


def test_bisenet_output_at_input_size(bisenet):
    with torch.no_grad():
        out = bisenet(torch.randn(2, 3, 64, 96))
    assert out.shape == (2, 19, 64, 96) and torch.isfinite(out).all()


def test_bisenet_round_trip_with_module_prefix(bisenet, bisenet_file):
    parsing = load_face_parsing("bisenet", bisenet_file)
    assert isinstance(parsing, FaceParsing) and isinstance(parsing.net, BiSeNet)
    assert parsing.kind == "bisenet" and parsing.class_names == CELEBAMASK_CLASSES and parsing.input_size == 512
    assert not parsing.net.training and not any(p.requires_grad for p in parsing.parameters())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(parsing.net(x), bisenet(x))


def test_bisenet_raw_state_dict_without_num_batches_tracked(bisenet, tmp_path):
    path = tmp_path / "old.pth"
    torch.save({k: v for k, v in bisenet.state_dict().items() if not k.endswith("num_batches_tracked")}, path)
    parsing = load_face_parsing("bisenet", path, input_size=64)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(parsing.net(x), bisenet(x))


def test_face_parsing_bisenet_pipeline(bisenet):
    """[-1,1] -> [0,1] -> ImageNet normalisation -> input_size -> net -> back to the input size."""
    images = torch.rand(1, 3, 48, 40) * 2 - 1
    parsing = FaceParsing(bisenet, "bisenet", input_size=96)
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        x = F.interpolate(((images + 1) / 2 - mean) / std, size=(96, 96), mode="bilinear", align_corners=False)
        want = F.interpolate(bisenet(x), size=(48, 40), mode="bilinear", align_corners=False, antialias=True)
        got = parsing(images)
    torch.testing.assert_close(got, want)
    assert parsing.predict(images).shape == (1, 48, 40)
    parsing.train()
    assert not parsing.net.training


def test_face_parsing_bisenet_default_size(bisenet):
    parsing = FaceParsing(bisenet, "bisenet")
    with torch.no_grad():
        out = parsing(torch.rand(1, 3, 64, 64) * 2 - 1)
    assert out.shape == (1, 19, 64, 64) and torch.isfinite(out).all()


def test_synthfaces_parser(tmp_path):
    torch.manual_seed(0)
    net = FaceParser(resolution=32, widths=(4, 8)).eval()
    path = save_aux_net(tmp_path / "face_parser.pt", net)
    parsing = load_face_parsing("synthfaces", path)
    assert parsing.class_names == SYNTHFACES_CLASSES and parsing.num_classes == 12 and parsing.input_size == 32
    images = torch.rand(2, 3, 48, 48) * 2 - 1
    with torch.no_grad():
        out = parsing(images)
        assert out.shape == (2, 12, 48, 48)
        torch.testing.assert_close(out, net(images))


def test_wrong_file_names_path(tmp_path):
    net = FaceParser(resolution=32, widths=(4, 8))
    path = tmp_path / "not_bisenet.pth"
    torch.save(net.state_dict(), path)
    with pytest.raises(CheckpointError, match="not_bisenet.pth") as err:
        load_face_parsing("bisenet", path)
    assert "missing" in str(err.value) and "unexpected" in str(err.value)
    tensor_file = tmp_path / "tensor.pth"
    torch.save(torch.zeros(3), tensor_file)
    with pytest.raises(CheckpointError, match="tensor.pth.*not a BiSeNet checkpoint"):
        load_face_parsing("bisenet", tensor_file)
    with pytest.raises(CheckpointError, match="absent.pth"):
        load_face_parsing("bisenet", tmp_path / "absent.pth")


def test_unknown_kind_and_farl(tmp_path):
    with pytest.raises(ValueError, match="unknown kind 'segformer'.*synthfaces.*bisenet"):
        load_face_parsing("segformer", tmp_path / "x.pt")
    with pytest.raises(ValueError, match="RetinaFace.*bisenet.*synthfaces"):
        load_face_parsing("farl", tmp_path / "x.pt")


def test_wrapper_rejects_bad_inputs(bisenet):
    with pytest.raises(TypeError, match="BiSeNet"):
        FaceParsing(FaceParser(resolution=32, widths=(4, 8)), "bisenet")
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        FaceParsing(bisenet, "bisenet", input_size=64)(torch.zeros(1, 1, 64, 64))
