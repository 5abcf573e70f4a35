"""Stage hand-offs (``generator.pt``, ``encoder.pt``, ``align_mask.pt``, the SynthFaces ``attribute_classifier.pt`` /
``face_parser.pt``) as W&B model artifacts, online runs only.

``log_handoff_artifact(path)`` puts one hand-off file into a ``wandb.Artifact(type="model")`` whose metadata is
the file's own record of what produced it (``meta``, or ``opts`` for the e4e layout) and logs it to the active
W&B run: as an output of the run (the stage that wrote it) or, with ``used=True``, as an input (a configured
hand-off the stage loaded), so the W&B lineage graph links the stages of a chain. Rank zero only.

Offline runs are skipped, on purpose (wandb 0.31): an offline ``log_artifact`` copies the whole file into
``$WANDB_DATA_DIR/artifacts/staging`` (``~/.local/share/wandb`` by default, outside the run directory) and the
``.wandb`` record points at that copy by absolute path. Every offline run would leave a full copy of each
hand-off there, and ``wandb sync`` of the run directory on another machine (the usual way off a cluster node)
fails with "Uploading artifact file failed" (wandb/wandb#3098, wandb/server#149). The hand-offs are in the run
directory anyway, and the config W&B records names their paths.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence

from networks.checkpoints import handoff_metadata

log = logging.getLogger(__name__)
# the stages' hand-off files by name stem (run.py's export_handoff of every experiment)
HANDOFF_KINDS = ("generator", "encoder", "align_mask", "attribute_classifier", "face_parser")


def _check(path, kind: Optional[str]) -> tuple:
    path = Path(path).expanduser()
    kind = kind or path.stem
    if kind not in HANDOFF_KINDS:
        raise ValueError(f"log_handoff_artifact: kind {kind!r} (file {path}) is not a hand-off kind; choose one of "
                         f"{', '.join(HANDOFF_KINDS)}")
    if not path.is_file():
        raise FileNotFoundError(f"log_handoff_artifact: {path}: no such hand-off file ({kind})")
    return path, kind


def build_handoff_artifact(path, kind: Optional[str] = None, meta: Optional[Mapping[str, Any]] = None,
                           name: Optional[str] = None):
    """A ``wandb.Artifact`` named ``name`` (default: the kind), type "model", holding the file, with metadata =
    ``meta`` (default: ``handoff_metadata(path)``).

    Args:
        path: the hand-off file.
        kind: one of ``HANDOFF_KINDS`` (default: the file name's stem).
        meta: the producer record to attach (JSON-safe mapping).
        name: artifact name.
    Returns:
        The draft artifact (not logged). ValueError for an unknown kind, FileNotFoundError for a missing file.
    """
    import wandb

    path, kind = _check(path, kind)
    metadata = json.loads(json.dumps(dict(meta), default=str)) if meta is not None else handoff_metadata(path)
    artifact = wandb.Artifact(name or kind, type="model", description=f"stage hand-off {path.name}",
                              metadata=metadata)
    # hand-offs are written once and atomically (save_atomic), never changed in place: upload the file itself
    # instead of a staged copy
    artifact.add_file(str(path), name=path.name, policy="immutable")
    return artifact


def log_handoff_artifact(path, kind: Optional[str] = None, run=None, meta: Optional[Mapping[str, Any]] = None,
                         used: bool = False, aliases: Optional[Sequence[str]] = None):
    """Log a hand-off file as a W&B model artifact of ``run`` (default: the active ``wandb.run``), online only.

    Args:
        path: the hand-off file (``generator.pt``, ``encoder.pt``, ``align_mask.pt``, ...).
        kind: one of ``HANDOFF_KINDS`` (default: the file name's stem; give it for files named otherwise, such as
            the official ``e4e_ffhq_encode.pt``).
        run: the W&B run (e.g. ``WandbLogger.experiment``); default ``wandb.run``.
        meta: metadata (default: the file's own producer record, ``handoff_metadata``).
        used: False = an output of the run (``log_artifact``); True = an input the run loaded (``use_artifact``).
        aliases: extra artifact aliases (W&B adds "latest").
    Returns:
        The logged ``wandb.Artifact``, or None when skipped: not global rank zero, no active run, W&B disabled, or
        an offline run (see the module docstring); the reason is logged at INFO level.
        ValueError / FileNotFoundError for a bad kind or a missing file, checked in every case.
    """
    from pytorch_lightning.utilities import rank_zero_only

    path, kind = _check(path, kind)
    if rank_zero_only.rank != 0:
        return None
    if run is None:
        import sys

        wandb = sys.modules.get("wandb")  # no import just to learn that no run is active
        run = getattr(wandb, "run", None) if wandb is not None else None
    if run is None:
        log.info(f"W&B artifact of {path} not logged: no active W&B run")
        return None
    mode = run.settings.mode
    if mode in ("offline", "dryrun"):
        log.info(f"W&B artifact of {path} not logged: the run is offline (an offline artifact is a copy outside the "
                 f"run directory that `wandb sync` elsewhere cannot upload); the file stays in the run directory. "
                 f"Run with WANDB_MODE=online to log hand-offs as artifacts.")
        return None
    if mode == "disabled":
        log.info(f"W&B artifact of {path} not logged: W&B is disabled")
        return None
    artifact = build_handoff_artifact(path, kind, meta)
    if used:
        return run.use_artifact(artifact, aliases=list(aliases or []))
    return run.log_artifact(artifact, aliases=list(aliases or []) or None)
