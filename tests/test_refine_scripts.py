"""experiments/benchmark_refine.py and experiments/calibrate_segmentation.py on a tiny rendered dataset."""
import pytest
import torch

from datamodules.synthfaces import write_dataset
from networks.encoder_checkpoints import export_e4e_checkpoint
from networks.encoders import build_encoder
from networks.stylegan2 import Generator
from networks.synthfaces_nets import FaceParser, save_aux_net

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("scripts")
    data = write_dataset(root / "sf", n=40, size=32, seed=0, n_eval=6, log=lambda _: None)
    torch.manual_seed(0)
    g = Generator(32, style_dim=16, n_mlp=1, channel_max=16)
    enc = build_encoder("e4e", n_styles=g.n_latent, style_dim=16, input_size=32, width=0.25, units=[1, 1, 1, 1])
    latent_avg = g.mean_latent(64, seed=0).reshape(1, -1).repeat(g.n_latent, 1)
    encoder = export_e4e_checkpoint(root / "encoder.pt", enc, g, latent_avg)
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
