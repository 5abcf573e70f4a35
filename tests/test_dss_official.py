"""DHR's domain-specific segmentation against the official code (caopulan/GANInverter ``inference/dhr_infer.py``).

``tests/data/compat/dhr_dss_official.pt`` holds what the official DSS computed on CPU at 64 and 256 px (how it was
made: ``tests/data/compat/README.md``): the 8-bit image, the coarse image, the parsing probabilities, the per-layer
LPIPS-VGG maps handed to its pooling, its SLIC labels and its mask. Our official-mode DSS gives the same labels and
the same mask (0 differing pixels); the named variants are shown to depart from it.
"""
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from lightning_modules.perceptual import LPIPSLoss
from networks.refine.projection import project
from networks.refine.segmentation import (DHR_DEFAULT_THRESHOLD, DHR_OOD_CLASSES, DHR_THRESHOLDS, layer_region_scores,
                                          region_error, region_score_mask, slic_image, superpixels, upsampled_error)
from tests.helpers.compat_weights import state_dict_from_vectors

pytestmark = pytest.mark.usefixtures("single_thread")
ROOT = Path(__file__).resolve().parents[1]
VECTORS = ROOT / "tests" / "data" / "compat" / "dhr_dss_official.pt"
CASES = ("64px", "256px")


@pytest.fixture(scope="module")
def vectors():
    return torch.load(VECTORS, weights_only=True)


def unit(u8: torch.Tensor) -> torch.Tensor:
    """(3, H, W) uint8 -> (1, 3, H, W) in [-1, 1], as the official dataset transform (ToTensor, Normalize 0.5)."""
    return ((u8.float().div(255) - 0.5) / 0.5)[None]


def official_inputs(case):
    """Image, labels input, parsing probabilities (1, 19, H, W) and the maps the official pooling received."""
    image = unit(case["image_u8"])
    probs = F.interpolate(case["probs_low"][None], size=image.shape[-2:], mode="nearest")
    maps = [m * case["error_scale"] for m in case["lpips_maps"]]
    return image, probs, maps


def official_mode_mask(case, scoring="official_per_layer", slic_input="bgr_uint8"):
    image, probs, maps = official_inputs(case)
    assert (case["theta1"], case["theta2"], case["bg_threshold"]) == (0.7, 0.8, DHR_DEFAULT_THRESHOLD)
    labels = superpixels(image, n_segments=200, compactness=30.0, sigma=1.0, slic_input=slic_input)
    scores = region_error(maps, labels, scoring)
    mask = region_score_mask(scores, labels, probs, DHR_THRESHOLDS, DHR_DEFAULT_THRESHOLD, DHR_OOD_CLASSES)
    return mask[0, 0], labels[0]


# ------------------------------------------------------------------------------------------------ the reference
@pytest.mark.parametrize("name", CASES)
def test_official_dss_superpixels_and_mask_are_reproduced_exactly(vectors, name):
    case = vectors["cases"][name]
    mask, labels = official_mode_mask(case)
    assert torch.equal(labels, case["superpixels"].long())          # SLIC on BGR uint8: the same labels
    official = case["mask"].float()
    assert 0 < float(official.mean()) < 1                            # both kinds of pixels are present
    assert int((mask != official).sum()) == 0


def test_the_64px_case_has_superpixels_that_vanish_on_the_coarse_maps(vectors):
    case = vectors["cases"]["64px"]
    image, _, maps = official_inputs(case)
    labels = case["superpixels"].long()[None]
    scores = layer_region_scores(maps, labels)[0, 0]
    vanished = {int(v) for v in labels[0][scores.isnan()].unique()}
    assert len(vanished) > int(labels.max()) // 2                     # most of the 169 superpixels: NaN -> OOD
    assert torch.all(case["mask"][scores.isnan()] == 0)
    assert not layer_region_scores([m * case["error_scale"] for m in vectors["cases"]["256px"]["lpips_maps"]],
                                   vectors["cases"]["256px"]["superpixels"].long()[None]).isnan().any()


@pytest.mark.parametrize("name, variant", [("64px", {"scoring": "upsampled_sum"}),
                                           ("256px", {"scoring": "upsampled_sum"}),
                                           ("256px", {"slic_input": "rgb_float"})])
def test_named_variants_depart_from_the_official_masks(vectors, name, variant):
    case = vectors["cases"][name]
    mask, _ = official_mode_mask(case, **variant)
    assert int((mask != case["mask"].float()).sum()) > 0


