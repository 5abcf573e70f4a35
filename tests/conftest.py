"""Shared pytest setup: offline environment, Hydra composition of experiments/configs, tiny image folders.

Environment for every test: the repository root on sys.path and in PROJECT_ROOT, no albumentations
update check, W&B `disabled` (a test that reads W&B output back sets WANDB_MODE=offline and
WANDB_DIR=tmp_path itself with monkeypatch).
"""
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / "experiments" / "configs"
os.environ.setdefault("PROJECT_ROOT", str(ROOT))
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from omegaconf import DictConfig, open_dict  # noqa: E402
from PIL import Image  # noqa: E402


@pytest.fixture
def compose_cfg(tmp_path):
    """Returns `compose(overrides=(), run_dir=None) -> DictConfig`, the config run.py would get.

    As under `@hydra.main` + run.py: the `hydra` node is removed from the returned config and registered
    with `HydraConfig`; its runtime output dir and `paths.run_dir` are `run_dir` (default `tmp_path/"run"`).
    """

    def _compose(overrides=(), run_dir=None) -> DictConfig:
        run_dir = Path(run_dir or tmp_path / "run")
        with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
            cfg = compose("config", overrides=list(overrides), return_hydra_config=True)
        with open_dict(cfg):
            cfg.hydra.runtime.output_dir = str(run_dir)
            cfg.paths.run_dir = str(run_dir)
            HydraConfig.instance().set_config(cfg)
            del cfg["hydra"]
        return cfg

    return _compose


@pytest.fixture
def make_images():
    """Returns `write(root, names, size=(w, h), mode="RGB", seed=0) -> list[Path]`: random images on disk.

    `names` are paths relative to `root` (sub-folders are created); the format follows the extension.
    """

    def _write(root, names, size=(24, 20), mode="RGB", seed=0):
        rng = np.random.default_rng(seed)
        paths = []
        for name in names:
            path = Path(root) / name
            path.parent.mkdir(parents=True, exist_ok=True)
            channels = {"L": 1, "RGB": 3, "RGBA": 4}[mode]
            pixels = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
            Image.fromarray(pixels[..., 0] if channels == 1 else pixels).save(path)
            paths.append(path)
        return paths

    return _write


@pytest.fixture(scope="module")
def single_thread():
    """Run a module's tests with one torch thread: tiny convolutions are ~10x faster on a shared
    2-core machine without OpenMP spinning. Use with ``pytestmark = pytest.mark.usefixtures("single_thread")``."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
