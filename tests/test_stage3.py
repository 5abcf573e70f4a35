"""Stage 3 (DHR and its baselines) LightningModule: methods, metrics, edits, mode=invert files and resume."""
import json

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from PIL import Image
from torch.utils.data import DataLoader

from callbacks.inversion_writer import InversionWriter
from lightning_modules.stage3_module import METHODS, RefineModule
from networks.align_mask import AlignMaskNet, default_levels, save_align_mask
from networks.checkpoints import CheckpointError
from networks.editing import save_direction
from networks.refine.hybrid import decode, state_from_images
from networks.stylegan2 import Generator
from networks.synthfaces_nets import AttributeClassifier, FaceParser, save_aux_net
from tests.helpers.tiny_stage1 import export_tiny_stage1

pytestmark = pytest.mark.usefixtures("single_thread")
G_CFG = dict(size=64, style_dim=32, n_mlp=2, channel_multiplier=1, channel_max=32)
FAST = dict(refine=dict(weight_steps=2, feature_steps=3, feature_resolution=16), pti=dict(steps=2),
            feature_only=dict(steps=3), lpips=dict(allow_random_backbone=True))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("stage3")
    encoder, g, enc, _ = export_tiny_stage1(root / "encoder.pt")
    net = AlignMaskNet(dict(g.channels), dict(enc.feature_channels), default_levels(64), 64)
    align = save_align_mask(root / "align_mask.pt", net, {"generator": dict(g.config)})
    other = Generator(**dict(G_CFG, channel_max=16))
    foreign = save_align_mask(root / "foreign.pt", net, {"generator": dict(other.config)})
    parser = save_aux_net(root / "parser.pt", FaceParser(resolution=64, widths=(4, 4, 4, 4)))
    classifier = save_aux_net(root / "classifier.pt", AttributeClassifier(resolution=64, widths=(4, 8, 8, 8),
                                                                          feature_dim=8))
    direction = save_direction(root / "smile.pt", torch.randn(1, 32))
    return dict(encoder=str(encoder), align=str(align), foreign=str(foreign), parser=str(parser),
                classifier=str(classifier), direction=str(direction), root=root)


def make_module(files, method="dhr", **kwargs):
    pl.seed_everything(0, verbose=False)
    opts = dict(FAST, encoder_checkpoint=files["encoder"], method=method, align_mask_checkpoint=files["align"],
                segmentation=dict(source="both", parser=files["parser"], coarse=dict(steps=2, resolution=None),
                                  lpips=None, superpixels=dict(n_segments=20), thresholds={"skin": 0.07},
                                  ood_classes=["background"]),
                edit=dict(direction=files["direction"], classifier=files["classifier"], strength=2.0), n_grid=2)
    opts.update(kwargs)
    return RefineModule(**opts)


def batch(n=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, 64, 64, generator=g) * 2 - 1
    gt = torch.zeros(n, 1, 64, 64)
    gt[:, :, 40:, 10:40] = 1
    return [{"image": x[i], "clean": x[i], "ood_mask": gt[i], "name": f"img{i}"} for i in range(n)]


def make_tester(tmp_path, **kwargs):
    return pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, default_root_dir=str(tmp_path), **kwargs)


def predict(tmp_path, module, out, items, batch_size=3, **kwargs):
    """``mode=invert`` as run.py runs it: ``trainer.predict`` with an ``InversionWriter`` callback writing to ``out``."""
    writer = InversionWriter(out, module.result_settings())
    make_tester(tmp_path, callbacks=[writer], **kwargs).predict(module, DataLoader(items, batch_size=batch_size),
                                                                return_predictions=False)
    return writer


@pytest.mark.parametrize("method", METHODS)
def test_every_method_is_tested_with_metrics_masks_and_edits(files, tmp_path, method):
    module = make_module(files, method)
    make_tester(tmp_path).test(module, DataLoader(batch(), batch_size=2), verbose=False)
    row = module.test_table.rows[0]
    assert row["name"] == "img0" and row["failed"] == 0.0 and row["seconds"] > 0
    assert {"psnr", "ssim", "mse", "psnr_in", "mse_in", "psnr_out", "lpips-random", "edit_success",
            "edit_ood_psnr"} <= set(row)
    assert ("iou@0.5" in row) == (method in ("dhr", "ood_blend"))
    assert module.summary_markdown().splitlines()[2].startswith(f"| {method} |")
    assert module.grid_batch["output"].shape == (2, 3, 64, 64)


