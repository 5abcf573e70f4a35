"""DHR domain-specific segmentation (networks.refine.segmentation): superpixels, region statistics, masks."""
import pytest
import torch

from networks.refine.segmentation import (DHR_DEFAULT_THRESHOLD, DHR_OOD_CLASSES, DHR_THRESHOLDS,
                                          SEGMENTATION_SOURCES, align_mask_in_domain, combine_sources,
                                          error_superpixel_mask, region_class, region_mean, superpixels,
                                          threshold_map)

pytestmark = pytest.mark.usefixtures("single_thread")


def block_labels():
    """(2, 4, 6) labels: image 0 has regions 1, 2, 3 (vertical bands); image 1 has regions 1 and 5 (halves)."""
    a = torch.tensor([1, 1, 2, 2, 3, 3]).repeat(4, 1)
    b = torch.tensor([5, 5, 5, 1, 1, 1]).repeat(4, 1)
    return torch.stack([a, b])


# ------------------------------------------------------------------------------------------------ superpixels
def test_superpixels_start_at_one_cover_the_image_and_follow_colour_edges():
    torch.manual_seed(0)
    img = torch.full((2, 3, 48, 64), -0.8)
    img[0, :, :, 32:] = 0.8                              # image 0: dark left half, bright right half
    img[1] = torch.rand(3, 48, 64) * 2 - 1               # image 1: noise
    labels = superpixels(img, n_segments=12, compactness=30.0, sigma=1.0)
    assert labels.shape == (2, 48, 64) and labels.dtype == torch.long
    for b in range(2):
        present = torch.unique(labels[b])
        assert int(present.min()) == 1                   # pinned start_label=1: no unscored segment 0
        assert present.tolist() == list(range(1, int(present.max()) + 1))  # contiguous, every pixel labelled
        assert len(present) > 1
    left, right = set(labels[0, :, :32].unique().tolist()), set(labels[0, :, 32:].unique().tolist())
    assert not left & right                              # no superpixel crosses the colour edge


def test_superpixels_rejects_bad_shape():
    with pytest.raises(ValueError, match=r"superpixels: images must be a \(B, 3, H, W\)"):
        superpixels(torch.zeros(1, 1, 8, 8))


# ------------------------------------------------------------------------------------------------ regions
def test_region_mean_equals_python_reference():
    torch.manual_seed(0)
    labels = torch.randint(0, 7, (3, 9, 11))
    labels[1][labels[1] == 4] = 9                        # gaps in the label ids and an unused id
    values = torch.randn(3, 1, 9, 11)
    out = region_mean(values, labels)
    assert out.shape == (3, 1, 9, 11)
    ref = torch.empty_like(values)
    for b in range(3):
        for lab in labels[b].unique():
            sel = labels[b] == lab
            ref[b, 0][sel] = values[b, 0][sel].mean()
    torch.testing.assert_close(out, ref)


def test_region_mean_keeps_images_separate_and_is_differentiable():
    labels = block_labels()
    values = torch.zeros(2, 1, 4, 6, requires_grad=True)
    with torch.no_grad():
        values[0, 0, :, 2:4] = 1.0                       # region 2 of image 0 only
    out = region_mean(values, labels)
    assert out[1].abs().max() == 0                        # label 1 / 2 of image 1 are not image 0's
    assert torch.all(out[0, 0, :, 2:4] == 1) and torch.all(out[0, 0, :, :2] == 0)
    out.sum().backward()
    assert values.grad is not None and torch.isfinite(values.grad).all()


def test_region_class_sums_probabilities_per_region():
    labels = block_labels()
    probs = torch.zeros(2, 3, 4, 6)
    probs[:, 0] = 0.4                                    # class 0 is the per-pixel argmax nowhere below...
    probs[0, 1, :, :2] = 0.6                             # region 1 of image 0 -> class 1
    probs[0, 2, :, 2:4] = 0.5                            # region 2 of image 0 -> class 2
    probs[0, 2, 0, 4] = 0.9                              # region 3: one pixel of class 2, but sums favour 0
    probs[1, 1, 0, 3:] = 1.0                             # region 1 of image 1: 3 pixels of 1.0 vs 12 * 0.4 -> 0
    out = region_class(probs, labels)
    assert out.shape == (2, 4, 6) and out.dtype == torch.long
    assert torch.all(out[0, :, :2] == 1) and torch.all(out[0, :, 2:4] == 2) and torch.all(out[0, :, 4:] == 0)
    assert torch.all(out[1] == 0)
    # reference: argmax of summed probs per region, one region at a time
    for b in range(2):
        for lab in labels[b].unique():
            sel = labels[b] == lab
            assert torch.all(out[b][sel] == probs[b][:, sel].sum(1).argmax())


