"""Checks of the user's inputs before anything is computed: each bad value gets one message naming the config key
or file and what is wrong (run.py prints it without a traceback)."""
from __future__ import annotations

import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any, Mapping, Optional

from omegaconf import DictConfig, OmegaConf

from experiments.utils.errors import UserError


def check_int(cfg: DictConfig, key: str, minimum: int) -> None:
    """``cfg.<key>``, when set, must be an integer >= ``minimum`` (Hydra passes ``data.batch_size=abc`` as a str)."""
    value = OmegaConf.select(cfg, key)
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise UserError(f"{key}={value!r}: must be an integer >= {minimum}.")


def invert_names(input_dir: Path) -> dict:
    """{result name: [files]} of ``mode=invert``'s images: the path relative to ``input`` without its extension,
    as ``datamodules.image_folder.ImageFolderDataset.name`` names them. Raises DataError naming ``input`` when the
    folder holds no image."""
    from datamodules.image_folder import list_images

    names = defaultdict(list)
    for path in list_images(input_dir, config_key="input"):
        names[path.relative_to(input_dir).with_suffix("").as_posix()].append(path.relative_to(input_dir).as_posix())
    return names


def check_invert_input(cfg: DictConfig) -> None:
    """``input`` is a folder of images whose names map to distinct output folders; ``masks``, when set, is a folder."""
    if not cfg.get("input"):
        raise UserError("mode=invert needs input=DIR: a folder of PNG / JPEG images (add align=true to align faces).")
    folder = Path(str(cfg.input)).expanduser()
    if folder.is_file():
        raise UserError(f"input={cfg.input} is a file; input= takes a folder: put the image in a folder of its own "
                        f"and pass that folder.")
    if not folder.is_dir():
        raise UserError(f"input={cfg.input}: no such folder.")
    clashes = {name: files for name, files in invert_names(folder).items() if len(files) > 1}
    if clashes:
        listed = "; ".join(" and ".join(files) for files in list(clashes.values())[:10])
        raise UserError(f"input={cfg.input}: {len(clashes)} name(s) would share one output folder (results are named "
                        f"after the file without its extension): {listed}. Rename or move one of each.")
    masks = cfg.get("masks")
    if masks and not Path(str(masks)).expanduser().is_dir():
        raise UserError(f"masks={masks}: no such folder (ground-truth OOD masks <masks>/<name>.png; masks=null for "
                        f"none).")


def check_writable(folder: Path, key: str) -> None:
    """Creates ``folder`` and writes a probe file in it; a UserError naming ``key`` if that fails."""
    folder = Path(folder).expanduser()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write_probe."):
            pass
    except OSError as err:
        raise UserError(f"{key}={folder} is not writable ({err.strerror or err}): choose another folder.") from None


def check_settings(writer: Any, redo: bool) -> list:
    """``mode=invert`` into a folder with results: those made with other settings are refused unless ``redo``
    (``overwrite=true``); returns the names that will be redone."""
    conflicts = writer.conflicts()
    if conflicts and not redo:
        name, difference = conflicts[0]
        raise UserError(f"output={writer.out_dir} holds {len(conflicts)} image(s) made with other settings (e.g. "
                        f"{name!r}: {difference}). Rerun with the same settings to finish that run, pass "
                        f"overwrite=true to redo them with these settings, or choose another output=....")
    return [name for name, _ in conflicts]


def check_ckpt_path(path: Optional[str]) -> None:
    """``ckpt_path`` must be a Lightning checkpoint this project can load safely (not a text file, not a hand-off
    such as generator.pt, not a pickle that would run code)."""
    if not path:
        return
    from networks.checkpoints import CheckpointError, safe_load

    file = Path(str(path)).expanduser()
    if not file.is_file():
        raise UserError(f"ckpt_path={path}: no such file.")
    try:
        ckpt = safe_load(file, map_location="cpu")
    except CheckpointError as err:
        raise UserError(f"ckpt_path={path}: {err}") from None
    if not isinstance(ckpt, Mapping) or "state_dict" not in ckpt or "pytorch-lightning_version" not in ckpt:
        found = ", ".join(sorted(map(str, ckpt))[:8]) if isinstance(ckpt, Mapping) else type(ckpt).__name__
        raise UserError(f"ckpt_path={path} is not a Lightning checkpoint (found: {found}). ckpt_path takes a "
                        f"<run_dir>/checkpoints/*.ckpt file; a hand-off such as generator.pt or encoder.pt goes to "
                        f"its model key (model.generator_checkpoint=..., model.encoder_checkpoint=...).")


EVALUATION_KEYS = ("model", "data", "generator", "seed", "chain")  # what defines an evaluation's metrics


def check_previous_metrics(cfg: DictConfig, run_dir: Path, overwrite: bool) -> None:
    """``mode=evaluate`` in a run directory that holds an earlier evaluation's ``metrics/``: refused when that one
    was made with other settings (its ``config.yaml`` says), unless ``overwrite`` (then they are replaced)."""
    from callbacks.inversion_writer import settings_difference

    metrics, saved = Path(run_dir) / "metrics", Path(run_dir) / "config.yaml"
    if overwrite or not metrics.is_dir() or not any(metrics.iterdir()):
        return
    old = OmegaConf.to_container(OmegaConf.load(saved)) if saved.is_file() else {}
    new = OmegaConf.to_container(cfg, resolve=True)
    difference = settings_difference({k: old.get(k) for k in EVALUATION_KEYS}, {k: new.get(k) for k in EVALUATION_KEYS})
    if difference:
        raise UserError(f"Run directory {run_dir} holds the metrics/ of an earlier evaluation made with other settings "
                        f"({difference}). Pass overwrite=true to replace them, or choose another paths.run_dir=....")
