"""experiments/refit_synthfaces.sh: its argument checks (the steps it chains are tested where they live)."""
import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "refit_synthfaces.sh"


def run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=60)


def test_usage_without_arguments():
    result = run_script()
    assert result.returncode == 2 and "GENERATOR.pt OUT_DIR" in result.stderr


def test_missing_generator_is_named(tmp_path):
    result = run_script(str(tmp_path / "nope.pt"), str(tmp_path / "out"))
    assert result.returncode == 2 and f"generator file {tmp_path / 'nope.pt'} does not exist" in result.stderr
    assert not (tmp_path / "out").exists()  # nothing started


def test_unknown_perceptual_loss_is_refused(tmp_path):
    generator = tmp_path / "generator.pt"
    generator.write_bytes(b"")
    result = run_script(str(generator), str(tmp_path / "out"), "vgg")
    assert result.returncode == 2 and "perceptual must be synthfaces or random, got 'vgg'" in result.stderr
