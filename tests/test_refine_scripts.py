"""experiments/benchmark_refine.py and experiments/calibrate_segmentation.py on a tiny rendered dataset."""
import pytest
import torch

from datamodules.synthfaces import write_dataset
from networks.synthfaces_nets import FaceParser, save_aux_net
from tests.helpers.tiny_stage1 import export_tiny_stage1
from tests.test_stage3 import files  # noqa: F401  (the fixture of tiny hand-offs)

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("scripts")
    data = write_dataset(root / "sf", n=40, size=32, seed=0, n_eval=6, log=lambda _: None)
    encoder = export_tiny_stage1(root / "encoder.pt", size=32, style_dim=16, n_mlp=1, channel_multiplier=2,
                                 channel_max=16).path
    parser = save_aux_net(root / "parser.pt", FaceParser(resolution=32, widths=(4, 4, 4, 4)))
    return dict(data=str(data), encoder=str(encoder), parser=str(parser))


def test_benchmark_refine_batched_equals_sequential(setup, capsys):
    from experiments.benchmark_refine import main

    results = main(["--data", setup["data"], "--encoder", setup["encoder"], "--batch", "3", "--weight-steps", "2",
                    "--feature-steps", "3", "--feature-resolution", "8"])
    text = capsys.readouterr().out
    assert "| one image at a time |" in text and "| batch of 3 |" in text
    torch.testing.assert_close(results["batched"][1], results["sequential"][1], rtol=1e-4, atol=1e-5)


def test_calibration_reports_every_scale(setup, capsys):
    from experiments.calibrate_segmentation import main

    result = main(["--data", setup["data"], "--encoder", setup["encoder"], "--parser", setup["parser"], "--n", "4",
                   "--steps", "2", "--n-segments", "10", "--scales", "0.05,0.1"])
    text = capsys.readouterr().out
    assert [r[0] for r in result["rows"]] == [0.05, 0.1] and result["best"] in (0.05, 0.1)
    assert "| 0.05" in text and "| 0.1" in text and all(0 <= r[1] <= 1 for r in result["rows"])


def test_calibration_with_the_domain_distance(setup, tmp_path, capsys):
    from experiments.calibrate_segmentation import main
    from networks.synthfaces_nets import AttributeClassifier

    classifier = save_aux_net(tmp_path / "classifier.pt", AttributeClassifier(resolution=32, widths=(4, 4, 4),
                                                                             feature_dim=8))
    result = main(["--data", setup["data"], "--encoder", setup["encoder"], "--parser", setup["parser"], "--n", "4",
                   "--steps", "2", "--n-segments", "10", "--scales", "0.05,0.5", "--lpips", "synthfaces",
                   "--classifier", str(classifier)])
    assert "Error map (lpips lpips-synthfaces)" in capsys.readouterr().out
    assert [r[0] for r in result["rows"]] == [0.05, 0.5]


def test_benchmark_report_runs_every_method_on_the_same_images(files, tmp_path, capsys):  # noqa: F811
    from experiments.benchmark import main

    out = tmp_path / "report"
    result = main(["--n", "4", "--batch", "2", "--out", str(out), "--",
                   f"data.root={tmp_path / 'sf'}", "data.n_images=24", "data.n_eval=4", "data.render_size=64",
                   f"model.encoder_checkpoint={files['encoder']}", f"model.align_mask_checkpoint={files['align']}",
                   f"model.segmentation.parser={files['parser']}", "model.segmentation.coarse.steps=2",
                   "model.segmentation.superpixels.n_segments=20", "model.refine.weight_steps=2",
                   "model.refine.feature_steps=2", "model.pti.steps=2", "model.feature_only.steps=2",
                   f"model.edit.direction={files['direction']}", f"model.edit.classifier={files['classifier']}",
                   f"model.edits.0.path={files['direction']}"])
    lines = (out / "benchmark.md").read_text().splitlines()
    assert lines[2].startswith("| method | PSNR | SSIM | MSE | PSNR in OOD")
    assert [ln.split(" | ")[0] for ln in lines[4:9]] == ["| e4e", "| pti", "| feature_only", "| ood_blend", "| dhr"]
    assert lines[9:11] == ["", "## Per corruption family"]
    assert set(result["means"]) == {"e4e", "pti", "feature_only", "ood_blend", "dhr"}
    assert all(len((out / f"{m}.csv").read_text().strip().splitlines()) == 5 for m in result["means"])
    assert [p.name for p in result["plots"]] == ["quality_vs_time.png", "iou_by_family.png", "by_family.png"]
    assert all(p.stat().st_size > 1000 for p in result["plots"])


def test_refine_calibration_reports_schedules_pti_and_feature_only_and_chooses_by_the_rule(files, tmp_path,  # noqa: F811
                                                                                          capsys):
    from datamodules.synthfaces import write_dataset
    from experiments.calibrate_refine import choose, main, parse_schedule

    data = write_dataset(tmp_path / "sf", n=24, size=64, seed=0, n_eval=4, log=lambda _: None)
    result = main(["--data", str(data), "--encoder", files["encoder"], "--direction", files["direction"],
                   "--classifier", files["classifier"], "--n", "3", "--batch", "2", "--feature-resolution", "8",
                   "--schedules", "2:1.5e-3:3,4:1e-3:4", "--pti-steps", "3", "--feature-only-steps", "3"])
    text = capsys.readouterr().out
    rows = result["rows"]
    assert [(r["method"], r["schedule"]) for r in rows] == [("dhr", "2:1.5e-3:3"), ("dhr", "4:1e-3:4"),
                                                            ("pti", "3:3e-4:0"), ("feature_only", "0:-:3")]
    assert all(r["psnr"] > 0 and 0 <= r["edit_success"] <= 1 for r in rows)
    assert result["best"] is choose(rows, 0.9)
    assert "| dhr" in text and "| pti | 3:3e-4:0 |" in text and "| feature_only | 0:-:3 |" in text
    # the rule: highest PSNR among the schedules that edit >= 0.9 x PTI; none -> keep the official schedule
    table = [{"method": "dhr", "schedule": "a", "psnr": 30.0, "edit_success": 0.2},
             {"method": "dhr", "schedule": "b", "psnr": 28.0, "edit_success": 0.5},
             {"method": "dhr", "schedule": "c", "psnr": 27.0, "edit_success": 0.6},
             {"method": "pti", "schedule": "p", "psnr": 26.0, "edit_success": 0.5}]
    assert choose(table, 0.9)["schedule"] == "b"
    assert choose(table[:1] + table[3:], 0.9) is None
    assert parse_schedule("350:3e-4:350") == {"weight_steps": 350, "weight_lr": 3e-4, "feature_steps": 350}
    with pytest.raises(ValueError, match="--schedules: '50:0:100'"):
        parse_schedule("50:0:100")