def test_layer_maps_equal_the_official_lpips_vgg_maps(vectors, tmp_path):
    torch.save(state_dict_from_vectors(vectors["backbone"]), tmp_path / "vgg16.pth")   # a torchvision state dict
    net = LPIPSLoss(net="vgg", backbone_weights=str(tmp_path / "vgg16.pth"))
    case = vectors["cases"]["64px"]  # the 256 px maps agree as well (0 difference on CPU); 64 px keeps the test fast
    x, y = unit(case["coarse_u8"]), unit(case["image_u8"])
    maps = net.layer_maps(x, y)
    assert [tuple(m.shape) for m in maps] == [(1, 1, 64 >> i, 64 >> i) for i in range(5)]
    for ours, theirs in zip(maps, case["lpips_maps"]):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(upsampled_error(maps, (64, 64)), net.spatial_map(x, y))


# ------------------------------------------------------------------------------------------------ the pieces
def test_layer_region_scores_pool_each_map_on_nearest_downsampled_labels():
    labels = torch.tensor([[1, 1, 2, 2], [1, 1, 2, 2], [3, 3, 3, 3], [3, 3, 3, 4]])[None]
    full = torch.arange(16.0).view(1, 1, 4, 4)
    half = torch.tensor([[10.0, 20.0], [30.0, 40.0]]).view(1, 1, 2, 2)  # nearest picks pixels (0,0) (0,2) (2,0) (2,2)
    scores = layer_region_scores([full, half], labels)[0, 0]
    assert scores[0, 0] == (0 + 1 + 4 + 5) / 4 + 10 and scores[0, 2] == (2 + 3 + 6 + 7) / 4 + 20
    assert scores[2, 0] == (8 + 9 + 10 + 11 + 12 + 13 + 14) / 7 + (30 + 40) / 2
    assert torch.isnan(scores[3, 3])                                  # region 4 has no cell on the 2 x 2 map
    mask = region_score_mask(scores[None, None], labels, None, {}, 100.0)
    assert mask[0, 0, 3, 3] == 0 and mask[0, 0, 0, 0] == 1           # NaN is never in domain


def test_slic_image_is_cv2s_bgr_uint8_of_the_file():
    u8 = torch.randint(0, 256, (3, 5, 7), dtype=torch.uint8)
    bgr = slic_image(unit(u8)[0], "bgr_uint8")
    assert bgr.dtype == np.uint8 and np.array_equal(bgr, u8.permute(1, 2, 0).numpy()[..., ::-1])
    rgb = slic_image(unit(u8)[0], "rgb_float")
    assert rgb.dtype == np.float32 and np.allclose(rgb * 255, u8.permute(1, 2, 0).numpy(), atol=1e-3)
    with pytest.raises(ValueError, match="slic_input"):
        slic_image(unit(u8)[0], "hsv")
    with pytest.raises(ValueError, match="error scoring"):
        region_error([torch.zeros(1, 1, 2, 2)], torch.ones(1, 2, 2, dtype=torch.long), "mean")


