"""The oracle segmentation source (``model.segmentation.source=ground_truth``): DHR refines with 1 - the batch's
ground-truth OOD mask; evaluation only, with one clear message when there is no mask."""
import json

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from PIL import Image
from torch.utils.data import DataLoader

import networks.refine.methods as methods
from callbacks.inversion_writer import InversionWriter
from datamodules.folder import FolderDataModule
from lightning_modules.stage3_module import RefineModule
from networks.refine.segmentation import SEGMENTATION_SOURCES, combine_sources, ground_truth_in_domain
from networks.refine.segmenter import DomainSegmenter
from tests.helpers.tiny_stage1 import export_tiny_stage1

pytestmark = pytest.mark.usefixtures("single_thread")
FAST = dict(refine=dict(weight_steps=1, feature_steps=1, feature_resolution=16), lpips=dict(allow_random_backbone=True))
MESSAGE = "model.segmentation.source=ground_truth is the evaluation oracle"


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    return str(export_tiny_stage1(tmp_path_factory.mktemp("oracle") / "encoder.pt").path)


def oracle_module(encoder, **kwargs):
    pl.seed_everything(0, verbose=False)
    # no stage-2 file and no parser: the oracle needs neither
    return RefineModule(encoder_checkpoint=encoder, method="dhr", align_mask_checkpoint=None,
                        segmentation=dict(source="ground_truth"), **FAST, **kwargs)


def items(n=2, with_mask=True):
    g = torch.Generator().manual_seed(3)
    x = torch.rand(n, 3, 64, 64, generator=g) * 2 - 1
    gt = torch.zeros(n, 1, 64, 64)
    gt[0, :, 40:, 10:40] = 1
    gt[1, :, :20, :] = 1
    out = [{"image": x[i], "name": f"img{i}"} for i in range(n)]
    if with_mask:
        for i, item in enumerate(out):
            item["ood_mask"] = gt[i]
    return out, gt


def make_trainer(tmp_path, *callbacks):
    return pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, callbacks=list(callbacks),
                      enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path))


@pytest.fixture
def refined_masks(monkeypatch):
    """Records the in-domain mask every ``hybrid_refine`` call receives (and still runs it)."""
    seen = []
    real = methods.hybrid_refine

    def spy(generator, codes, images, in_domain, *args, **kwargs):
        seen.append(in_domain.detach().clone())
        return real(generator, codes, images, in_domain, *args, **kwargs)

    monkeypatch.setattr(methods, "hybrid_refine", spy)
    return seen


def test_ground_truth_source_and_its_in_domain_mask():
    assert "ground_truth" in SEGMENTATION_SOURCES
    ood = torch.tensor([0.0, 1.0, 0.2, 0.7]).view(1, 1, 1, 4)
    assert ground_truth_in_domain(ood)[0, 0, 0].tolist() == [1, 0, 1, 0]
    assert combine_sources("ground_truth", truth_in=ground_truth_in_domain(ood))[0, 0, 0].tolist() == [1, 0, 1, 0]
    with pytest.raises(ValueError, match="needs truth_in"):
        combine_sources("ground_truth", error_in=ood)


def test_segmenter_uses_the_given_mask_only_inside_the_block():
    from networks.stylegan2 import Generator

    g = Generator(16, style_dim=8, n_mlp=1, channel_multiplier=1, channel_max=8)
    segmenter = DomainSegmenter(g, torch.zeros(8), {"source": "ground_truth"})  # no perceptual net, no stage 2
    x = torch.zeros(2, 3, 16, 16)
    gt = (torch.rand(2, 1, 16, 16) > 0.5).float()
    with segmenter.given_ood_mask(gt):
        seg = segmenter(x, None, {})
    torch.testing.assert_close(seg["in_domain"], 1 - gt)
    torch.testing.assert_close(seg["ground_truth"], gt)
    with pytest.raises(ValueError, match=MESSAGE):
        segmenter(x, None, {})  # the block is over: no mask any more
    with pytest.raises(ValueError, match=r"does not fit the images"):
        with segmenter.given_ood_mask(gt[:1]):
            segmenter(x, None, {})


def test_dhr_refines_with_one_minus_the_batch_mask(encoder, tmp_path, refined_masks):
    module = oracle_module(encoder)
    assert module.align_net is None and module.parser is None
    batch, gt = items()
    make_trainer(tmp_path).test(module, DataLoader(batch, batch_size=2), verbose=False)
    assert len(refined_masks) == 1
    torch.testing.assert_close(refined_masks[0], 1 - gt)  # exactly the mask passed to the refinement
    rows = {r["name"]: r for r in module.test_table.rows}
    assert rows["img0"]["iou@0.5"] == pytest.approx(1.0) and rows["img1"]["iou@0.5"] == pytest.approx(1.0)
    torch.testing.assert_close(module.grid_batch["mask"], gt)  # the reported OOD mask is the ground truth


def test_a_batch_without_mask_fails_naming_the_source(encoder, tmp_path):
    module = oracle_module(encoder)
    batch, _ = items(with_mask=False)
    with pytest.raises(ValueError, match=MESSAGE + r".*the batch has no ground-truth OOD mask"):
        make_trainer(tmp_path).test(module, DataLoader(batch, batch_size=2), verbose=False)
    with pytest.raises(ValueError, match="model.segmentation.source=ground_truth"):
        module.invert(torch.stack([b["image"] for b in batch]))


def test_mode_invert_needs_masks_and_uses_them(encoder, tmp_path, refined_masks):
    batch, gt = items(with_mask=False)
    module = oracle_module(encoder)
    out = tmp_path / "inv"
    with pytest.raises(ValueError, match=MESSAGE + r".*mode=invert was given no ground-truth masks \(masks=DIR\)"):
        make_trainer(tmp_path, InversionWriter(out, module.result_settings())).predict(
            module, DataLoader(batch, batch_size=2), return_predictions=False)
    assert not refined_masks  # refused before any image
    # as run.py's mode=invert: the folder DataModule reads the images and masks=DIR, an InversionWriter writes
    photos, masks = tmp_path / "photos", tmp_path / "masks"
    photos.mkdir()
    masks.mkdir()
    for item in batch:
        pixels = ((item["image"].permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8)
        Image.fromarray(pixels).save(photos / f"{item['name']}.png")
    Image.fromarray((gt[0, 0].numpy() * 255).astype(np.uint8)).save(masks / "img0.png")

    def invert():
        module = oracle_module(encoder)
        make_trainer(tmp_path, InversionWriter(out, module.result_settings())).predict(
            module, datamodule=FolderDataModule(photos, resolution=64, batch_size=2, masks=str(masks)),
            return_predictions=False)

    with pytest.raises(ValueError, match=MESSAGE + r".*has no readable mask img1.png"):
        invert()
    assert not refined_masks
    Image.fromarray((gt[1, 0].numpy() * 255).astype(np.uint8)).save(masks / "img1.png")
    invert()
    torch.testing.assert_close(refined_masks[0], 1 - gt)
    metrics = json.loads((out / "img0" / "metrics.json").read_text())
    assert metrics["iou@0.5"] == pytest.approx(1.0)


def test_methods_without_a_segmenter_ignore_the_source(encoder, tmp_path):
    module = RefineModule(encoder_checkpoint=encoder, method="e4e", segmentation=dict(source="ground_truth"), **FAST)
    batch, _ = items(with_mask=False)
    make_trainer(tmp_path).test(module, DataLoader(batch, batch_size=2), verbose=False)
    assert len(module.test_table.rows) == 2
