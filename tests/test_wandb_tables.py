"""Per-image W&B tables with pictures (issue 18), read back from offline runs: the callback on its own (which images
get pictures, thumbnails, mask layers with class labels, validation tables), and `+exp=dhr` (stage 3) and stage 2
through run.py."""
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from PIL import Image

from callbacks.wandb_tables import WandbMetricTable, picture_columns, thumbnail
from lightning_modules.metrics import MetricTable
from experiments.utils.wandb_offline import config, logged_tables, run_file, summary

pytestmark = pytest.mark.usefixtures("single_thread")
CLASSES = {"0": "in-domain", "1": "out-of-domain"}


class _Scored(pl.LightningModule):
    """Returns pictures from its steps as the stages do: test images 0..5 with PSNR 30 - 2 * index (image 5 lowest);
    image 2 failed (NaN)."""

    def __init__(self, n_val: int = 3):
        super().__init__()
        self.layer = torch.nn.Linear(1, 1)
        self.test_table = MetricTable()
        self.n_val = n_val

    def _pictures(self, index: torch.Tensor):
        b = index.shape[0]
        x = torch.linspace(-1, 1, 16).repeat(b, 3, 16, 1) * 0 + (index.view(-1, 1, 1, 1).float() / 10 - 0.5)
        mask, gt = torch.zeros(b, 1, 16, 16), torch.zeros(b, 1, 16, 16)
        mask[..., :8, :] = 0.9
        gt[..., :, :8] = 1
        return {"input": x, "output": -x, "mask": mask, "ood_mask": gt, "edit": x.flip(-1)}

    def test_step(self, batch, batch_idx):
        index = batch[:, 0].long()
        psnr = 30 - 2 * index.float()
        psnr[index == 2] = float("nan")
        names = [f"img{int(i)}" for i in index]
        metrics = {"psnr": psnr, "ssim": torch.ones_like(psnr)}
        self.test_table.add(names, metrics)
        return {"names": names, "metrics": metrics, "pictures": self._pictures(index)}

    def training_step(self, batch, batch_idx):
        return self.layer(batch.float()).sum()

    def validation_step(self, batch, batch_idx):
        index = batch[:, 0].long()
        pictures = self._pictures(index)
        return {"names": [f"val{int(i)}" for i in index], "metrics": {"psnr": 10 + index.float()},
                "pictures": {"input": pictures["input"], "reconstruction": pictures["output"]}}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def _offline_logger(tmp_path, monkeypatch):
    from pytorch_lightning.loggers import WandbLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb_data"))
    return WandbLogger(project="test", save_dir=str(tmp_path), offline=True)


def _image(table, cell) -> np.ndarray:
    return np.asarray(Image.open(table["files"][cell["path"]]))


def test_thumbnails_and_columns():
    image = torch.linspace(-1, 1, 3 * 40 * 20).reshape(3, 40, 20)
    small = thumbnail(image, 10)
    assert small.shape == (10, 5, 3) and small.dtype == np.uint8
    assert thumbnail(image, None).shape == (40, 20, 3) and thumbnail(image, 64).shape == (40, 20, 3)
    mask = torch.zeros(1, 40, 20)
    mask[:, :20] = 0.7
    assert set(np.unique(thumbnail(mask, 10, is_mask=True))) == {0, 1}
    assert thumbnail(mask, 10, is_mask=True)[:5].all() and not thumbnail(mask, 10, is_mask=True)[5:].any()
    assert picture_columns(["input", "output", "mask", "ood_mask", "edit"]) == ["input", "reconstruction", "mask",
                                                                                "edit"]
    assert picture_columns(["input", "stage1", "ood_mask"]) == ["input", "mask", "stage1"]
    with pytest.raises(ValueError, match="pick='worst'; choose one of lowest, highest, first"):
        WandbMetricTable(pick="worst")


