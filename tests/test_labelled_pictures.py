"""Pictures people can read: the edit grid with column headers (edit strengths) and row labels, and the mask overlay
with row labels and a colour legend, in the saved PNG files (PIL ImageDraw, built-in bitmap font)."""
import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from PIL import Image

from callbacks.edit_grid import EditGrid, column_labels, labelled_picture, layout, row_labels
from callbacks.images import add_legend, grid_to_pil, label_grid, make_grid, wrap_text
from callbacks.mask_overlay import LEGEND, MaskOverlay, labelled_overlay

WHITE, BLACK = (255, 255, 255), (0, 0, 0)


def rows_of(n_images=2, k=3, size=16):
    return {"e4e (stage 1)": torch.full((k + 1, n_images, 3, size, size), -0.5),
            "dhr (stage 3)": torch.full((k + 1, n_images, 3, size, size), 0.5)}


def dark_pixels(array):
    return int((array.max(axis=-1) < 80).sum())


def test_wrap_text_fits_the_width():
    assert wrap_text("smile +1.5", 64) == ["smile +1.5"]  # 10 characters x 6 px
    assert wrap_text("ood_blend (stage 2)", 64) == ["ood_blend", "(stage 2)"]
    assert all(len(line) * 6 <= 30 for line in wrap_text("averyveryverylongword", 30))


def test_edit_grid_picture_has_header_band_and_row_labels():
    strengths = [-3.0, 0.0, 3.0]
    rows = rows_of(n_images=2, k=3)
    plain = grid_to_pil(make_grid(layout(strengths, rows), nrow=4))
    picture = labelled_picture("smile", strengths, rows)
    assert column_labels(strengths) == ["input", "-3", "0", "+3"]
    assert row_labels(list(rows), 2) == ["#1 e4e (stage 1)", "#1 dhr (stage 3)", "#2 e4e (stage 1)",
                                         "#2 dhr (stage 3)"]
    assert row_labels(list(rows), 1) == ["e4e (stage 1)", "dhr (stage 3)"]
    assert picture.width > plain.width and picture.height > plain.height  # larger than the unlabelled grid
    top, left = picture.height - plain.height, picture.width - plain.width
    array = np.asarray(picture)
    np.testing.assert_array_equal(array[top:, left:], np.asarray(plain))  # the grid itself is unchanged
    header, band = array[:top, left:], array[top:, :left]
    assert top >= 2 * 11 and dark_pixels(header) > 50  # title line + one line of column headers, with text
    assert dark_pixels(band) > 100  # four row labels
    # every column header is drawn over its own column of tiles
    for j in range(4):
        x0 = left + 2 + j * 18
        assert dark_pixels(array[:top, x0:x0 + 16]) > 0, j
    # text is black on white: only those two colours (and the grey of the bitmap font's anti-aliasing: none)
    assert set(map(tuple, header.reshape(-1, 3))) <= {WHITE, BLACK}


def test_edit_grid_callback_writes_the_labelled_png(tmp_path):
    callback = EditGrid(run_dir=str(tmp_path), tile_size=None)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=str(tmp_path))
    grids = {"smile": {"strengths": [-1.0, 0.0, 1.0], "rows": rows_of(n_images=1, k=3, size=16)}}
    path, = callback.write(trainer, grids, "test")
    saved = Image.open(path)
    assert saved.size == labelled_picture("smile", [-1.0, 0.0, 1.0], grids["smile"]["rows"]).size
    assert saved.height > 2 * 18 + 2 and saved.width > 4 * 18 + 2


def test_label_grid_without_labels_is_the_picture():
    plain = Image.new("RGB", (40, 30), (9, 9, 9))
    assert np.array_equal(np.asarray(label_grid(plain, (16, 16))), np.asarray(plain))


def test_mask_overlay_picture_has_row_labels_and_a_colour_legend():
    images = torch.zeros(2, 3, 16, 16)
    pred, gt = torch.zeros(2, 1, 16, 16), torch.zeros(2, 1, 16, 16)
    pred[:, :, :8] = 1
    gt[:, :, 4:12] = 1
    plain = grid_to_pil(make_grid(torch.cat([images, images]), nrow=2))
    picture = labelled_overlay(images, pred, gt)
    array = np.asarray(picture)
    assert picture.width > plain.width and picture.height > plain.height
    colours = set(map(tuple, array[plain.height:].reshape(-1, 3)))  # the legend band below the grid
    assert {(255, 0, 0), (0, 255, 0), (255, 255, 0)} <= colours  # red, green and yellow swatches
    assert [text for _, text in LEGEND] == ["predicted OOD", "true OOD", "both"]
    assert dark_pixels(array[:plain.height, :picture.width - plain.width]) > 20  # "input" / "OOD masks" labels
    # without ground truth only the prediction is in the legend
    no_gt = np.asarray(labelled_overlay(images, pred))
    legend = set(map(tuple, no_gt[plain.height:].reshape(-1, 3)))
    assert (255, 0, 0) in legend and (0, 255, 0) not in legend and (255, 255, 0) not in legend


def test_legend_wraps_and_widens_for_a_narrow_picture():
    narrow = Image.new("RGB", (20, 20), WHITE)
    out = add_legend(narrow, LEGEND)
    assert out.width >= 10 + 4 + 6 * len("predicted OOD") and out.height > 20 + 3 * 11  # one entry per line


@pytest.mark.parametrize("with_gt", [True, False])
def test_mask_overlay_callback_saves_the_labelled_png(tmp_path, with_gt):
    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.grid_batch = {"input": torch.zeros(2, 3, 16, 16), "mask": torch.ones(2, 1, 16, 16)}
            if with_gt:
                self.grid_batch["ood_mask"] = torch.ones(2, 1, 16, 16)

        def test_step(self, batch, batch_idx):
            return None

    trainer = pl.Trainer(accelerator="cpu", logger=False, callbacks=[MaskOverlay(run_dir=str(tmp_path))],
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path))
    trainer.test(Module(), torch.utils.data.DataLoader(torch.zeros(1, 1)), verbose=False)
    saved = np.asarray(Image.open(tmp_path / "masks" / "test_step_000000.png"))
    legend = set(map(tuple, saved[2 * 18 + 2:].reshape(-1, 3)))
    assert ((255, 255, 0) in legend) == with_gt and (255, 0, 0) in legend
