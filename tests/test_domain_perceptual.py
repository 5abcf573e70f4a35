"""The domain perceptual distance ("lpips-synthfaces", networks.domain_perceptual) and its LPIPSLoss entry."""
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lightning_modules.perceptual import LPIPSLoss
from networks.domain_perceptual import FeatureLPIPS
from networks.synthfaces_nets import AttributeClassifier, save_aux_net

pytestmark = pytest.mark.usefixtures("single_thread")
SHIPPED = Path(__file__).resolve().parents[1] / "experiments" / "weights" / "synthfaces" / "attribute_classifier.pt"


def tiny_classifier(seed=0):
    torch.manual_seed(seed)
    net = AttributeClassifier(resolution=32, widths=(4, 6, 8), feature_dim=8).eval()
    with torch.no_grad():  # non-trivial batch-norm statistics
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return net


def reference_distance(net, x, y):
    """Written out: taps after each stage's stride-1 block, unit-normalised over channels, squared difference,
    channel mean, spatial mean, summed over the taps."""
    total = torch.zeros(x.shape[0], dtype=x.dtype)
    a, b = x, y
    for i, block in enumerate(net.body):
        a, b = block(a), block(b)
        if i % 2 == 0:
            na = a / (a.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            nb = b / (b.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            total = total + (na - nb).pow(2).mean(dim=(1, 2, 3))
    return total


def test_distance_equals_the_written_out_reference_in_float64():
    net = tiny_classifier().double()
    x = torch.rand(3, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    y = (x + 0.3 * torch.randn(x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))).clamp(-1, 1)
    d = FeatureLPIPS(net)(x, y).reshape(-1)
    torch.testing.assert_close(d, reference_distance(net, x, y), rtol=1e-12, atol=1e-14)
    assert [m.shape[-1] for m in FeatureLPIPS(net).layer_maps(x, y)] == [32, 16, 8]
    assert torch.equal(FeatureLPIPS(net)(x, x).reshape(-1), torch.zeros(3, dtype=torch.float64))


def test_lpips_loss_takes_the_domain_net_everywhere(tmp_path):
    path = save_aux_net(tmp_path / "classifier.pt", tiny_classifier())
    loss = LPIPSLoss(net="synthfaces", backbone_weights=str(path))
    assert loss.metric_name == "lpips-synthfaces" and loss.net_name == "synthfaces"
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    y = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1
    d = loss(x, y)
    assert d.shape == (2,) and (d > 0).all()
    ones = torch.ones(2, 1, 32, 32)
    torch.testing.assert_close(loss.masked_layer_distance(x, y, [ones])[0], d)   # a mask of ones = the distance
    torch.testing.assert_close(loss(x, y, mask=ones), loss.spatial_map(x, y).mean(dim=(1, 2, 3)))
    assert len(loss.layer_maps(x, y)) == 3 and loss.style_distance(x, y).shape == (2,)
    xg = x.clone().requires_grad_(True)
    loss(xg, y).sum().backward()
    assert xg.grad.abs().sum() > 0 and all(p.grad is None for p in loss.parameters())
    with pytest.raises(ValueError, match="model.lpips.backbone_weights=PATH"):
        LPIPSLoss(net="synthfaces", allow_random_backbone=True)
    with pytest.raises(FileNotFoundError, match="no such file"):
        LPIPSLoss(net="synthfaces", backbone_weights=str(tmp_path / "missing.pt"))


@pytest.mark.skipif(not SHIPPED.is_file(), reason="the shipped SynthFaces classifier")
def test_shipped_domain_distance_grows_with_blur_and_noise():
    """On rendered SynthFaces faces the distance to the image grows with the blur and with the noise."""
    from datamodules.synthfaces.render import render_batch

    loss = LPIPSLoss(net="synthfaces", backbone_weights=str(SHIPPED))
    g = torch.Generator().manual_seed(0)
    x = render_batch(3, 4, 64, return_float=True)["images"] * 2 - 1
    blur = [F.avg_pool2d(F.pad(x, (k // 2,) * 4, mode="replicate"), k, stride=1) for k in (3, 5, 9)]
    d_blur = torch.stack([loss(x, b) for b in blur])
    assert (d_blur[1:] > d_blur[:-1]).all()
    d_noise = torch.stack([loss(x, (x + s * torch.randn(x.shape, generator=g)).clamp(-1, 1)) for s in (0.05, 0.2)])
    assert (d_noise[1] > d_noise[0]).all()