def test_test_table_has_pictures_for_the_lowest_psnr_images(tmp_path, monkeypatch):
    logger = _offline_logger(tmp_path, monkeypatch)
    callback = WandbMetricTable(pictures=3, thumbnail=8)
    trainer = pl.Trainer(accelerator="cpu", logger=logger, callbacks=[callback], enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=str(tmp_path))
    data = torch.arange(6).view(6, 1)
    trainer.test(_Scored(), torch.utils.data.DataLoader(data, batch_size=4), verbose=False)
    run_dir = Path(logger.experiment.dir).parent
    logger.experiment.finish()
    path = run_file(run_dir)
    [table] = logged_tables(path, "test/per_image")
    assert table["columns"] == ["name", "psnr", "ssim", "input", "reconstruction", "mask", "edit"]
    rows = {row[0]: dict(zip(table["columns"], row)) for row in table["data"]}
    assert list(rows) == [f"img{i}" for i in range(6)]  # every image, in test order
    # pictures: the failed image (NaN counts as the lowest) and the two lowest PSNRs
    assert sorted(n for n, r in rows.items() if r["input"] is not None) == ["img2", "img4", "img5"]
    assert all(r[c] is None for n, r in rows.items() if n not in ("img2", "img4", "img5")
               for c in ("input", "reconstruction", "mask", "edit"))
    assert rows["img2"]["psnr"] is None and rows["img5"]["psnr"] == 20.0
    cell = rows["img5"]["input"]
    assert cell["_type"] == "image-file" and (cell["width"], cell["height"]) == (8, 8)
    expected = round((0.5 - 0.5 + 1) * 127.5)  # image 5: constant 5 / 10 - 0.5 = 0
    assert np.abs(_image(table, cell).astype(int) - expected).max() <= 1
    # the mask column: the input with both mask layers, 0 / 1 pixels, class labels
    mask = rows["img5"]["mask"]
    assert set(mask["masks"]) == {"prediction", "ground_truth"}
    prediction = np.asarray(Image.open(table["files"][mask["masks"]["prediction"]["path"]]))
    truth = np.asarray(Image.open(table["files"][mask["masks"]["ground_truth"]["path"]]))
    assert prediction.shape == (8, 8) and prediction[:4].all() and not prediction[4:].any()
    assert truth[:, :4].all() and not truth[:, 4:].any()
    types = table["column_types"]["params"]["type_map"]["mask"]["params"]["allowed_types"]
    image_type = next(t for t in types if t["wb_type"] == "image-file")
    assert image_type["params"]["mask_class_maps"]["params"]["val"] == {"prediction": CLASSES,
                                                                       "ground_truth": CLASSES}
    assert summary(path)["test_mean/psnr"] == pytest.approx(np.mean([30, 28, 24, 22, 20]))


def test_pictures_zero_keeps_numbers_only_and_first_picks_test_order(tmp_path, monkeypatch):
    for pictures, pick, expected in ((0, "lowest", []), (2, "first", ["img0", "img1"]), (1, "highest", ["img0"])):
        logger = _offline_logger(tmp_path / pick, monkeypatch)
        trainer = pl.Trainer(accelerator="cpu", logger=logger, enable_progress_bar=False, enable_model_summary=False,
                             callbacks=[WandbMetricTable(pictures=pictures, pick=pick, thumbnail=None)],
                             default_root_dir=str(tmp_path))
        trainer.test(_Scored(), torch.utils.data.DataLoader(torch.arange(6).view(6, 1), batch_size=4), verbose=False)
        run_dir = Path(logger.experiment.dir).parent
        logger.experiment.finish()
        [table] = logged_tables(run_file(run_dir), "test/per_image")
        with_pictures = [row[0] for row in table["data"] if len(row) > 3 and row[3] is not None]
        assert with_pictures == expected, pick
        if pictures == 0:
            assert table["columns"] == ["name", "psnr", "ssim"]
        else:
            assert table["data"][0][3]["width"] == 16  # thumbnail=None: full size