def test_threshold_map_by_class():
    classes = torch.tensor([[[0, 2, 5], [13, 14, 18]]])
    out = threshold_map(classes, DHR_THRESHOLDS, DHR_DEFAULT_THRESHOLD)
    assert out.shape == (1, 1, 2, 3) and out.dtype == torch.float32
    torch.testing.assert_close(out[0, 0], torch.tensor([[0.6, 0.7, 0.8], [0.8, 0.6, 0.6]]))
    # keys beyond the largest class present are fine; unknown classes get the default
    out = threshold_map(torch.tensor([[[0, 1]]]), {7: 0.1, 1: 0.3}, 0.9)
    torch.testing.assert_close(out[0, 0], torch.tensor([[0.9, 0.3]]))
    with pytest.raises(ValueError, match="threshold keys"):
        threshold_map(classes, {-1: 0.5}, 0.6)
    with pytest.raises(ValueError, match="classes must be"):
        threshold_map(classes.float(), {}, 0.6)


def test_dhr_tables_match_the_official_code():
    official = [0.6, 0.6, 0.7, 0.6] + [0.8] * 10 + [0.6] * 5  # FaRL CelebM order, dhr_infer.py score_thr
    assert [DHR_THRESHOLDS.get(c, DHR_DEFAULT_THRESHOLD) for c in range(19)] == official
    assert sorted(DHR_OOD_CLASSES) == [0, 3, 16, 17, 18]


# ------------------------------------------------------------------------------------------------ masks
def test_error_superpixel_mask_uses_class_thresholds_and_parsing():
    labels = block_labels()[:1]                          # regions 1 | 2 | 3 (two columns each)
    error = torch.zeros(1, 1, 4, 6)
    error[..., :2] = 0.65                                # region 1: face (tau 0.7) -> in domain
    error[..., 2:4] = 0.75                               # region 2: eye (tau 0.8) -> in domain
    error[..., 4:] = 0.65                                # region 3: hair (tau 0.6 default) -> OOD
    probs = torch.zeros(1, 19, 4, 6)
    probs[0, 2, :, :2] = 1.0
    probs[0, 8, :, 2:4] = 1.0
    probs[0, 14, :, 4:] = 1.0
    mask = error_superpixel_mask(error, labels, probs, DHR_THRESHOLDS, DHR_DEFAULT_THRESHOLD, DHR_OOD_CLASSES)
    assert mask.shape == (1, 1, 4, 6) and mask.dtype == torch.float32
    assert mask[0, 0].tolist() == [[1, 1, 1, 1, 0, 0]] * 4
    # a pixel whose OOD-class probability (hat + earring) reaches 0.5 is OOD even inside an in-domain region
    probs2 = probs.clone()
    probs2[0, 2, 1, 0], probs2[0, 16, 1, 0], probs2[0, 17, 1, 0] = 0.5, 0.25, 0.25
    mask2 = error_superpixel_mask(error, labels, probs2, DHR_THRESHOLDS, DHR_DEFAULT_THRESHOLD, DHR_OOD_CLASSES)
    assert mask2[0, 0, 1, 0] == 0 and mask2.sum() == mask.sum() - 1
    # without OOD classes only the scores decide
    mask3 = error_superpixel_mask(error, labels, probs2, DHR_THRESHOLDS, DHR_DEFAULT_THRESHOLD)
    torch.testing.assert_close(mask3, mask)


