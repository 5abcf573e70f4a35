"""experiments/evaluate_generator.py: FID table and sample grid for a generator file."""
import pytest
import torch
from PIL import Image

from datamodules.synthfaces import write_dataset
from experiments.evaluate_generator import main
from networks.checkpoints import export_generator
from networks.stylegan2 import Generator

pytestmark = pytest.mark.usefixtures("single_thread")


def test_reports_fid_next_to_baselines_and_writes_grid(tmp_path, capsys):
    data = write_dataset(tmp_path / "sf", n=60, size=32, seed=0, n_eval=12, log=lambda _: None)
    torch.manual_seed(0)
    g = Generator(32, style_dim=16, n_mlp=1, channel_max=16)
    path = export_generator(tmp_path / "generator.pt", g, g.mean_latent(64, seed=0))
    results = main([str(path), "--n", "12", "--data-root", str(data), "--grid", str(tmp_path / "grid.png")])
    out = capsys.readouterr().out
    assert "| generator (12 samples) vs test |" in out
    fid_g, fid_blur, fid_floor = results.values()
    assert fid_g > fid_floor >= 0 and fid_blur > 0  # an untrained generator is far from the data
    assert Image.open(tmp_path / "grid.png").size[0] > 8 * 32