def test_validation_tables_follow_training(tmp_path, monkeypatch):
    logger = _offline_logger(tmp_path, monkeypatch)
    trainer = pl.Trainer(accelerator="cpu", logger=logger, max_steps=4, val_check_interval=2, limit_val_batches=2,
                         callbacks=[WandbMetricTable(val_pictures=3, thumbnail=8)], enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, default_root_dir=str(tmp_path))
    data = torch.utils.data.DataLoader(torch.arange(4).view(4, 1), batch_size=2)
    trainer.fit(_Scored(), data, data)
    run_dir = Path(logger.experiment.dir).parent
    logger.experiment.finish()
    tables = logged_tables(run_file(run_dir), "val/per_image")
    assert len(tables) == 2  # one per validation (steps 2 and 4), none for the sanity check
    for table in tables:
        assert table["columns"] == ["name", "psnr", "input", "reconstruction"]
        assert [row[:2] for row in table["data"]] == [["val0", 10.0], ["val1", 11.0], ["val2", 12.0]]
        assert all(_image(table, row[3]).shape == (8, 8, 3) for row in table["data"])


# ---------------------------------------------------------------------------------------------------- run.py
@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Tiny hand-offs of one generator (stages 1 and 2), a smile direction and an attribute classifier."""
    from tests.helpers.tiny_handoffs import export_tiny_handoffs

    return export_tiny_handoffs(tmp_path_factory.mktemp("tables"), produced_by="test")


def _synthfaces(tmp_path, batch_size=2):
    return [f"data.root={tmp_path / 'sf'}", "data.n_images=24", "data.n_eval=4", "data.render_size=64",
            f"data.batch_size={batch_size}", "data.num_workers=0", "trainer=cpu", "trainer.enable_progress_bar=false",
            "logger=wandb"]


def _run(compose_cfg, overrides, tmp_path, monkeypatch):
    from experiments.run import finish_wandb, train

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb_data"))
    try:
        train(compose_cfg(overrides))
    finally:
        finish_wandb()
    [wandb_dir] = list((tmp_path / "run").glob("wandb/offline-run-*"))
    return run_file(wandb_dir)


def test_dhr_test_table_has_picture_columns(files, compose_cfg, tmp_path, monkeypatch):
    """`+exp=dhr` (method ood_blend: a predicted mask without per-image optimisation) through run.py: every test image
    is a row; the lowest-PSNR images carry input, reconstruction, mask layers (prediction and ground truth) and the
    evaluation edit, at the configured thumbnail size."""
    overrides = ["+exp=dhr", *_synthfaces(tmp_path), "model.method=ood_blend", "chain.align_mask.enabled=false",
                 f"model.encoder_checkpoint={files['encoder']}", f"model.align_mask_checkpoint={files['align']}",
                 f"model.edit.direction={files['direction']}", f"model.edit.classifier={files['classifier']}",
                 f"model.edits.0.path={files['direction']}", "model.lpips.allow_random_backbone=true",
                 "callbacks.wandb_metric_table.pictures=3", "callbacks.wandb_metric_table.thumbnail=32"]
    path = _run(compose_cfg, overrides, tmp_path, monkeypatch)
    [table] = logged_tables(path, "test/per_image")
    columns = table["columns"]
    assert columns[-6:] == ["input", "reconstruction", "mask", "edit", "smile_-3", "smile_+3"]  # + model.edits
    assert {"psnr", "psnr_in", "iou@0.5", "edit_success"} <= set(columns)
    rows = [dict(zip(columns, row)) for row in table["data"]]
    assert len(rows) == 4 and sum(r["input"] is not None for r in rows) == 3
    psnr = sorted(r["psnr"] for r in rows)
    assert all(r["input"] is not None for r in rows if r["psnr"] in psnr[:3])
    for row in (r for r in rows if r["input"] is not None):
        for column in ("input", "reconstruction", "mask", "edit", "smile_-3", "smile_+3"):
            assert _image(table, row[column]).shape[:2] == (32, 32), column
        assert set(row["mask"]["masks"]) == {"prediction", "ground_truth"}
    means = summary(path)
    assert means["test_mean/psnr"] == pytest.approx(np.mean([r["psnr"] for r in rows]))
    assert config(path)["model"]["method"] == "ood_blend"
    # the README's picture of the table, drawn from the same logged files
    from experiments.wandb_table_picture import draw

    picture = Image.open(draw(tmp_path / "run", tmp_path / "table.png", rows=2))
    assert picture.size[0] > picture.size[1] > 100


def test_stage2_validation_and_test_tables_have_pictures(files, compose_cfg, tmp_path, monkeypatch):
    """`+exp=ood_blend` through run.py: a validation table (input / reconstruction / mask and stage 2's other
    pictures) at each validation, and the test table with the edit."""
    overrides = ["+exp=ood_blend", *_synthfaces(tmp_path, 4), f"model.encoder_checkpoint={files['encoder']}",
                 f"model.edit.classifier={files['classifier']}", f"model.edit.direction={files['direction']}",
                 "model.level_milestones=[0,1]", "trainer.max_steps=2", "trainer.val_check_interval=2",
                 "trainer.limit_val_batches=1", "+trainer.enable_model_summary=false",
                 "callbacks.wandb_metric_table.val_pictures=2", "callbacks.wandb_metric_table.thumbnail=16"]
    path = _run(compose_cfg, overrides, tmp_path, monkeypatch)
    [val] = logged_tables(path, "val/per_image")
    assert val["columns"][0] == "name" and "psnr" in val["columns"] and "mask_mean" in val["columns"]
    assert {"input", "reconstruction", "mask", "stage1", "generated"} <= set(val["columns"])
    assert len(val["data"]) == 2
    row = dict(zip(val["columns"], val["data"][0]))
    assert _image(val, row["reconstruction"]).shape == (16, 16, 3)
    assert set(row["mask"]["masks"]) == {"prediction"}  # clean validation images: no ground truth
    [test] = logged_tables(path, "test/per_image")
    assert {"input", "reconstruction", "mask", "edit", "stage1_edit"} <= set(test["columns"])
    assert len(test["data"]) == 4
    row = dict(zip(test["columns"], test["data"][0]))
    assert set(row["mask"]["masks"]) == {"prediction", "ground_truth"}  # the OOD test twins have one


def test_stage1_validation_and_test_tables_have_pictures(compose_cfg, make_images, tmp_path, monkeypatch):
    """`+exp=e4e` through run.py (16 px): a validation table with input / reconstruction at each validation, and the
    test table (images without a ground-truth mask: no mask column)."""
    from networks.checkpoints import export_generator
    from networks.stylegan2 import Generator

    torch.manual_seed(0)
    g = Generator(16, style_dim=32, n_mlp=2, channel_multiplier=1, channel_max=32)
    generator = export_generator(tmp_path / "generator.pt", g, g.mean_latent(256, seed=0).reshape(-1))
    make_images(tmp_path / "images", [f"{i}.png" for i in range(6)], size=(16, 16))
    overrides = ["+exp=e4e", "data=image_folder", f"data.root={tmp_path / 'images'}", "generator.size=16",
                 "data.batch_size=2", "data.num_workers=0", "data.val_count=2",
                 f"model.generator_checkpoint={generator}",
                 "model.encoder.width=0.25", "model.encoder.units=[1,1,1,1]", "logger=wandb", "trainer=cpu",
                 "trainer.max_steps=4", "trainer.val_check_interval=2", "trainer.limit_val_batches=1",
                 "trainer.enable_progress_bar=false", "+trainer.enable_model_summary=false",
                 "callbacks.wandb_metric_table.val_pictures=2"]
    path = _run(compose_cfg, overrides, tmp_path, monkeypatch)
    tables = logged_tables(path, "val/per_image")
    assert len(tables) == 2  # steps 2 and 4
    for table in tables:
        assert table["columns"][0] == "name" and table["columns"][-2:] == ["input", "reconstruction"]
        assert len(table["data"]) == 2
        assert _image(table, table["data"][0][-1]).shape == (16, 16, 3)
    [test] = logged_tables(path, "test/per_image")
    assert test["columns"][-2:] == ["input", "reconstruction"] and len(test["data"]) == 2