def test_error_superpixel_mask_without_parsing_uses_default_threshold():
    labels = block_labels()
    error = torch.zeros(2, 1, 4, 6)
    error[0, ..., :2] = 0.65                             # above 0.6 -> OOD without parsing
    error[0, ..., 2:4] = 0.55
    error[0, ..., 4] = 1.0                               # region 3 mean (1 + 0) / 2 = 0.5 -> in domain
    error[1, ..., :3] = 0.7                              # image 1: region 5 OOD, region 1 in domain
    mask = error_superpixel_mask(error, labels, None, DHR_THRESHOLDS, 0.6, DHR_OOD_CLASSES)
    assert mask[0, 0, 0].tolist() == [0, 0, 1, 1, 1, 1]
    assert mask[1, 0, 0].tolist() == [0, 0, 0, 1, 1, 1]


def test_error_superpixel_mask_shape_errors():
    labels = block_labels()
    with pytest.raises(ValueError, match="error_map must be"):
        error_superpixel_mask(torch.zeros(2, 3, 4, 6), labels, None, {}, 0.6)
    with pytest.raises(ValueError, match="labels .* do not match error_map"):
        error_superpixel_mask(torch.zeros(2, 1, 4, 5), labels, None, {}, 0.6)
    with pytest.raises(ValueError, match="parsing_probs .* do not match"):
        error_superpixel_mask(torch.zeros(2, 1, 4, 6), labels, torch.zeros(1, 19, 4, 6), {}, 0.6)
    with pytest.raises(ValueError, match="ood_classes"):
        error_superpixel_mask(torch.zeros(2, 1, 4, 6), labels, torch.zeros(2, 5, 4, 6), {}, 0.6, (0, 7))
    with pytest.raises(ValueError, match="integer"):
        region_mean(torch.zeros(2, 1, 4, 6), labels.float())
    with pytest.raises(ValueError, match=">= 0"):
        region_mean(torch.zeros(2, 1, 4, 6), labels - 2)


def test_align_mask_in_domain_flips_polarity():
    align = torch.tensor([0.0, 0.2, 0.5, 0.9, 1.0]).view(1, 1, 1, 5)
    assert align_mask_in_domain(align)[0, 0, 0].tolist() == [1, 1, 0, 0, 0]
    assert align_mask_in_domain(align, threshold=0.95)[0, 0, 0].tolist() == [1, 1, 1, 1, 0]
    with pytest.raises(ValueError, match="align_mask must be"):
        align_mask_in_domain(torch.zeros(1, 5))


def test_combine_sources_truth_table_and_errors():
    e = torch.tensor([0.0, 0.0, 1.0, 1.0]).view(1, 1, 1, 4)
    a = torch.tensor([0.0, 1.0, 0.0, 1.0]).view(1, 1, 1, 4)
    assert SEGMENTATION_SOURCES == ("error_superpixels", "align_mask", "both", "ground_truth")
    assert combine_sources("error_superpixels", error_in=e, align_in=a)[0, 0, 0].tolist() == [0, 0, 1, 1]
    assert combine_sources("align_mask", error_in=e, align_in=a)[0, 0, 0].tolist() == [0, 1, 0, 1]
    assert combine_sources("both", error_in=e, align_in=a)[0, 0, 0].tolist() == [0, 0, 0, 1]
    assert combine_sources("error_superpixels", error_in=e.bool()).dtype == torch.float32
    with pytest.raises(ValueError, match="needs align_in"):
        combine_sources("align_mask", error_in=e)
    with pytest.raises(ValueError, match="needs error_in"):
        combine_sources("error_superpixels", align_in=a)
    with pytest.raises(ValueError, match="needs error_in and align_in"):
        combine_sources("both")
    with pytest.raises(ValueError, match="needs align_in"):
        combine_sources("both", error_in=e)
    with pytest.raises(ValueError, match="unknown segmentation source 'parsing'.*error_superpixels, align_mask, both"):
        combine_sources("parsing", error_in=e, align_in=a)
    with pytest.raises(ValueError, match="same shape"):
        combine_sources("both", error_in=e, align_in=torch.zeros(1, 1, 2, 2))
    with pytest.raises(ValueError, match=r"align_in must be a \(B, 1, H, W\)"):
        combine_sources("align_mask", align_in=torch.zeros(1, 2, 2))
