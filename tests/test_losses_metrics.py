"""LPIPS (explicit backbone file or labelled random backbone), ID loss, image / mask metrics, MetricTable."""
import json
import math

import pytest
import torch

from lightning_modules.identity import IDLoss, face_crop
from lightning_modules.metrics import MetricTable, image_metrics, mask_metrics
from lightning_modules.perceptual import LPIPSLoss, torchvision_key_map
from networks.checkpoints import CheckpointError
from networks.encoders import IRSEArcFace

pytestmark = pytest.mark.usefixtures("single_thread")
random_backbone_ok = pytest.mark.filterwarnings("ignore:LPIPSLoss. no .*lpips-random:UserWarning")


def images(n=2, size=32, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_lpips_needs_a_backbone_file_or_an_explicit_opt_in(tmp_path):
    with pytest.raises(ValueError, match=r"model.lpips.backbone_weights=PATH.*allow_random_backbone=true"):
        LPIPSLoss()
    with pytest.raises(FileNotFoundError, match=r"nowhere.pth: no such file.*model.lpips.allow_random_backbone=true"):
        LPIPSLoss(backbone_weights=str(tmp_path / "nowhere.pth"))
    with pytest.raises(ValueError, match="net must be one of"):
        LPIPSLoss(net="squeeze", allow_random_backbone=True)
    with pytest.warns(UserWarning, match="lpips-random") as record:
        loss = LPIPSLoss(allow_random_backbone=True)
    assert len(record) == 1  # torchvision's `pretrained=` deprecation noise from lpips is filtered out
    assert loss.metric_name == "lpips-random"
    with pytest.warns(UserWarning, match="lpips-random"):
        again = LPIPSLoss(allow_random_backbone=True)  # seeded: the same random backbone every time
    x, y = images(), images(seed=1)
    torch.testing.assert_close(loss(x, y), again(x, y))


@random_backbone_ok
def test_lpips_values_gradients_and_mask():
    loss = LPIPSLoss(allow_random_backbone=True)
    x, y = images(), images(seed=1)
    assert loss(x, x).abs().max() < 1e-6 and (loss(x, y) > 0).all() and loss(x, y).shape == (2,)
    xg = x.clone().requires_grad_(True)
    loss(xg, y).sum().backward()
    assert xg.grad.abs().sum() > 0 and all(p.grad is None for p in loss.parameters())
    small = images(size=16)  # under 32 px: compared upsampled instead of failing inside AlexNet
    assert loss(small, images(size=16, seed=3)).shape == (2,)
    # masked: a change confined to the right half leaves the left-half distance much smaller
    z = x.clone()
    z[..., 16:] = y[..., 16:]
    left = torch.zeros(2, 1, 32, 32)
    left[..., :8] = 1
    assert (loss(x, z, mask=left) < 0.5 * loss(x, z, mask=1 - left)).all()
    # an all-ones mask gives the plain per-image distance (up to lpips' bilinear upsampling of each layer's map)
    torch.testing.assert_close(loss(x, z, mask=torch.ones(2, 1, 32, 32)), loss(x, z), rtol=2e-3, atol=1e-6)
    torch.testing.assert_close(loss(x, z, mask=left[:1]), loss(x, z, mask=left))  # one mask for the batch
    loss.train()  # stays in eval mode
    assert not loss.net.training
    with pytest.raises(ValueError, match=r"mask \(2, 3, 32, 32\) must be \(B, 1, H, W\)"):
        loss(x, z, mask=torch.ones(2, 3, 32, 32))
    with pytest.raises(ValueError, match="must both be"):
        loss(x, z[..., :16])


@random_backbone_ok
def test_lpips_loads_a_torchvision_backbone_file(tmp_path):
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(5)
    state = tv.models.alexnet().state_dict()
    path = tmp_path / "alexnet.pth"
    torch.save(state, path)
    loaded = LPIPSLoss(backbone_weights=str(path))
    assert loaded.metric_name == "lpips"
    torch.testing.assert_close(loaded.net.net.slice1[0].weight, state["features.0.weight"])
    torch.testing.assert_close(loaded.net.net.slice5._modules["10"].bias, state["features.10.bias"])
    x, y = images(), images(seed=1)
    assert not torch.allclose(loaded(x, y), LPIPSLoss(allow_random_backbone=True)(x, y))
    torch.save({"features.0.weight": state["features.0.weight"]}, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match="partial.pth is not a torchvision alex state dict: missing"):
        LPIPSLoss(backbone_weights=str(tmp_path / "partial.pth"))
    state["features.3.weight"] = state["features.3.weight"][:8]
    torch.save({"state_dict": state}, tmp_path / "wrong_shape.pth")  # a {"state_dict": ...} wrapper is read too
    with pytest.raises(ValueError, match=r"features.3.weight has shape \(8, 64, 5, 5\), expected \(192, 64, 5, 5\)"):
        LPIPSLoss(backbone_weights=str(tmp_path / "wrong_shape.pth"))


def test_lpips_loads_a_torchvision_vgg16_backbone_file(tmp_path):
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(6)
    # torchvision's VGG16 feature stack alone (the ImageNet file also holds classifier.* keys, which are ignored)
    features = tv.models.vgg.make_layers(tv.models.vgg.cfgs["D"])
    state = {f"features.{k}": v for k, v in features.state_dict().items()}
    state["classifier.0.bias"] = torch.zeros(4096)
    torch.save(state, tmp_path / "vgg16.pth")
    loss = LPIPSLoss(net="vgg", backbone_weights=str(tmp_path / "vgg16.pth"))
    assert loss.metric_name == "lpips" and loss.net_name == "vgg"
    torch.testing.assert_close(loss.net.net.slice5._modules["28"].weight, state["features.28.weight"])
    own = dict(loss.net.net.named_parameters())
    assert len(own) == 26 and all(torch.equal(own[n], state[k]) for n, k in torchvision_key_map(loss.net.net).items())
    x, y = images(), images(seed=1)
    assert loss(x, x).abs().max() < 1e-6 and (loss(x, y) > 0).all()


def test_id_loss_rules_and_values(tmp_path):
    with pytest.raises(ValueError, match=r"model.identity.weights=PATH.*model_ir_se50.pth.*allow_random=true"):
        IDLoss()
    with pytest.raises(FileNotFoundError, match=r"model.identity.weights=.*nowhere.pth: no such file"):
        IDLoss(weights=str(tmp_path / "nowhere.pth"), arcface=IRSEArcFace(112, 50, "ir_se", width=0.125, units=(1, 1, 1, 1)))

    def tiny(seed):
        torch.manual_seed(seed)
        return IRSEArcFace(112, 50, "ir_se", width=0.125, units=(1, 1, 1, 1))

    small = tiny(1)
    torch.save(small.state_dict(), tmp_path / "arc.pth")
    loss = IDLoss(weights=str(tmp_path / "arc.pth"), arcface=tiny(2))
    assert loss.metric_name == "id"
    x, y = images(size=64), images(size=64, seed=1)
    assert loss(x, x).abs().max() < 1e-5 and (loss(x, y) > 0).all() and (loss(x, y) <= 2).all()
    assert loss(x, y).shape == (2,)
    # the file's weights were loaded: the loss equals 1 - cos of the saved network's embeddings
    with torch.no_grad():
        e_x, e_y = small.eval()(face_crop(x)), small(face_crop(y))
    torch.testing.assert_close(loss(x, y), 1 - (e_x * e_y).sum(1), rtol=1e-4, atol=1e-5)
    with pytest.warns(UserWarning, match="id-random"):
        random = IDLoss(allow_random=True, arcface=tiny(2))
    assert not torch.allclose(random(x, y), loss(x, y))
    # gradients reach the images, not the frozen network
    xg = x.clone().requires_grad_(True)
    loss(xg, y).sum().backward()
    assert xg.grad.abs().sum() > 0 and all(p.grad is None for p in loss.parameters())
    loss.train()
    assert not loss.facenet.training
    assert face_crop(x).shape == (2, 3, 112, 112)
    # e4e's crop of a 256 image: rows 35:223, cols 32:220 (188 px) pooled to 112
    marker = torch.zeros(1, 3, 256, 256)
    marker[..., 35:223, 32:220] = 1
    assert face_crop(marker).min() == 1
    torch.save({"bogus": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match="bad.pth does not fit IRSEArcFace"):
        IDLoss(weights=str(tmp_path / "bad.pth"), arcface=IRSEArcFace(112, 50, "ir_se", width=0.125, units=(1, 1, 1, 1)))
    with pytest.warns(UserWarning, match="id-random"):
        assert IDLoss(allow_random=True, arcface=small).metric_name == "id-random"


def test_image_metrics_against_hand_values():
    target = torch.zeros(2, 3, 8, 8)  # 0.5 grey on [0, 1]
    pred = target.clone()
    pred[0] += 0.2  # +0.1 on [0, 1]: MSE 0.01, PSNR 20 dB
    m = image_metrics(pred, target)
    assert m["mse"][0] == pytest.approx(0.01, rel=1e-4) and m["psnr"][0] == pytest.approx(20.0, rel=1e-4)
    assert m["ssim"][1] == pytest.approx(1.0, abs=1e-5) and m["psnr"][1] > 100
    mask = torch.zeros(2, 1, 8, 8)
    mask[:, :, :4] = 1
    pred2 = target.clone()
    pred2[:, :, :4] += 0.4  # error only inside the mask: 0.2 on [0, 1] -> MSE 0.04
    m = image_metrics(pred2, target, mask)
    assert m["mse_in"][0] == pytest.approx(0.04, rel=1e-4) and m["mse_out"][0] == 0
    assert m["psnr_in"][0] == pytest.approx(10 * math.log10(25), rel=1e-4)
    assert m["mse"][0] == pytest.approx(0.02, rel=1e-4)
    # the in / out means recombine into the whole-image means (mask covers half the pixels)
    half = torch.zeros(2, 1, 16, 16)
    half[..., :8] = 1
    a, b = images(size=16), images(size=16, seed=1)
    m = image_metrics(a, b, half)
    torch.testing.assert_close((m["mse_in"] + m["mse_out"]) / 2, m["mse"])
    torch.testing.assert_close((m["ssim_in"] + m["ssim_out"]) / 2, m["ssim"])
    from torchmetrics.functional.image import structural_similarity_index_measure as ssim
    torch.testing.assert_close(m["ssim"], ssim((a + 1) / 2, (b + 1) / 2, data_range=1.0, reduction="none"))
    torch.testing.assert_close(m["psnr_in"], 10 * torch.log10(1 / m["mse_in"]))
    empty = image_metrics(pred2, target, torch.zeros(2, 1, 8, 8))
    assert torch.isnan(empty["mse_in"]).all() and torch.isnan(empty["ssim_in"]).all()
    with pytest.raises(ValueError, match="must be equal"):
        image_metrics(pred, target[:, :, :4])


def test_mask_metrics_on_known_masks():
    gt = torch.zeros(2, 1, 4, 4)
    gt[:, :, :2] = 1  # 8 pixels
    pred = torch.zeros(2, 1, 4, 4)
    pred[0, :, :1] = 0.9  # 4 of the 8, nothing extra
    pred[1] = 0.7  # everything
    m = mask_metrics(pred, gt, thresholds=(0.5, 0.8))
    assert m["iou@0.5"].tolist() == pytest.approx([0.5, 0.5])
    assert m["precision@0.5"].tolist() == pytest.approx([1.0, 0.5])
    assert m["recall@0.5"].tolist() == pytest.approx([0.5, 1.0])
    assert m["iou@0.8"][1] == 0  # nothing predicted at 0.8, 8 true pixels missed
    assert m["best_iou"][0] == pytest.approx(0.5) and m["best_threshold"][1] <= 0.7
    # a soft mask whose best cut is 0.3: IoU 1 there, below it at 0.5
    soft = gt * 0.4 + (1 - gt) * 0.1
    m = mask_metrics(soft[:1], gt[:1])
    assert m["iou@0.5"][0] == 0 and m["best_iou"][0] == 1 and 0.1 < m["best_threshold"][0] <= 0.4
    empty = mask_metrics(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 4))
    assert empty["iou@0.5"][0] == 1 and empty["precision@0.5"][0] == 1 and empty["recall@0.5"][0] == 1
    with pytest.raises(ValueError, match="must be equal"):
        mask_metrics(pred, gt[..., :2])


def test_metric_table_rows_means_and_files(tmp_path):
    table = MetricTable()
    table.add(["a", "b"], {"psnr": torch.tensor([20.0, 30.0]), "psnr_in": torch.tensor([float("nan"), 10.0])})
    table = table.merge(MetricTable([{"name": "c", "psnr": 40.0, "psnr_in": 20.0}]))
    assert [r["name"] for r in table.rows] == ["a", "b", "c"]
    assert table.mean() == {"psnr": pytest.approx(30.0), "psnr_in": pytest.approx(15.0)}
    lines = table.to_csv(tmp_path / "t.csv").read_text().splitlines()
    assert lines[0] == "name,psnr,psnr_in" and lines[1].startswith("a,20.0,")
    data = json.loads(table.to_json(tmp_path / "t.json").read_text())
    assert data["rows"][0]["psnr_in"] is None and data["mean"]["psnr"] == pytest.approx(30.0)
    with pytest.raises(ValueError, match="has 1 values for 2 names"):
        table.add(["x", "y"], {"psnr": torch.tensor([1.0])})


def test_inception_fid_needs_an_explicit_weights_file(tmp_path):
    from lightning_modules.fid import fid_score, inception_fid_metric

    with pytest.raises(FileNotFoundError, match="fid.inception_weights=None: Inception FID needs the weights file"):
        inception_fid_metric(None)
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        fid_score(images(4), images(4, seed=1), features=f"inception:{tmp_path / 'nowhere.pth'}")


def test_build_fid_extractor_kinds_and_errors(tmp_path, monkeypatch):
    import importlib.util

    from lightning_modules import fid
    from networks.synthfaces_nets import AttributeClassifier, SynthFacesFeatures

    with pytest.raises(ValueError, match=r"fid.kind='clip': unknown FID feature network.*'synthfaces', 'inception'"):
        fid.build_fid_extractor("clip")
    with pytest.raises(FileNotFoundError, match=r"eval.fid_weights=None: Inception FID needs the weights file "
                                                r"weights-inception-2015-12-05-6726825d.pth"):
        fid.build_fid_extractor("inception", None, key="eval.fid_weights")
    fake = tmp_path / "inception.pth"
    fake.write_bytes(b"0")
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "torch_fidelity" else real_find_spec(name, *a))
    with pytest.raises(ImportError, match="fid.weights: Inception FID needs torch-fidelity"):
        fid.build_fid_extractor("inception", fake)
    monkeypatch.undo()

    feats = fid.build_fid_extractor("synthfaces")  # the shipped attribute classifier
    assert isinstance(feats, SynthFacesFeatures) and isinstance(feats.classifier, AttributeClassifier)
    x = images(4, size=feats.classifier.resolution)
    out = feats((x + 1) / 2)
    assert out.shape == (4, feats.num_features)
    # a custom extractor drives fid_score: identical sets give ~0, different sets more
    same = fid.fid_score(x, x, feats)
    assert abs(same) < 1e-3 and fid.fid_score(x, images(4, size=x.shape[-1], seed=7), feats) > same


def test_style_distance_is_zero_for_equal_images_and_differentiable():
    from lightning_modules.perceptual import LPIPSLoss

    loss = LPIPSLoss(allow_random_backbone=True)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    y = (torch.rand(2, 3, 32, 32) * 2 - 1).requires_grad_(True)
    assert torch.allclose(loss.style_distance(x, x), torch.zeros(2))
    d = loss.style_distance(y, x)
    assert d.shape == (2,) and (d > 0).all()
    d.sum().backward()
    assert y.grad is not None and y.grad.abs().sum() > 0
