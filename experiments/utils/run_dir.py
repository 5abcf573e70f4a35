"""Run-directory policy: never silently overwrite an earlier run, resume only on request.

A run directory "holds outputs of an earlier run" when it has files under `checkpoints/` or a hand-off
file (`*.pt`, e.g. `generator.pt`) at its top level. Hydra's own files (`run.log`), `config.yaml`
and `wandb/` do not count. Then exactly one of the flags decides:
  resume=true     continue from `checkpoints/last.ckpt` (an error if it is missing);
  overwrite=true  delete `checkpoints/` and the top-level `*.pt` files, then start over;
  neither         stop with a message naming both flags.
`resume=true` in an empty/new directory simply starts a fresh run (handy for requeued jobs).
"""
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from experiments.utils.errors import UserError

CKPT_DIR = "checkpoints"
LAST_CKPT = "last.ckpt"
_HPC_CKPT = re.compile(r"^hpc_ckpt_(\d+)\.ckpt$")  # Lightning's SLURM requeue checkpoints, in the run dir itself
_WANDB_RUN = re.compile(r"^(?:offline-)?run-\d{8}_\d{6}-(?P<id>[A-Za-z0-9]+)$")


class RunDirError(UserError):
    """The run directory conflicts with the resume/overwrite flags."""


@dataclass
class RunDirPlan:
    """What to do with a run directory.

    run_dir: the directory; ckpt_path: checkpoint to resume from (None: fresh start);
    previous: outputs of an earlier run found there; remove: paths to delete before training (overwrite=true).
    """

    run_dir: Path
    ckpt_path: Path | None = None
    previous: list[Path] = field(default_factory=list)
    remove: list[Path] = field(default_factory=list)


def hpc_checkpoints(run_dir: str | Path) -> list[Path]:
    """Returns `<run_dir>/hpc_ckpt_<n>.ckpt` (saved by Lightning on SLURM's SIGUSR1 before a requeue), by n."""
    found = [(int(m[1]), p) for p in Path(run_dir).glob("hpc_ckpt_*.ckpt") if (m := _HPC_CKPT.match(p.name))]
    return [p for _, p in sorted(found)]


def previous_outputs(run_dir: Path) -> list[Path]:
    """Returns the earlier-run outputs in `run_dir`: `checkpoints/` if it holds files, top-level `*.pt` files and
    Lightning's SLURM requeue checkpoints `hpc_ckpt_<n>.ckpt`."""
    run_dir = Path(run_dir)
    found = []
    ckpt_dir = run_dir / CKPT_DIR
    if ckpt_dir.is_dir() and any(p.is_file() for p in ckpt_dir.rglob("*")):
        found.append(ckpt_dir)
    found += sorted(p for p in run_dir.glob("*.pt") if p.is_file())
    return found + hpc_checkpoints(run_dir)


def plan_run_dir(run_dir: str | Path, *, resume: bool, overwrite: bool) -> RunDirPlan:
    """Decides how to use `run_dir` given the `resume` / `overwrite` flags (see the module docstring).

    Returns a `RunDirPlan`; raises `RunDirError` with a message naming the flag to pass.
    Reads only: safe to call on every DDP rank.
    """
    run_dir = Path(run_dir)
    if resume and overwrite:
        raise RunDirError("resume=true and overwrite=true contradict each other: pass only one of them.")
    previous = previous_outputs(run_dir)
    last = run_dir / CKPT_DIR / LAST_CKPT
    names = ", ".join(p.name + ("/" if p.is_dir() else "") for p in previous)
    if resume:
        # the newest state: a requeue checkpoint written at SLURM's signal is usually newer than last.ckpt
        candidates = [p for p in (last, *hpc_checkpoints(run_dir)) if p.is_file()]
        if candidates:
            newest = max(candidates, key=lambda p: p.stat().st_mtime_ns)
            return RunDirPlan(run_dir, ckpt_path=newest, previous=previous)
        if previous:
            raise RunDirError(
                f"resume=true but {last} does not exist, although {run_dir} holds an earlier run's outputs "
                f"({names}). Pass overwrite=true instead of resume=true to start over (deletes them)."
            )
        return RunDirPlan(run_dir)
    if not previous:
        return RunDirPlan(run_dir)
    if overwrite:
        return RunDirPlan(run_dir, previous=previous, remove=previous)
    hint = f"resume=true to continue from {CKPT_DIR}/{LAST_CKPT}, or " if last.is_file() else ""
    raise RunDirError(
        f"Run directory {run_dir} already holds outputs of an earlier run ({names}). "
        f"Pass {hint}overwrite=true to start over (deletes them), or choose another paths.run_dir=..."
    )


def apply_run_dir_plan(plan: RunDirPlan) -> list[Path]:
    """Creates the run directory and deletes `plan.remove` (call on rank zero only). Returns the deleted paths."""
    plan.run_dir.mkdir(parents=True, exist_ok=True)
    for path in plan.remove:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    return list(plan.remove)


def previous_wandb_id(run_dir: str | Path) -> str | None:
    """Returns the id of the newest W&B run under `<run_dir>/wandb` (`[offline-]run-<date>_<time>-<id>`), or None."""
    wandb_dir = Path(run_dir) / "wandb"
    if not wandb_dir.is_dir():
        return None
    # sort by the "run-<date>_<time>" part, so offline and online runs interleave by time
    matches = [(p.name.removeprefix("offline-"), _WANDB_RUN.match(p.name)) for p in wandb_dir.iterdir()]
    runs = sorted((name, m["id"]) for name, m in matches if m)
    return runs[-1][1] if runs else None