# ------------------------------------------------------------------------------------------------ coarse inversion
class Recorder(torch.nn.Module):
    """A perceptual distance that records what it was given (per-image mean squared difference)."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x, y):
        self.seen.append((x.detach().clone(), y.detach().clone()))
        return (x - y).square().mean(dim=(1, 2, 3))


def test_coarse_inversion_scores_the_clamped_resized_synthesis_and_keeps_the_last_step_image():
    from networks.stylegan2 import Generator

    torch.manual_seed(0)
    G = Generator(32, style_dim=16, n_mlp=1, channel_multiplier=1, channel_max=16)
    target = torch.rand(2, 3, 32, 32) * 2 - 1
    rec, steps = Recorder(), []
    out = project(G, target, perceptual=rec, steps=3, lr=0.1, loss_resolution=16, clamp=True, w_avg_samples=64,
                  callback=lambda i, s: steps.append(s["images"]))
    synth, seen_target = rec.seen[-1]
    assert synth.shape == seen_target.shape == (2, 3, 16, 16)
    torch.testing.assert_close(seen_target, F.interpolate(target, size=(16, 16), mode="bilinear",
                                                          align_corners=False, antialias=True))
    torch.testing.assert_close(synth, F.interpolate(steps[-1].clamp(-1, 1), size=(16, 16), mode="bilinear",
                                                    align_corners=False))
    assert torch.equal(out.last_step_images, steps[-1])              # before the last update
    assert not torch.equal(out.last_step_images, out.images)         # the returned code's image is after it
    plain = Recorder()
    project(G, target, perceptual=plain, steps=1, w_avg_samples=64)
    assert plain.seen[0][0].shape == (2, 3, 32, 32) and torch.equal(plain.seen[0][1], target)
    with pytest.raises(ValueError, match="loss_resolution"):
        project(G, target, perceptual=plain, steps=1, w_avg_samples=64, loss_resolution=0)


# ------------------------------------------------------------------------------------------------ wiring and configs
def test_segment_wires_the_official_dss(tmp_path):
    from lightning_modules.stage3_module import RefineModule
    from tests.helpers.tiny_stage1 import export_tiny_stage1

    stage1 = export_tiny_stage1(tmp_path / "encoder.pt")
    module = RefineModule(str(stage1.path), lpips={"allow_random_backbone": True},
                          segmentation={"coarse": {"steps": 2, "resolution": 32},
                                        "lpips": {"allow_random_backbone": True}, "default_threshold": 0.03,
                                        "superpixels": {"n_segments": 30}})
    assert module.segmentation_lpips.net_name == "vgg" and module.lpips.net_name == "alex"
    images = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(3)) * 2 - 1
    codes, taps = module.encode(images)
    seg = module.segment(images, codes, taps)

    # official start (mean of 10k mapped z), noise renormalised by torch.std, target resized as an 8-bit PIL image
    coarse = project(module.generator, images, perceptual=module.segmentation_lpips, latent_avg=None,
                     space="w", steps=2, lr=0.1, loss_resolution=32, clamp=True, noise_std="unbiased",
                     target_resize="pil_uint8")
    with torch.no_grad():
        maps = module.segmentation_lpips.layer_maps(coarse.last_step_images, images)
    labels = superpixels(images, n_segments=30, slic_input="bgr_uint8")
    expected = region_score_mask(layer_region_scores(maps, labels), labels, None, {}, 0.03)
    assert torch.equal(seg["in_domain"], expected)
    torch.testing.assert_close(seg["error_map"], upsampled_error(maps, (64, 64)))
    # the named departures reach the projection: the stage-1 file's average, PTI's std, the tensor resize
    ours = {"start": "latent_avg", "noise_std": "biased", "target_resize": "antialiased"}
    for key, value in ours.items():
        setattr(module.refiner.segmenter.settings.coarse, key, value)
    coarse = project(module.generator, images, perceptual=module.segmentation_lpips, latent_avg=module.latent_avg[0],
                     space="w", steps=2, lr=0.1, loss_resolution=32, clamp=True)
    with torch.no_grad():
        maps_ours = module.segmentation_lpips.layer_maps(coarse.last_step_images, images)
    got = module.refiner.segmenter.error_maps(images)
    for a, b in zip(got, maps_ours):
        torch.testing.assert_close(a, b)
    assert any(not torch.allclose(a, b) for a, b in zip(maps_ours, maps))
    with pytest.raises(ValueError, match="model.segmentation.error_scoring='mean'"):
        RefineModule(str(stage1.path), lpips={"allow_random_backbone": True},
                     segmentation={"lpips": None, "error_scoring": "mean"})
    with pytest.raises(ValueError, match="model.segmentation.lpips.backbone_weights"):
        RefineModule(str(stage1.path), lpips={"allow_random_backbone": True})


def test_configs_official_by_default_synthfaces_variants_named(compose_cfg):
    from dataclasses import asdict

    from networks.refine.segmenter import SegmentationConfig

    defaults = asdict(SegmentationConfig())  # the one place of every default
    refine = yaml.safe_load((ROOT / "experiments" / "configs" / "model" / "refine.yaml").read_text())["segmentation"]
    official = {"coarse": {"steps": 40, "lr": 0.1, "resolution": 256, "clamp": True, "error_image": "last_step",
                           "start": "sampled_mean", "noise_std": "unbiased", "target_resize": "pil_uint8"},
                "lpips": {"net": "vgg", "backbone_weights": None, "allow_random_backbone": False},
                "error_scoring": "official_per_layer", "slic_input": "bgr_uint8"}
    for key, value in official.items():
        assert refine[key] == value == defaults[key], key
    seg = compose_cfg(["+exp=dhr"]).model.segmentation                # SynthFaces, 64 px
    assert seg.lpips.net == "synthfaces" and seg.lpips.backbone_weights.endswith("synthfaces/attribute_classifier.pt")
    assert seg.error_scoring == "upsampled_sum" and seg.coarse.resolution is None
    assert seg.slic_input == "bgr_uint8" and seg.coarse.clamp and seg.coarse.error_image == "last_step"
    header = (ROOT / "experiments" / "configs" / "exp" / "dhr.yaml").read_text()
    real_face = ["model.segmentation.coarse.resolution=256", "model.segmentation.error_scoring=official_per_layer",
                 "model.segmentation.lpips={net:vgg,backbone_weights:/w/vgg16-397923af.pth,allow_random_backbone:false}"]
    for override in real_face:
        assert override in header
    seg = compose_cfg(["+exp=dhr", *real_face]).model.segmentation
    assert seg.lpips.net == "vgg" and seg.error_scoring == "official_per_layer" and seg.coarse.resolution == 256