def test_refinement_beats_the_encoder_alone(files):
    x = torch.stack([b["image"] for b in batch()])
    e4e = make_module(files, "e4e").invert(x)["output"]
    feature = make_module(files, "feature_only", feature_only=dict(steps=25)).invert(x)["output"]
    pti = make_module(files, "pti", pti=dict(steps=25, lr=3e-3)).invert(x)["output"]
    err = {k: float(((v - x) ** 2).mean()) for k, v in (("e4e", e4e), ("feature", feature), ("pti", pti))}
    assert err["feature"] < err["e4e"] and err["pti"] < err["e4e"], err


def test_dhr_segmentation_sources(files):
    x = torch.stack([b["image"] for b in batch()])
    both = make_module(files)
    codes, taps = both.encode(x)
    seg = both.segment(x, codes, taps)
    assert set(seg) == {"error_map", "error_in_domain", "align_mask", "in_domain"}
    assert seg["in_domain"].shape == (2, 1, 64, 64) and set(seg["in_domain"].unique().tolist()) <= {0.0, 1.0}
    align_in = (seg["align_mask"] < 0.5).float()
    torch.testing.assert_close(seg["in_domain"], torch.minimum(seg["error_in_domain"], align_in))
    only_align = make_module(files, segmentation=dict(source="align_mask"))
    assert only_align.parser is None and set(only_align.segment(x, codes, taps)) == {"align_mask", "in_domain"}


def test_edits_decode_with_the_refined_state(files):
    module = make_module(files)
    x = torch.stack([b["image"] for b in batch()])
    result = module.invert(x)
    edited = module.render_edit(result, x, result["codes"] + 0.5)
    torch.testing.assert_close(edited, decode(module.generator, result["state"], result["codes"] + 0.5))
    assert not torch.allclose(edited, result["output"])


def test_bad_configs_name_the_problem(files):
    with pytest.raises(ValueError, match="model.method='nope'"):
        make_module(files, "nope")
    with pytest.raises(ValueError, match="needs model.align_mask_checkpoint"):
        make_module(files, "ood_blend", align_mask_checkpoint=None)
    with pytest.raises(CheckpointError, match=r"foreign.pt was trained for generator .*encoder.pt holds"):
        make_module(files, "ood_blend", align_mask_checkpoint=files["foreign"])
    with pytest.raises(ValueError, match="unknown parser classes"):
        make_module(files, segmentation=dict(parser=files["parser"], thresholds={"halo": 0.1}))
    with pytest.raises(ValueError, match="segmentation.source"):
        make_module(files, segmentation=dict(source="magic"))


def test_predict_writes_per_image_results_and_resumes(files, tmp_path):
    out = tmp_path / "inv"
    edits = [{"name": "smile", "kind": "interfacegan", "path": files["direction"], "strengths": [-2.0, 2.0]}]
    module = make_module(files, edits=edits)
    items = batch(3)
    items[2]["image"] = torch.full_like(items[2]["image"], float("nan"))
    predict(tmp_path, module, out, items, inference_mode=True)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["images"] == 3 and manifest["ok"] == 2 and manifest["failed"] == ["img2"]
    folder = out / "img0"
    assert {p.name for p in folder.iterdir()} >= {"input.png", "reconstruction.png", "ood_mask.png", "latent.pt",
                                                  "refine_state.pt", "record.json", "edits"}
    assert sorted(p.name for p in (folder / "edits").iterdir()) == ["smile_+2.png", "smile_-2.png"]
    assert "NaN" in json.loads((out / "img2" / "record.json").read_text())["reason"]
    assert "iou@0.5" in json.loads((folder / "metrics.json").read_text())  # the batch's ood_mask is the ground truth
    # re-editing later from the saved state, without a generator copy per image
    state = torch.load(folder / "refine_state.pt", weights_only=True)
    assert state["weights_format"] == "delta_bf16" and "weights" not in state
    rebuilt = state_from_images([state], module.generator)
    with torch.no_grad():
        again = decode(module.generator, rebuilt, state["codes"][None])
    saved = np.asarray(Image.open(folder / "reconstruction.png"), dtype=np.float32) / 127.5 - 1
    assert np.abs(again[0].clamp(-1, 1).permute(1, 2, 0).numpy() - saved).mean() < 0.02  # bf16 deltas + 8-bit PNG
    # a rerun skips the finished images and redoes a removed one
    stamp = (out / "img1" / "record.json").stat().st_mtime_ns
    (folder / "record.json").unlink()
    module = make_module(files, edits=edits)
    predict(tmp_path, module, out, items)
    assert (folder / "record.json").is_file() and (out / "img1" / "record.json").stat().st_mtime_ns == stamp


def test_writer_refuses_names_outside_its_folder(tmp_path):
    with pytest.raises(ValueError, match="relative path"):
        InversionWriter(tmp_path).folder("../escape")


