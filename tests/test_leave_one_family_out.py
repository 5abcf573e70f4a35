"""experiments/leave_one_family_out.py: each family scored by a choice made on the other families only."""
import csv
import json

import pytest

from experiments.leave_one_family_out import (Floor, main, pooled, read_families, read_table,
                                              select_per_family)

FAMILIES = {"a1": "hand", "a2": "hand", "b1": "text", "b2": "text", "c1": "hat", "c2": "hat"}


def table(psnr_by_family, edit=0.5):
    """A per-image table: psnr per family (both images), edit success ``edit`` everywhere."""
    return {n: {"psnr": float(psnr_by_family[f]), "edit_success": edit} for n, f in FAMILIES.items()}


def test_the_held_out_family_takes_no_part_in_its_choice():
    # "narrow" wins on hand by far, loses a little elsewhere: pooled over all images it would win everywhere
    narrow = table({"hand": 40, "text": 20, "hat": 20})
    broad = table({"hand": 21, "text": 22, "hat": 22})
    choices = {c.family: c for c in select_per_family({"narrow": narrow, "broad": broad}, FAMILIES, "psnr")}
    assert choices["hand"].chosen == "broad"          # chosen on text + hat, where broad is better
    assert choices["hand"].value == 21.0              # ... and scored on hand with broad's values
    assert choices["text"].chosen == "narrow"         # chosen on hand + hat: (40 + 20) / 2 > 21.5
    assert choices["text"].selection == {"narrow": 30.0, "broad": 21.5}
    assert choices["hat"].held_out == {"narrow": 20.0, "broad": 22.0}
    assert pooled(list(choices.values())) == pytest.approx((21 + 20 + 20) / 3)
    assert pooled(list(choices.values()), "broad") == pytest.approx((21 + 22 + 22) / 3)


def test_minimize_and_images_outside_any_table_are_ignored():
    low = table({"hand": 1, "text": 1, "hat": 1})
    high = table({"hand": 2, "text": 2, "hat": 2})
    high["extra"] = {"psnr": -100.0, "edit_success": 0.5}  # not in every table: ignored
    fams = dict(FAMILIES, extra="sticker")
    choices = select_per_family({"high": high, "low": low}, fams, "psnr", maximize=False)
    assert {c.family for c in choices} == {"hand", "text", "hat"}
    assert all(c.chosen == "low" for c in choices)


def test_floor_relative_to_the_reference_and_default_when_none_passes():
    sharp = table({"hand": 30, "text": 30, "hat": 30}, edit=0.2)
    soft = table({"hand": 25, "text": 25, "hat": 25}, edit=0.5)
    reference = table({"hand": 0, "text": 0, "hat": 0}, edit=0.5)
    floor = Floor("edit_success", 0.9, reference)
    choices = select_per_family({"sharp": sharp, "soft": soft}, FAMILIES, "psnr", floor=floor, also=["edit_success"])
    assert all(c.chosen == "soft" and c.admissible == ["soft"] for c in choices)
    assert all(c.also == {"edit_success": 0.5} for c in choices) and pooled(choices, key="edit_success") == 0.5
    assert choices[0].floor_limit == pytest.approx(0.45) and choices[0].floor_values["sharp"] == 0.2
    strict = Floor("edit_success", 2.0, reference)   # nobody reaches 1.0: the default is kept
    choices = select_per_family({"sharp": sharp, "soft": soft}, FAMILIES, "psnr", floor=strict, default="sharp")
    assert all(c.chosen == "sharp" and c.admissible == [] for c in choices)


def test_bad_arguments_are_named():
    one = table({"hand": 1, "text": 1, "hat": 1})
    with pytest.raises(ValueError, match="at least two"):
        select_per_family({"x": one}, FAMILIES, "psnr")
    with pytest.raises(ValueError, match="default 'z' is not a candidate"):
        select_per_family({"x": one, "y": one}, FAMILIES, "psnr", default="z")
    with pytest.raises(ValueError, match="no column 'iou@0.5'"):
        select_per_family({"x": one, "y": one}, FAMILIES, "iou@0.5")


def write_csv(path, rows):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_cli_reads_csvs_and_meta_and_writes_the_table(tmp_path, capsys):
    data = tmp_path / "synthfaces"
    (data / "ood").mkdir(parents=True)
    (data / "ood" / "meta.json").write_text(json.dumps({n: {"family": f} for n, f in FAMILIES.items()}))
    assert read_families(data) == FAMILIES
    a = write_csv(tmp_path / "a.csv", [{"name": n, "iou@0.5": 0.9 if f == "hand" else 0.1} for n, f in FAMILIES.items()])
    b = write_csv(tmp_path / "b.csv", [{"name": n, "iou@0.5": 0.3} for n in FAMILIES])
    assert read_table(a)["a1"] == {"iou@0.5": 0.9}
    out = tmp_path / "lofo.md"
    choices = main(["--metric", "iou@0.5", "--candidate", f"a={a}", "--candidate", f"b={b}", "--data", str(data),
                    "--out", str(out), "--also", "iou@0.5"])
    assert [(c.family, c.chosen) for c in choices] == [("hand", "b"), ("hat", "a"), ("text", "a")]
    text = out.read_text()
    assert "| hand | 2 | b | 0.3 | 0.3 | 0.9 | 0.3 |" in text
    assert "| **all, each family held out** | 6 | – | **0.1667** | **0.1667** | 0.3667 | 0.3 |" in text
    assert text.strip() in capsys.readouterr().out


def test_cli_errors_name_the_file_or_argument(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("psnr\n1\n")
    with pytest.raises(SystemExit, match="bad.csv: not a per-image table"):
        read_table(bad)
    with pytest.raises(SystemExit, match="missing.csv: cannot read"):
        read_table(tmp_path / "missing.csv")
    with pytest.raises(SystemExit, match="ood/meta.json: no SynthFaces"):
        read_families(tmp_path)
    with pytest.raises(SystemExit, match="expected NAME=PATH"):
        main(["--metric", "psnr", "--candidate", "x", "--candidate", "y=z"])
