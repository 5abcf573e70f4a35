"""experiments/evaluate_stage1.py (encoder vs optimisation table) and the edit-success metric."""
import json

import pytest
import torch

from datamodules.synthfaces import write_dataset
from experiments.evaluate_stage1 import main
from lightning_modules.edit_metrics import attribute_change, ood_preservation
from networks.synthfaces_nets import AttributeClassifier
from tests.helpers.tiny_stage1 import export_tiny_stage1

pytestmark = pytest.mark.usefixtures("single_thread")


def test_table_has_both_methods_and_per_image_files(tmp_path, capsys):
    data = write_dataset(tmp_path / "sf", n=40, size=32, seed=0, n_eval=6, log=lambda _: None)
    path = export_tiny_stage1(tmp_path / "encoder.pt", size=32, style_dim=16, n_mlp=1, channel_multiplier=2,
                              channel_max=16).path
    out = tmp_path / "report" / "stage1.md"
    results = main(["--encoder", str(path), "--data", str(data), "--n", "6", "--batch", "4",
                    "--projection-n", "2", "--projection-steps", "3", "--direction", "", "--out", str(out)])
    text = capsys.readouterr().out
    assert "| Encoder4Editing | 6 |" in text and "| optimisation (w+, 3 steps) | 2 |" in text
    assert "lpips-random" in text  # no backbone file given: the column says so
    rows = results["rows"]
    assert rows["Encoder4Editing"]["n"] == 6 and 0 < rows["Encoder4Editing"]["psnr"] < 60
    assert out.read_text().startswith("Stage one on 6 held-out")
    assert len((out.parent / "stage1_Encoder4Editing.csv").read_text().strip().splitlines()) == 7  # header + 6
    assert json.loads(out.with_suffix(".json").read_text())["rows"]["Encoder4Editing"]["n"] == 6



def test_validation_split_scores_the_validation_images(tmp_path, capsys):
    data = write_dataset(tmp_path / "sf", n=40, size=32, seed=0, n_eval=6, log=lambda _: None)
    path = export_tiny_stage1(tmp_path / "encoder.pt", size=32, style_dim=16, n_mlp=1, channel_multiplier=2,
                              channel_max=16).path
    out = tmp_path / "report" / "val.md"
    main(["--encoder", str(path), "--data", str(data), "--split", "val", "--n", "3", "--batch", "4",
          "--projection-n", "0", "--direction", "", "--out", str(out)])
    assert "held-out clean SynthFaces val images" in capsys.readouterr().out
    val = sorted(json.loads((data / "splits.json").read_text())["val"])[:3]
    names = [line.split(",")[0] for line in (out.parent / "val_Encoder4Editing.csv").read_text().splitlines()[1:]]
    assert [int(name.rsplit("/", 1)[-1]) for name in names] == val  # the validation images, not the test split

def test_attribute_change_and_ood_preservation():
    torch.manual_seed(0)
    clf = AttributeClassifier(resolution=16, widths=(4, 8), feature_dim=8, attributes=["smile", "glasses"])
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    same = attribute_change(clf, x, x, "smile")
    assert same["change"].abs().max() == 0 and same["success"].sum() == 0
    with pytest.raises(ValueError, match="no 'age' head"):
        attribute_change(clf, x, x, "age")
    mask = torch.zeros(3, 1, 16, 16)
    mask[:, :, :8] = 1
    edited = x.clone()
    edited[:, :, 8:] = 0  # changed only outside the mask
    assert torch.isinf(ood_preservation(x, edited, mask)).all() or (ood_preservation(x, edited, mask) > 100).all()
