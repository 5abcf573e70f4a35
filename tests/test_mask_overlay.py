"""W&B callbacks read back from offline runs: mask overlays (colours, PNG files, mask layers) and metric tables."""
import json
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from PIL import Image

from callbacks.mask_overlay import MaskOverlay, overlay
from experiments.utils.wandb_offline import history, run_file, summary

pytestmark = pytest.mark.usefixtures("single_thread")


def test_overlay_tints_prediction_red_and_truth_green():
    images = torch.zeros(1, 3, 4, 4)
    pred = torch.zeros(1, 1, 4, 4)
    gt = torch.zeros(1, 1, 4, 4)
    pred[..., 0, :] = 1
    gt[..., :, 0] = 1
    out = (overlay(images, pred, gt) + 1) / 2
    r, g, b = out[0, :, 0, 1], out[0, :, 1, 0], out[0, :, 0, 0]
    assert r[0] > r[1] and r[0] > r[2]          # prediction only: red
    assert g[1] > g[0] and g[1] > g[2]          # truth only: green
    assert b[0] > 0.4 and b[1] > 0.4 and b[2] < b[0]  # both: yellow (red + green)
    torch.testing.assert_close(out[0, :, 3, 3], torch.full((3,), 0.5))  # untouched pixel


class _Evaluated(pl.LightningModule):
    """What an inversion stage holds after testing: a mask grid and a per-image metric table."""

    def __init__(self):
        super().__init__()
        from lightning_modules.metrics import MetricTable

        self.layer = torch.nn.Linear(1, 1)
        mask, gt = torch.zeros(2, 1, 16, 16), torch.zeros(2, 1, 16, 16)
        mask[0, :, 4:10, 4:10] = 0.9
        mask[1, :, 2:5, 2:12] = 0.8
        gt[0, :, 8:, :] = 1
        gt[1, :, :, 8:] = 1
        self.grid_batch = {"input": torch.rand(2, 3, 16, 16) * 2 - 1, "mask": mask, "ood_mask": gt}
        self.test_table = MetricTable()
        self.test_table.add(["a", "b"], {"psnr": torch.tensor([20.0, 30.0]), "iou@0.5": torch.tensor([0.5, float("nan")])})

    def test_step(self, batch, batch_idx):
        return None


def offline_test_run(tmp_path, monkeypatch, callback) -> Path:
    """``trainer.test`` of ``_Evaluated`` with ``callback`` and an offline W&B logger; returns the W&B run dir."""
    from pytorch_lightning.loggers import WandbLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    logger = WandbLogger(project="test", save_dir=str(tmp_path), offline=True)
    trainer = pl.Trainer(accelerator="cpu", logger=logger, callbacks=[callback], enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=str(tmp_path))
    trainer.test(_Evaluated(), torch.utils.data.DataLoader(torch.zeros(1, 1)), verbose=False)
    run_dir = Path(logger.experiment.dir).parent
    logger.experiment.finish()
    return run_dir


def test_callback_writes_png_and_wandb_mask_layers(tmp_path, monkeypatch):
    run_dir = offline_test_run(tmp_path, monkeypatch, MaskOverlay(run_dir=str(tmp_path)))
    png = tmp_path / "masks" / "test_step_000000.png"
    width, height = Image.open(png).size  # the 2 x 2 grid of 16 px tiles, row labels on the left, a legend below
    assert width > 2 * 16 + 3 * 2 and height > 2 * 16 + 3 * 2
    layers = sorted((run_dir / "files" / "media" / "images" / "mask").rglob("*.mask.png"))
    assert len(layers) == 4  # prediction + ground truth for each of the two images (distinct masks)
    assert all(set(Image.open(f).getdata()) == {0, 1} for f in layers)
    assert len(list((run_dir / "files" / "media" / "images" / "test").glob("masks_*.png"))) == 2
    # read the offline run back: one history row with two images, each with both mask layers
    row = history(run_file(run_dir))[0]
    assert row["test/masks/_type"] == "images/separated" and row["test/masks/count"] == 2
    assert [set(m) for m in row["test/masks/all_masks"]] == [{"prediction", "ground_truth"}] * 2
    assert all((run_dir / "files" / layer["path"]).is_file() for m in row["test/masks/all_masks"] for layer in m.values())


def test_wandb_metric_table_and_summary_read_back(tmp_path, monkeypatch):
    from callbacks.wandb_tables import WandbMetricTable

    path = run_file(offline_test_run(tmp_path, monkeypatch, WandbMetricTable()))
    run_dir = path.parent
    row = next(r for r in history(path) if "test/per_image/_type" in r)
    assert row["test/per_image/_type"] == "table-file" and row["test/per_image/nrows"] == 2
    table = json.loads((run_dir / "files" / row["test/per_image/path"]).read_text())
    assert table["columns"] == ["name", "psnr", "iou@0.5"]
    assert table["data"] == [["a", 20.0, 0.5], ["b", 30.0, None]]
    means = summary(path)
    assert means["test_mean/psnr"] == 25.0 and means["test_mean/iou@0.5"] == 0.5
