"""Generic OOD patches for stage-2 training: exact masks, probability, area, determinism."""
import pytest
import torch

from datamodules.ood_patches import paste_random_patches, random_patch_masks

pytestmark = pytest.mark.usefixtures("single_thread")


def test_mask_marks_exactly_the_changed_pixels():
    x = torch.zeros(16, 3, 64, 64)
    y, m = paste_random_patches(x, p=1.0, generator=torch.Generator().manual_seed(0))
    assert y.shape == x.shape and m.shape == (16, 1, 64, 64)
    assert set(m.unique().tolist()) <= {0.0, 1.0}
    changed = (y != x).any(dim=1, keepdim=True)
    assert torch.equal(y[~m.bool().expand_as(y)], x[~m.bool().expand_as(x)])  # outside the mask: untouched
    assert changed.float().sum() >= 0.9 * m.sum()  # inside: replaced (a noise value may equal 0 by chance)
    assert (m.sum(dim=(1, 2, 3)) > 0).all() and y.abs().max() <= 1


def test_probability_and_area_bounds():
    g = torch.Generator().manual_seed(1)
    _, none = paste_random_patches(torch.zeros(32, 3, 32, 32), p=0.0, generator=g)
    assert none.sum() == 0
    masks = random_patch_masks(400, 64, area=(0.05, 0.1), generator=g)
    area = masks.mean(dim=(1, 2, 3))
    assert area.max() <= 0.1 + 0.02  # clipped at the border, never above the bound (plus rasterisation)
    assert area.median() > 0.04
    with pytest.raises(ValueError, match="area"):
        random_patch_masks(1, 32, area=(0.2, 0.1))
    with pytest.raises(ValueError, match=r"\(B, 3, S, S\)"):
        paste_random_patches(torch.zeros(2, 1, 8, 8))


def test_same_generator_state_same_patches():
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    a = paste_random_patches(x, generator=torch.Generator().manual_seed(5))
    b = paste_random_patches(x, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
