"""SynthFaces: renderer determinism/shapes/labels/anti-aliasing/part maps, OOD corruptions and
their masks, the dataset writer (layout, content, no-op re-run, resume) and the CLI."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import datamodules.synthfaces.render as render_mod
from datamodules.synthfaces import (FACTOR_NAMES, FACTORS, NUM_PARTS, OOD_FAMILIES, PART_CLASSES,
                                    corrupt_batch, render_batch, render_factors, sample_factors)
from datamodules.synthfaces.__main__ import main as cli_main
from datamodules.synthfaces.parts import PART_INDEX
from datamodules.synthfaces.preview import save_preview
from datamodules.synthfaces.sdf import coverage
from datamodules.synthfaces.writer import META_FILE, _Layout, chunk_factors, write_dataset

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def faces64():
    return render_batch(7, 48, 64)


def test_same_seed_same_images_and_prefix_property():
    a = render_batch(123, 6, 64)
    b = render_batch(torch.Generator().manual_seed(123), 6, 64)
    assert torch.equal(a["images"], b["images"]) and torch.equal(a["parts"], b["parts"])
    assert not torch.equal(a["images"], render_batch(124, 6, 64)["images"])
    first = render_batch(123, 3, 64)  # image i does not depend on the batch size
    assert torch.equal(first["images"], a["images"][:3])
    assert all(torch.equal(first["labels"][k], a["labels"][k][:3]) for k in FACTOR_NAMES)


@pytest.mark.parametrize("size", [32, 64, 128])
def test_shapes_dtypes(size):
    out = render_batch(0, 5, size)
    assert out["images"].shape == (5, 3, size, size) and out["images"].dtype == torch.uint8
    assert out["parts"].shape == (5, size, size) and out["parts"].dtype == torch.int64
    assert set(out["labels"]) == set(FACTOR_NAMES)
    assert all(v.shape == (5,) for v in out["labels"].values())
    assert 0 <= int(out["parts"].min()) and int(out["parts"].max()) < NUM_PARTS
    flt = render_batch(0, 5, size, return_float=True)["images"]
    assert flt.dtype == torch.float32 and 0.0 <= float(flt.min()) and float(flt.max()) <= 1.0
    assert torch.equal((flt * 255 + 0.5).to(torch.uint8), out["images"])


def test_bad_size_is_rejected():
    with pytest.raises(ValueError, match="power of two from 32 to 256"):
        render_batch(0, 2, 48)


def test_label_ranges_and_categories():
    f = sample_factors(0, 3000)
    for spec in FACTORS:
        v = f[spec.name]
        assert float(v.min()) >= spec.low and float(v.max()) <= spec.high, spec.name
        if spec.kind == "int":
            assert v.dtype == torch.int64
            assert set(v.tolist()) == set(range(len(spec.categories))), spec.name  # every category occurs
        else:
            assert v.dtype == torch.float32 and float(v.max() - v.min()) > 0.8 * (spec.high - spec.low), spec.name
    closed = float((f["mouth_open"] == 0).float().mean())
    assert 0.45 < closed < 0.55


def test_coverage_is_a_one_pixel_ramp():
    d = torch.tensor([-1.0, -0.5, -0.25, 0.0, 0.25, 0.5, 1.0])
    assert coverage(d, 1.0).tolist() == [1.0, 1.0, 0.75, 0.5, 0.25, 0.0, 0.0]


def test_edges_are_anti_aliased(faces64):
    # Along rows, a pixel between background and foreground pixels should mostly have a value
    # strictly between theirs (a hard-edged renderer would give it one side's value).
    lum = faces64["images"].float().mean(1)
    parts = faces64["parts"]
    a, b, c = lum[..., :-2], lum[..., 1:-1], lum[..., 2:]
    edge = (parts[..., :-2] == 0) & (parts[..., 2:] != 0) & ((a - c).abs() > 30)
    between = (b > torch.minimum(a, c) + 1) & (b < torch.maximum(a, c) - 1)
    assert int(edge.sum()) > 200
    assert float(between[edge].float().mean()) > 0.4  # ~0.64 here; ~0.1 with hard edges


def test_part_maps_have_every_class_where_expected(faces64):
    parts, labels = faces64["parts"], faces64["labels"]
    assert set(torch.unique(parts).tolist()) == set(range(NUM_PARTS))
    per_image = [set(torch.unique(p).tolist()) for p in parts]
    for name in ("background", "skin", "brow", "nose", "lips", "mouth"):
        assert all(PART_INDEX[name] in s for s in per_image), name
    for s, glasses, style in zip(per_image, labels["glasses"].tolist(), labels["hair_style"].tolist()):
        assert (PART_INDEX["glasses"] in s) == (glasses > 0)
        assert (PART_INDEX["eye"] in s) == (glasses != 3)  # sunglasses (3) hide the eyes
        assert (PART_INDEX["hair"] in s) == (style != 0)  # style 0 is bald
    assert PART_CLASSES[0] == "background" and len(PART_CLASSES) == NUM_PARTS


def test_smile_moves_the_mouth_corners():
    f = {k: v[:1].repeat(2) for k, v in sample_factors(3, 1).items()}
    f["smile"] = torch.tensor([0.0, 1.0])
    f["mouth_open"] = torch.zeros(2)
    f["roll"] = torch.zeros(2)
    lips = render_factors(f, 128)["parts"] == PART_INDEX["lips"]
    rows = torch.arange(128).view(1, 128, 1).expand_as(lips)
    cols = torch.where(lips.any(1), torch.arange(128), -1)
    right = cols.max(1).values  # the rightmost lip column: a mouth corner
    corner_row = [rows[i][lips[i] & (torch.arange(128) >= right[i] - 1)].float().mean() for i in range(2)]
    centre_row = [rows[i][lips[i]].float().mean() for i in range(2)]
    # relative to the lips' mean row, the corner sits lower when frowning and higher when smiling
    assert corner_row[0] - centre_row[0] > 0 and corner_row[1] - centre_row[1] < -2


def test_windows_never_clip_shapes(monkeypatch):
    f = sample_factors(5, 200)
    windowed = render_factors(f, 64)
    monkeypatch.setattr(render_mod, "_USE_WINDOWS", False)
    full = render_factors(f, 64)
    assert torch.equal(windowed["images"], full["images"]) and torch.equal(windowed["parts"], full["parts"])


@pytest.mark.parametrize("family", OOD_FAMILIES)
def test_corruption_changes_exactly_its_mask(faces64, family):
    images, parts = faces64["images"][:12], faces64["parts"][:12]
    before = images.clone()
    bad, mask = corrupt_batch(images, parts, family, 0.6, 3)
    assert torch.equal(images, before)  # the clean twin is untouched
    assert bad.dtype == torch.uint8 and bad.shape == images.shape
    assert mask.dtype == torch.bool and mask.shape == parts.shape
    assert torch.equal((bad != images).any(1), mask)  # changed pixels == mask
    assert torch.equal(bad[~mask[:, None].expand_as(bad)], images[~mask[:, None].expand_as(images)])
    assert bool((mask.sum((1, 2)) > 0).all())
    again, mask2 = corrupt_batch(images, parts, family, 0.6, torch.Generator().manual_seed(3))
    assert torch.equal(again, bad) and torch.equal(mask2, mask)


@pytest.mark.parametrize("family", OOD_FAMILIES)
def test_severity_is_monotonic_in_mask_area(faces64, family):
    images, parts = faces64["images"][:16], faces64["parts"][:16]
    areas = torch.stack([corrupt_batch(images, parts, family, s, 9)[1].sum((1, 2)) for s in (0.2, 0.5, 1.0)])
    assert areas[0].sum() < areas[1].sum() < areas[2].sum()
    assert bool(((areas[1] >= areas[0]) & (areas[2] >= areas[1])).all())


def test_corruption_float_input_and_per_image_severity(faces64):
    flt = faces64["images"][:4].float() / 255.0
    bad, mask = corrupt_batch(flt, faces64["parts"][:4], "sticker", torch.tensor([0.2, 0.4, 0.8, 1.0]), 0)
    assert bad.dtype == torch.float32 and torch.equal((bad != flt).any(1), mask) and bool(mask.any())


def test_corruption_bad_inputs(faces64):
    images, parts = faces64["images"][:2], faces64["parts"][:2]
    with pytest.raises(ValueError, match="unknown OOD family 'rain'.*hand"):
        corrupt_batch(images, parts, "rain", 0.5, 0)
    with pytest.raises(ValueError, match=r"severity must lie in \(0, 1\]"):
        corrupt_batch(images, parts, "hand", 0.0, 0)
    with pytest.raises(ValueError, match="parts must be"):
        corrupt_batch(images, parts[:1], "hand", 0.5, 0)


def test_layout_names_and_subfolders(tmp_path):
    lay = _Layout(tmp_path, 70000)
    assert lay.rel("images", 0) == "images/00000/00000.png"
    assert lay.rel("parts", 1234) == "parts/01000/01234.png"
    assert lay.rel("ood/masks", 69999) == "ood/masks/69000/69999.png"
    assert _Layout(tmp_path, 123457).rel("images", 123456) == "images/123000/123456.png"


def _png(path):
    return np.asarray(Image.open(path))


def test_writer_layout_content_noop_and_resume(tmp_path):
    out = tmp_path / "ds"
    logs = []
    write_dataset(out, n=30, size=32, seed=1, n_eval=6, n_val=4, workers=2, log=logs.append)
    names = sorted(p.relative_to(out).as_posix() for p in (out / "images").rglob("*.png"))
    assert names == [f"images/00000/{i:05d}.png" for i in range(30)]
    assert len(list((out / "parts").rglob("*.png"))) == 30
    splits = json.loads((out / "splits.json").read_text())
    assert splits == {"train": list(range(20)), "val": list(range(20, 24)), "test": list(range(24, 30))}
    labels = json.loads((out / "labels.json").read_text())
    assert list(labels) == [f"{i:05d}" for i in range(30)] and set(labels["00007"]) == set(FACTOR_NAMES)
    meta = json.loads((out / META_FILE).read_text())
    assert meta["complete"] and meta["part_classes"] == list(PART_CLASSES) and meta["config"]["n"] == 30

    # Files hold exactly what the renderer produces for the dataset's chunk factors.
    ref = render_factors(chunk_factors(1, 0, 30), 32)
    assert np.array_equal(_png(out / "images/00000/00017.png"), ref["images"][17].permute(1, 2, 0).numpy())
    part_png = Image.open(out / "parts/00000/00017.png")
    assert part_png.mode == "P" and np.array_equal(np.asarray(part_png), ref["parts"][17].numpy())
    assert labels["00017"]["hair_style"] == int(ref["labels"]["hair_style"][17])

    ood = json.loads((out / "ood/meta.json").read_text())
    assert sorted(ood) == [f"{i:05d}" for i in range(24, 30)]
    assert [ood[k]["family"] for k in sorted(ood)] == list(OOD_FAMILIES)
    for entry in ood.values():
        bad, clean = _png(out / entry["image"]).astype(int), _png(out / entry["clean"]).astype(int)
        mask = _png(out / entry["mask"]) > 127
        assert np.array_equal((bad != clean).any(-1), mask) and mask.any()
        assert 0 < entry["severity"] <= 1

    # Same arguments into the complete directory: nothing is touched.
    files = sorted(p for p in out.rglob("*") if p.is_file())
    stamps = {p: p.stat().st_mtime_ns for p in files}
    logs.clear()
    write_dataset(out, n=30, size=32, seed=1, n_eval=6, n_val=4, log=logs.append)
    assert "nothing to do" in logs[0] and {p: p.stat().st_mtime_ns for p in files} == stamps

    # Interrupted run: missing files are recreated bit-identically, the rest is kept.
    lost = [out / "images/00000/00003.png", out / "parts/00000/00021.png", out / ood["00026"]["image"]]
    blobs = [p.read_bytes() for p in lost]
    for p in lost:
        p.unlink()
    meta["complete"] = False
    (out / META_FILE).write_text(json.dumps(meta))
    keep = out / "images/00000/00004.png"
    keep_stamp = keep.stat().st_mtime_ns
    write_dataset(out, n=30, size=32, seed=1, n_eval=6, n_val=4, log=logs.append)
    assert [p.read_bytes() for p in lost] == blobs and keep.stat().st_mtime_ns == keep_stamp
    assert json.loads((out / META_FILE).read_text())["complete"]

    # --verify repairs a directory marked complete.
    lost[0].unlink()
    write_dataset(out, n=30, size=32, seed=1, n_eval=6, n_val=4, verify=True, log=logs.append)
    assert lost[0].read_bytes() == blobs[0]

    with pytest.raises(ValueError, match="another config.*n: existing 30 vs requested 31"):
        write_dataset(out, n=31, size=32, seed=1, n_eval=6, n_val=4, log=logs.append)


def test_writer_refuses_foreign_directory_and_bad_split(tmp_path):
    (tmp_path / "something.txt").write_text("x")
    with pytest.raises(ValueError, match="not empty and has no synthfaces.json"):
        write_dataset(tmp_path, n=10, size=32, n_eval=2, log=lambda s: None)
    with pytest.raises(ValueError, match="n > n_eval \\+ n_val"):
        write_dataset(tmp_path / "new", n=10, size=32, n_eval=5, n_val=5, log=lambda s: None)


def test_cli_help_in_subprocess():
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    res = subprocess.run([sys.executable, "-m", "datamodules.synthfaces", "--help"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    for flag in ("--out", "--n", "--size", "--seed", "--n-eval", "--preview"):
        assert flag in res.stdout


def test_cli_writes_a_tiny_dataset_and_preview(tmp_path, capsys):
    assert cli_main(["--out", str(tmp_path / "d"), "--n", "8", "--size", "32", "--n-eval", "2",
                     "--families", "hand,text", "--severities", "0.5", "--quiet"]) == 0
    meta = json.loads((tmp_path / "d/ood/meta.json").read_text())
    assert [m["family"] for m in meta.values()] == ["hand", "text"]
    assert cli_main(["--out", str(tmp_path / "d"), "--n", "9", "--size", "32", "--n-eval", "2", "--quiet"]) == 2
    assert "another config" in capsys.readouterr().err
    path = save_preview(tmp_path / "grid.png", n=2, size=32, scale=1)
    w, h = Image.open(path).size
    assert h == (3 + 2 * len(OOD_FAMILIES)) * (32 + 2) and w > 2 * 32
