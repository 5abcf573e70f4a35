"""The W&B dashboard of a stage-3 run: edit grids (methods x strengths), hand-off artifacts, and `+exp=dhr` through
run.py read back from its offline run (reconstructions, mask layers with class labels, edit grid, per-image table,
summary means, the resolved config)."""
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from PIL import Image
from torch.utils.data import DataLoader

from callbacks.edit_grid import EditGrid, caption, layout
from callbacks.handoff_artifact import build_handoff_artifact, handoff_metadata, log_handoff_artifact
from lightning_modules.stage3_module import RefineModule, grid_strengths
from networks.align_mask import AlignMaskNet, default_levels, save_align_mask
from networks.checkpoints import export_generator
from networks.editing import save_direction
from networks.refine.hybrid import decode
from networks.synthfaces_nets import AttributeClassifier, FaceParser, save_aux_net
from tests.helpers.tiny_stage1 import export_tiny_stage1
from experiments.utils.wandb_offline import config, history, read_records, run_file, summary

pytestmark = pytest.mark.usefixtures("single_thread")
FAST = dict(refine=dict(weight_steps=2, feature_steps=2, feature_resolution=16), lpips=dict(allow_random_backbone=True))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Tiny hand-offs of one generator (stages 0, 1, 2), a parser, a classifier and a smile direction."""
    root = tmp_path_factory.mktemp("dashboard")
    encoder, g, enc, latent_avg = export_tiny_stage1(root / "encoder.pt")
    generator = export_generator(root / "generator.pt", g, latent_avg[0], meta={"produced_by": "test"})
    net = AlignMaskNet(dict(g.channels), dict(enc.feature_channels), default_levels(64), 64)
    align = save_align_mask(root / "align_mask.pt", net, {"generator": dict(g.config), "produced_by": "test stage 2",
                                                          "global_step": 7})
    parser = save_aux_net(root / "parser.pt", FaceParser(resolution=64, widths=(4, 4, 4, 4)))
    classifier = save_aux_net(root / "classifier.pt", AttributeClassifier(resolution=64, widths=(4, 8, 8, 8),
                                                                          feature_dim=8))
    torch.manual_seed(3)
    direction = save_direction(root / "smile.pt", torch.randn(1, 32))
    return {k: str(v) for k, v in dict(encoder=encoder, generator=generator, align=align, parser=parser,
                                       classifier=classifier, direction=direction).items()}


def make_module(files, method="dhr", **kwargs):
    pl.seed_everything(0, verbose=False)
    opts = dict(FAST, encoder_checkpoint=files["encoder"], method=method, align_mask_checkpoint=files["align"],
                segmentation=dict(parser=files["parser"], coarse=dict(steps=2, resolution=None), lpips=None,
                                  superpixels=dict(n_segments=20)),
                edits=[{"name": "smile", "kind": "interfacegan", "path": files["direction"], "strengths": [-3.0, 3.0]}])
    opts.update(kwargs)
    return RefineModule(**opts)


def images(n=2, seed=1):
    return torch.rand(n, 3, 64, 64, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_grid_strengths_span_the_configured_range_and_zero():
    assert grid_strengths([-3.0, 3.0]) == [-3.0, -1.5, 0.0, 1.5, 3.0]
    assert grid_strengths([1.0, 3.0]) == [0.0, 0.75, 1.5, 2.25, 3.0]
    assert grid_strengths([-2.0, 2.0], n_columns=4) == pytest.approx([-2.0, -2 / 3, 0.0, 2 / 3, 2.0])
    with pytest.raises(ValueError, match="n_columns must be >= 2"):
        grid_strengths([-3.0, 3.0], n_columns=1)


def test_edit_grid_rows_are_the_methods_decoding_each_strength(files):
    module = make_module(files)
    x = images()
    with torch.inference_mode(False), torch.enable_grad():
        result = module.invert(x)
    grids = module.edit_grid(x, result)
    smile = grids["smile"]
    assert list(grids) == ["smile"] and smile["strengths"] == [-3.0, -1.5, 0.0, 1.5, 3.0]
    assert list(smile["rows"]) == ["e4e (stage 1)", "ood_blend (stage 2)", "dhr (stage 3)"]
    rows = smile["rows"]
    assert all(r.shape == (6, 2, 3, 64, 64) for r in rows.values())
    for row in rows.values():  # column 0: the input
        torch.testing.assert_close(row[0], x)
    with torch.no_grad():  # strength 0 (column 3): each method's own reconstruction
        torch.testing.assert_close(rows["e4e (stage 1)"][3], module.generator.synthesize(result["codes"]).image)
        blend = module.align_net(module.generator, result["codes"], result["taps"], x)
        torch.testing.assert_close(rows["ood_blend (stage 2)"][3], blend.output)
        torch.testing.assert_close(rows["dhr (stage 3)"][3], result["output"])
        plus3 = decode(module.generator, result["state"], result["codes"] + 3.0 * module.edits[0]["direction"])
    torch.testing.assert_close(rows["dhr (stage 3)"][5], plus3, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(rows["dhr (stage 3)"][1], rows["dhr (stage 3)"][5])  # the edit changes the image
    # explicit columns; e4e alone has one row; without model.edits the evaluation edit is used
    e4e = make_module(files, "e4e", align_mask_checkpoint=None, edits=[],
                      edit=dict(direction=files["direction"], classifier=files["classifier"], strength=2.0))
    grid = e4e.edit_grid(x, e4e.invert(x), strengths=[-1.0, 1.0])["smile"]
    assert grid["strengths"] == [-1.0, 1.0] and list(grid["rows"]) == ["e4e (stage 1)"]
    assert grid["rows"]["e4e (stage 1)"].shape == (3, 2, 3, 64, 64)
    assert make_module(files, "e4e", edits=[]).edit_grid(x, e4e.invert(x)) == {}


def test_a_stage2_file_of_another_generator_only_drops_the_grid_row(files, tmp_path):
    from networks.align_mask import load_align_mask

    net, meta = load_align_mask(files["align"])
    foreign = save_align_mask(tmp_path / "foreign.pt", net, dict(meta, generator=dict(meta["generator"], style_dim=64)))
    with pytest.warns(UserWarning, match=r"no stage-2 row: .*foreign.pt was trained for generator"):
        module = make_module(files, align_mask_checkpoint=str(foreign))  # dhr on the error map: no stage-2 net needed
    assert module.align_net is None
    x = images(1)
    with torch.inference_mode(False), torch.enable_grad():
        result = module.invert(x)
    assert list(module.edit_grid(x, result)["smile"]["rows"]) == ["e4e (stage 1)", "dhr (stage 3)"]


def test_edit_grid_layout_and_caption():
    strengths = [-1.0, 0.0, 1.0]
    rows = {"a": torch.full((4, 2, 3, 8, 8), -1.0), "b": torch.full((4, 2, 3, 8, 8), 1.0)}
    rows["a"][:, 1] = 0.0  # image 1 of method a: grey
    tiles = layout(strengths, rows)
    assert tiles.shape == (16, 3, 8, 8)  # image 0: a, b; image 1: a, b; four columns each
    assert tiles[0:4].eq(-1).all() and tiles[4:8].eq(1).all() and tiles[8:12].eq(0).all() and tiles[12:].eq(1).all()
    assert layout(strengths, rows, tile_size=4).shape == (16, 3, 4, 4)
    with pytest.raises(ValueError, match=r"\(K \+ 1 = 2, N, 3, H, W\)"):
        layout([0.0], rows)
    assert caption("smile", strengths, ["a", "b"], 2) == \
        "rows: 2 image(s) x (a / b), image by image; columns: input | smile -1 | smile 0 | smile +1"
    with pytest.raises(ValueError, match="n_columns must be >= 2"):
        EditGrid(n_columns=1)
    with pytest.raises(ValueError, match="strengths must be a list of numbers"):
        EditGrid(strengths=["big"])


def test_edit_grid_callback_requests_and_writes_only_batch_zero(files, tmp_path):
    module = make_module(files, "e4e", n_grid=1)
    batch = [{"image": x, "name": f"img{i}"} for i, x in enumerate(images(3))]
    callback = EditGrid(run_dir=str(tmp_path), strengths=[-2.0, 0.0, 2.0], n_images=1)
    trainer = pl.Trainer(accelerator="cpu", logger=False, callbacks=[callback], enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=str(tmp_path))
    trainer.test(module, DataLoader(batch, batch_size=2), verbose=False)
    assert module.edit_grid_request == {"strengths": [-2.0, 0.0, 2.0], "n_columns": 5, "n": 1}
    assert list(module.edit_grid_batch["smile"]["rows"]) == ["e4e (stage 1)", "ood_blend (stage 2)"]
    row = module.edit_grid_batch["smile"]["rows"]["e4e (stage 1)"]
    assert row.shape == (4, 1, 3, 64, 64)
    torch.testing.assert_close(row[0, 0], batch[0]["image"])  # batch 0's first image, not batch 1's
    png = tmp_path / "edits" / "test_edit_grid_smile.png"
    assert callback.written == [png]
    picture = np.asarray(Image.open(png), dtype=np.float32) / 127.5 - 1
    # one image x two methods; input + three strengths; plus a header band on top and row labels on the left
    top, left = picture.shape[0] - (2 * 66 + 2), picture.shape[1] - (4 * 66 + 2)
    assert top > 0 and left > 0 and picture.shape[2] == 3
    tile = picture[top + 2:top + 66, left + 2:left + 66].transpose(2, 0, 1)
    assert np.abs(tile - batch[0]["image"].clamp(-1, 1).numpy()).max() < 1.5 / 127.5  # the input, 8-bit rounded


def test_handoff_artifact_holds_the_file_and_its_producer_record(files):
    artifact = build_handoff_artifact(files["align"])
    assert artifact.name == "align_mask" and artifact.type == "model"
    assert artifact.metadata["produced_by"] == "test stage 2" and artifact.metadata["global_step"] == 7
    entry = artifact.manifest.entries["align_mask.pt"]
    assert entry.size == Path(files["align"]).stat().st_size and entry.local_path == files["align"]
    assert handoff_metadata(files["encoder"])["generator_config"]["style_dim"] == 32  # e4e layout: opts
    assert build_handoff_artifact(files["generator"], meta={"step": 3}).metadata == {"step": 3}
    with pytest.raises(ValueError, match="kind 'parser'.*generator, encoder, align_mask, attribute_classifier"):
        build_handoff_artifact(files["parser"])
    with pytest.raises(FileNotFoundError, match="missing.pt: no such hand-off file"):
        log_handoff_artifact(Path(files["parser"]).with_name("missing.pt"), "encoder")


def test_handoff_artifact_is_skipped_offline_and_says_why(files, tmp_path, monkeypatch, caplog):
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "data"))  # where an offline artifact would be staged
    run = wandb.init(project="test", dir=str(tmp_path), mode="offline")
    try:
        with caplog.at_level(logging.INFO, logger="callbacks.handoff_artifact"):
            assert log_handoff_artifact(files["encoder"]) is None
        assert "not logged: the run is offline" in caplog.text and "WANDB_MODE=online" in caplog.text
    finally:
        run.finish()
    records = read_records(run_file(Path(run.dir).parent))
    assert not [r for r in records if r.WhichOneof("record_type") == "artifact"]
    assert not (tmp_path / "data" / "artifacts" / "staging").exists() or \
        not any((tmp_path / "data" / "artifacts" / "staging").iterdir())
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="callbacks.handoff_artifact"):
        assert log_handoff_artifact(files["encoder"]) is None  # finished: no active run
    assert "no active W&B run" in caplog.text


def test_run_py_dhr_dashboard_reads_back_from_the_offline_run(files, compose_cfg, tmp_path, monkeypatch):
    """`+exp=dhr` (DHR with tiny step counts, 4 test images in 2 batches) through run.py with the offline W&B logger:
    everything the dashboard shows is in the run file."""
    from experiments.run import finish_wandb, train

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb"))
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb_data"))
    overrides = ["+exp=dhr", "logger=wandb", "trainer=cpu", "trainer.enable_progress_bar=false",
                 f"data.root={tmp_path / 'sf'}", "data.n_images=24", "data.n_eval=4", "data.render_size=64",
                 "data.batch_size=2", "data.num_workers=0",
                 f"chain.generator.checkpoint={files['generator']}", f"chain.encoder.checkpoint={files['encoder']}",
                 f"chain.align_mask.checkpoint={files['align']}",
                 f"model.segmentation.parser={files['parser']}", "model.segmentation.coarse.steps=2",
                 "model.segmentation.superpixels.n_segments=20", "model.refine.weight_steps=2",
                 "model.refine.feature_steps=2", f"model.edit.direction={files['direction']}",
                 f"model.edit.classifier={files['classifier']}", f"model.edits.0.path={files['direction']}",
                 "callbacks.edit_grid.n_images=2"]
    try:
        assert train(compose_cfg(overrides)) is None
    finally:
        finish_wandb()  # as run.py's main() does after every job
    run_dir = tmp_path / "run"
    [wandb_dir] = list(run_dir.glob("wandb/offline-run-*"))
    path = run_file(wandb_dir)
    rows = history(path)
    logged = {k: r for r in rows for k in r if k.endswith("/_type")}

    def media(key):
        assert key + "/_type" in logged, f"{key} not logged; keys: {sorted(logged)}"
        return logged[key + "/_type"]

    # reconstructions (input / output / mask / ground-truth / edit rows of test batch 0)
    recon = media("test/reconstructions")
    assert recon["test/reconstructions/_type"] == "images/separated"
    assert "input / output / mask / ood_mask / edit" in recon["test/reconstructions/captions"][0]
    # masks: W&B mask layers with class labels, one image per test image of batch 0
    masks = media("test/masks")
    assert masks["test/masks/count"] == 2
    assert [set(m) for m in masks["test/masks/all_masks"]] == [{"prediction", "ground_truth"}] * 2
    for layers in masks["test/masks/all_masks"]:
        for layer in layers.values():
            mask = np.asarray(Image.open(wandb_dir / "files" / layer["path"]))
            assert mask.shape == (64, 64) and set(np.unique(mask)) <= {0, 1}
    labels = config(path)["_wandb"]["mask/class_labels"]  # W&B keeps a layer's class labels in the run config
    assert {k: v["value"] for k, v in labels.items()} == {
        f"test/masks_wandb_delimeter_{layer}": {"0": "in-domain", "1": "out-of-domain"}
        for layer in ("prediction", "ground_truth")}
    # the edit grid: methods x strengths of the smile edit, caption naming rows and columns
    grid = media("test/edit_grid/smile")
    text = grid["test/edit_grid/smile/captions"][0]
    assert "e4e (stage 1) / ood_blend (stage 2) / dhr (stage 3)" in text
    assert "columns: input | smile -3 | smile -1.5 | smile 0 | smile +1.5 | smile +3" in text
    png = Image.open(run_dir / "edits" / "test_edit_grid_smile.png")
    # 6 columns; 2 images x 3 methods; plus the header band (strengths) and the row labels (image, method)
    assert png.size[0] > 6 * 66 + 2 and png.size[1] > 2 * 3 * 66 + 2
    logged_png = wandb_dir / "files" / grid["test/edit_grid/smile/filenames"][0]
    assert np.array_equal(np.asarray(Image.open(logged_png).convert("RGB")), np.asarray(png.convert("RGB")))
    # the per-image table: one row per test image, metric columns
    table_row = media("test/per_image")
    assert table_row["test/per_image/_type"] == "table-file" and table_row["test/per_image/nrows"] == 4
    table = json.loads((wandb_dir / "files" / table_row["test/per_image/path"]).read_text())
    assert {"name", "psnr", "ssim", "psnr_in", "iou@0.5", "edit_success", "seconds"} <= set(table["columns"])
    assert len(table["data"]) == 4 and len({row[0] for row in table["data"]}) == 4
    psnr = [row[table["columns"].index("psnr")] for row in table["data"]]
    # summary means = the table's means
    means = summary(path)
    assert means["test_mean/psnr"] == pytest.approx(np.mean(psnr))
    assert {"test_mean/ssim", "test_mean/iou@0.5", "test_mean/edit_success"} <= set(means)
    # the resolved config
    cfg = config(path)
    assert cfg["model"]["method"] == "dhr" and cfg["data"]["batch_size"] == 2
    assert cfg["model"]["encoder_checkpoint"] == files["encoder"] and cfg["task_name"] == "dhr"