def test_disk_full_stops_with_a_clear_message_and_keeps_finished_images(files, tmp_path, monkeypatch):
    import errno

    import callbacks.inversion_writer as writer_module

    out = tmp_path / "inv"
    module = make_module(files, "e4e")
    real_save, calls = writer_module.save_png, []

    def failing_save(image, path):
        calls.append(path)
        if "img1" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(image, path)

    monkeypatch.setattr(writer_module, "save_png", failing_save)
    with pytest.raises(OSError, match=r"'img1'.*No space left.*1 finished image\(s\) are kept.*rerun"):
        predict(tmp_path, module, out, batch(3))
    assert (out / "img0" / "record.json").is_file() and not (out / "img1" / "record.json").exists()
    monkeypatch.setattr(writer_module, "save_png", real_save)
    predict(tmp_path, make_module(files, "e4e"), out, batch(3))
    assert json.loads((out / "manifest.json").read_text())["ok"] == 3


def test_run_py_dhr_mode_invert_on_a_folder(files, compose_cfg, make_images, tmp_path, monkeypatch):
    """`python experiments/run.py +exp=dhr mode=invert input=DIR output=OUT`, then a rerun that skips everything."""
    from experiments.run import train

    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb"))
    make_images(tmp_path / "photos", ["a.png", "sub/b.jpg"], size=(80, 64))
    mask = np.zeros((64, 64), np.uint8)
    mask[40:, :] = 255
    Image.fromarray(mask).save(tmp_path / "a.png")  # a ground-truth OOD mask for image "a" only
    out = tmp_path / "inverted"
    overrides = ["+exp=dhr", "mode=invert", f"input={tmp_path / 'photos'}", f"output={out}", "logger=csv",
                 f"masks={tmp_path}",
                 "trainer=cpu", "trainer.enable_progress_bar=false", "data.num_workers=0",
                 f"model.encoder_checkpoint={files['encoder']}", f"model.align_mask_checkpoint={files['align']}",
                 f"model.segmentation.parser={files['parser']}", "model.segmentation.coarse.steps=2",
                 "model.segmentation.superpixels.n_segments=20", "model.refine.weight_steps=2",
                 "model.refine.feature_steps=2", f"model.edit.direction={files['direction']}",
                 f"model.edit.classifier={files['classifier']}", f"model.edits.0.path={files['direction']}"]
    manifest = train(compose_cfg(overrides))
    data = json.loads(manifest.read_text())
    assert manifest == out / "manifest.json" and data["ok"] == 2
    assert sorted(r["name"] for r in data["records"]) == ["a", "sub/b"]
    assert (out / "sub" / "b" / "edits" / "smile_+3.png").is_file() and (out / "a" / "ood_mask.png").is_file()
    metrics = json.loads((out / "a" / "metrics.json").read_text())
    assert {"psnr", "psnr_in", "psnr_out", "iou@0.5", "best_iou"} <= set(metrics)
    assert not (out / "sub" / "b" / "metrics.json").exists()
    stamp = (out / "a" / "record.json").stat().st_mtime_ns
    train(compose_cfg(overrides, run_dir=tmp_path / "run2"))
    assert (out / "a" / "record.json").stat().st_mtime_ns == stamp


def test_run_py_mode_invert_needs_an_input(compose_cfg, files):
    from experiments.run import train
    from experiments.utils import UserError

    with pytest.raises(UserError, match="mode=invert needs input=DIR"):
        train(compose_cfg(["+exp=dhr", "mode=invert", f"model.encoder_checkpoint={files['encoder']}"]))


def test_dhr_with_a_bisenet_parser_uses_its_class_names(files, tmp_path):
    from networks.face_parsers import BiSeNet

    torch.manual_seed(0)
    path = tmp_path / "79999_iter.pth"
    torch.save(BiSeNet(19).state_dict(), path)
    module = make_module(files, segmentation=dict(source="error_superpixels", parser=str(path), parser_kind="bisenet",
                                                  coarse=dict(resolution=None), lpips=None,
                                                  thresholds={"skin": 0.7, "nose": 0.8}, default_threshold=0.6,
                                                  ood_classes=["background", "cloth", "hat", "ear_r", "neck_l"]))
    assert module.class_ids["skin"] == 1 and module.class_ids["hat"] == 18
    x = torch.stack([b["image"] for b in batch(1)])
    codes, taps = module.encode(x)
    assert module.segment(x, codes, taps)["in_domain"].shape == (1, 1, 64, 64)
    with pytest.raises(ValueError, match="unknown parser classes"):
        make_module(files, segmentation=dict(source="error_superpixels", parser=str(path), parser_kind="bisenet",
                                             ood_classes=["background", "ears"]))
