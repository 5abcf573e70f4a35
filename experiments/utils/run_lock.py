"""One run per run directory: a lock file that a second run writing the same directory runs into.

`<run_dir>/.run.lock` holds the owner's host, pid, SLURM job id and start time (JSON). It is created with
`O_CREAT | O_EXCL`, so two runs starting at the same moment cannot both get it. A lock whose owner is gone is
taken over with a warning: same host and the pid no longer exists, or the same SLURM job (a requeued job
restarts with the job id of the run that was preempted). A lock held by a live process, or by a process on
another host, stops the run with a message naming the owner and the lock file.

Only global rank zero takes the lock (the other ranks of a DDP / torchrun / srun job are the same run).
"""
from __future__ import annotations

import json
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

from experiments.utils.errors import UserError

LOCK_NAME = ".run.lock"


class RunDirLockedError(UserError):
    """Another run is writing the run directory."""


def _owner() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
            "started": time.strftime("%Y-%m-%d %H:%M:%S")}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _stale_reason(owner: dict) -> Optional[str]:
    """Why the lock's owner is gone (None when it may still be running)."""
    job = os.environ.get("SLURM_JOB_ID")
    if job and owner.get("slurm_job_id") == job:
        return f"SLURM job {job} was requeued"
    if owner.get("host") == socket.gethostname() and not _pid_alive(int(owner.get("pid", -1))):
        return f"process {owner.get('pid')} no longer exists"
    return None


def acquire_run_lock(run_dir: Path, what: str = "Run directory", key: str = "paths.run_dir") -> Path:
    """Take `<run_dir>/.run.lock` for this process; returns its path. Raises RunDirLockedError when another live
    run holds it (see the module docstring); takes over a stale lock.
    `what` / `key` name the folder and its config key in the message (e.g. "Output folder", "output")."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_NAME
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                owner = json.loads(path.read_text() or "{}")
            except (OSError, json.JSONDecodeError):
                owner = {}
            reason = _stale_reason(owner) if owner else "the lock file is unreadable"
            if reason is None:
                raise RunDirLockedError(
                    f"{what} {run_dir} is in use by another run (pid {owner.get('pid')} on "
                    f"{owner.get('host')}, started {owner.get('started')}; lock file {path}). Two runs must not "
                    f"write one folder: choose another {key}=..., or wait for that run. If it is "
                    f"certainly gone (e.g. its node died), delete {path}.") from None
            from experiments.utils.pylogger import get_logger

            get_logger(__name__).warning(f"Taking over the lock of {run_dir}: {reason} ({path}).")
            path.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as handle:
            json.dump(_owner(), handle)
        return path
    raise RunDirLockedError(f"Could not lock {run_dir}: {path} keeps reappearing (another run is starting there).")


def release_run_lock(path: Path) -> None:
    """Remove the lock if this process still owns it."""
    try:
        owner = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return
    if owner.get("pid") == os.getpid() and owner.get("host") == socket.gethostname():
        Path(path).unlink(missing_ok=True)


@contextmanager
def run_dir_lock(run_dir: Path, enabled: bool = True, what: str = "Run directory",
                 key: str = "paths.run_dir") -> Iterator[Optional[Path]]:
    """Hold the lock of `run_dir` (a run directory, or any folder one run writes, e.g. mode=invert's output) for
    the duration of the block (no-op when ``enabled`` is False, e.g. on ranks other than zero). Yields the lock path
    or None."""
    path = acquire_run_lock(run_dir, what, key) if enabled else None
    try:
        yield path
    finally:
        if path is not None:
            release_run_lock(path)
