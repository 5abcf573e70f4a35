"""experiments/benchmark.py: the oracle row (DHR with the ground-truth mask) and the per-family tables and plot."""
import csv

import pytest
import torch
from PIL import Image

from datamodules.synthfaces.corrupt import OOD_FAMILIES
from experiments.benchmark import (HELD_OUT, ORACLE, family_markdown, family_means, family_plot,
                                   write_family_csv)
from lightning_modules.metrics import MetricTable
from tests.test_stage3 import files  # noqa: F401  (the fixture of tiny hand-offs)

pytestmark = pytest.mark.usefixtures("single_thread")


def synthetic_tables():
    """Two methods, two images per family of the six; psnr = 10 + family index (+ 1 for the oracle)."""
    names = {f"{k:05d}": OOD_FAMILIES[k % 6] for k in range(12)}
    tables = {}
    for offset, method in ((0.0, "dhr"), (1.0, ORACLE)):
        table = MetricTable()
        for name, fam in names.items():
            table.add([name], {"psnr": torch.tensor([10.0 + OOD_FAMILIES.index(fam) + offset]),
                               "iou@0.5": torch.tensor([0.5 + offset / 2]), "edit_success": torch.tensor([float("nan")])})
        tables[method] = table
    return tables, names


def test_per_family_tables_have_the_six_families(tmp_path):
    tables, names = synthetic_tables()
    per_family = family_means(tables, names)
    assert list(per_family["dhr"]) == list(OOD_FAMILIES)
    assert per_family["dhr"]["text"] == {"n": 2, "psnr": 12.0, "iou@0.5": 0.5}  # NaN edit success: no value
    assert per_family[ORACLE]["hat"]["psnr"] == 15.0 and per_family[ORACLE]["hat"]["iou@0.5"] == 1.0
    text = family_markdown(per_family)
    assert HELD_OUT in text and "is used in any training or calibration step" in text
    assert "Every family below is held out" in text
    tables_md = [block for block in text.split("### ")[1:]]
    assert [t.splitlines()[0] for t in tables_md] == ["PSNR per family", "mask IoU@0.5 per family"]  # others: none
    for block in tables_md:
        header = block.splitlines()[2]
        assert header == "| method | " + " | ".join(OOD_FAMILIES) + " |"
        rows = [r for r in block.splitlines()[4:] if r]
        assert [r.split(" | ")[0] for r in rows] == ["| dhr", "| dhr_oracle (DHR with the ground-truth mask)"]
    assert "| dhr | 10 | 11 | 12 | 13 | 14 | 15 |" in text
    path = write_family_csv(per_family, tmp_path / "families.csv")
    rows = list(csv.DictReader(open(path)))
    assert len(rows) == 12 and rows[2] == {"method": "dhr", "family": "text", "images": "2", "psnr": "12.0",
                                           "psnr_in": "", "psnr_out": "", "iou@0.5": "0.5", "edit_success": ""}
    plot = family_plot(per_family, tmp_path)
    assert plot.name == "by_family.png" and Image.open(plot).size == (960, 900)


def test_a_family_without_images_reads_a_dash():
    tables, names = synthetic_tables()
    names = {k: v for k, v in names.items() if v != "hand"}
    for t in tables.values():
        t.rows = [r for r in t.rows if r["name"] in names]
    per_family = family_means(tables, names)
    assert per_family["dhr"]["hand"] == {"n": 0}
    text = family_markdown(per_family)
    assert "Test images per family: hand 0, microphone 2," in text and "| dhr | – | 11 |" in text


def test_benchmark_oracle_row_and_family_outputs(files, tmp_path):  # noqa: F811
    from experiments.benchmark import main

    out = tmp_path / "report"
    result = main(["--methods", "e4e,dhr", "--oracle", "--n", "4", "--batch", "2", "--out", str(out), "--",
                   f"data.root={tmp_path / 'sf'}", "data.n_images=24", "data.n_eval=4", "data.render_size=64",
                   f"model.encoder_checkpoint={files['encoder']}", f"model.align_mask_checkpoint={files['align']}",
                   f"model.segmentation.parser={files['parser']}", "model.segmentation.coarse.steps=2",
                   "model.segmentation.superpixels.n_segments=20", "model.refine.weight_steps=1",
                   "model.refine.feature_steps=1", f"model.edit.direction={files['direction']}",
                   f"model.edit.classifier={files['classifier']}", f"model.edits.0.path={files['direction']}"])
    assert list(result["means"]) == ["e4e", "dhr", ORACLE]
    assert result["means"][ORACLE]["iou@0.5"] == pytest.approx(1.0)  # the oracle's mask is the ground truth
    lines = (out / "benchmark.md").read_text().splitlines()
    assert "--oracle" in lines[0]
    assert [ln.split(" | ")[0] for ln in lines[4:7]] == ["| e4e", "| dhr", "| dhr_oracle (DHR with the ground-truth mask)"]
    text = "\n".join(lines)
    assert "## Per corruption family" in text and HELD_OUT in text
    assert "| method | " + " | ".join(OOD_FAMILIES) + " |" in text
    # four test twins: the first four families, one image each; the last two have none
    assert "Test images per family: hand 1, microphone 1, text 1, sticker 1, hat 0, texture_bg 0." in text
    assert [p.name for p in result["plots"]] == ["quality_vs_time.png", "iou_by_family.png", "by_family.png"]
    assert (out / "families.csv").is_file()
