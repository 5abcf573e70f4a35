"""A DDP process that dies: the run ends within seconds with one clear message, and nothing finished is lost.

What Lightning 2.6 does by itself (measured with the crash runs of tests/test_ddp.py, `trainer=ddp_cpu`):
* `trainer=ddp` / `ddp_cpu` from the command line: rank 0 re-runs run.py for ranks 1..N-1
  (`_SubprocessScriptLauncher`) and a thread of rank 0 polls them every 5 s. When one has exited with a non-zero
  status it logs "Child process with PID ... terminated with code ..." and SIGKILLs the other children *and rank
  0 itself*: exit status 137, no message, nothing said about checkpoints or how to go on.
* Often the survivors notice first: gloo sees the dead process's closed socket in the next collective and raises
  `RuntimeError: [.../gloo/...] Connection reset by peer` (or "Connection closed by peer"), which Hydra prints as
  one line. Whichever comes first wins. So a dead rank does not cause the 30-minute process-group timeout
  (not even one that dies before the rendezvous: the observer kills rank 0); a rank that is alive but stuck does
  (set the strategy's `timeout` for that, see the README).

What run.py adds (`RankFailureGuard`, around the whole job in `main()`):
* rank 0 watches the children itself (Linux: it finds the processes Lightning started in /proc by the flag Lightning
  adds to their command line, and one thread per child waits for its exit with ``os.waitid``; only public Lightning
  behaviour and the operating system are used). A child that exits with a non-zero status is reaped at once, so
  Lightning's own observer (which SIGKILLs rank 0 when it sees one, every 5 s) finds nothing to act on. The watcher
  then SIGKILLs the other children (a rank blocked in a collective never returns) and interrupts rank 0's main
  thread (`INTERRUPT_SIGNAL` -> `RankDiedError` raised wherever it
  runs, so Lightning's exception hooks, the teardown and the W&B finish still run; files are written to a
  temporary name and renamed, so an interrupted write leaves no half file). If the main thread does not react
  within `GRACE_S` (blocked inside one C call, e.g. a NCCL wait) the watcher prints the message and exits;
* a rank started by Lightning watches its parent, rank 0: when rank 0 disappears it stops the same way;
* every rank turns a broken-connection error of the process group (`is_connection_error`) into the message;
* Ctrl+C stays Ctrl+C: after SIGINT nothing is reported as a dead rank; rank 0 prints what is kept and the
  command that continues (Lightning 2.6 ends `fit()` with `sys.exit(1)` on Ctrl+C, in one process too).
* SIGTERM (`kill`, a scheduler's stop) stops the run the same way, at once, in every mode. Lightning by itself
  only notes it and checks between training batches and between evaluation batches (never in `predict`); its own
  handler still runs first (it forwards the signal to its child processes), then ours raises KeyboardInterrupt.
  Exit status 143.
Without /proc (macOS) Lightning's own observer stays in charge (exit 137 without a message); torchrun and SLURM
(`srun`) do the same by themselves: when one task ends with an error they stop the others and report which one.
The message (`failure_message`) names the dead rank and how it ended, what is kept (each `last.ckpt` of the run
directory with its step; for `mode=invert` the finished image folders) and the exact command to continue: the
run's own overrides plus `resume=true paths.run_dir=<run dir>`. Exit status 1 (when rank 0 itself was killed,
the shell sees that: 137). Rank 0 (or, when rank 0 is the one that died, local rank 1) prints it; other ranks
print one line with the command.
"""
from __future__ import annotations

import os
import shlex
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, NamedTuple, Optional, Sequence

POLL_S = 0.5            # how often the watcher looks at the other processes
GRACE_S = 15.0          # how long the main thread may take to react to the interrupt before the watcher exits
FIND_DEAD_S = 10.0      # after a broken connection: how long rank 0 waits to learn which child ended
INTERRUPT_SIGNAL = signal.SIGUSR2  # not used by Lightning (SIGUSR1: SLURM requeue; SIGTERM: its own handler)
LIGHTNING_CHILD_FLAG = "hydra.job.name=train_ddp_process_"  # what Lightning's launcher adds to a child's argv
# Overrides the continue command replaces: where the run is and how it starts (ckpt_path would win over resume).
_REPLACED_KEYS = ("paths.run_dir", "resume", "overwrite", "ckpt_path")
_CONNECTION_WORDS = ("gloo", "nccl", "c10d", "processgroup")


class RankFailure(NamedTuple):
    """A process of the run that ended before the run did: its global ``rank``, ``pid`` and ``returncode``
    (Popen convention: negative = killed by that signal; None = unknown, e.g. seen from a child)."""

    rank: int
    pid: int
    returncode: Optional[int]


class RankDiedError(BaseException):
    """Raised in the main thread when another process of the run died (a BaseException, like KeyboardInterrupt,
    so that no ``except Exception`` on the way swallows it)."""

    def __init__(self, failure: RankFailure):
        super().__init__(f"DDP rank {failure.rank} (pid {failure.pid}) {describe_exit(failure.returncode)}")
        self.failure = failure


def describe_exit(returncode: Optional[int]) -> str:
    """How a process ended, from its Popen return code: 'was killed by SIGKILL (...)', 'exited with status 3'."""
    if returncode is None:
        return "is gone"
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        why = " (the out-of-memory killer, a lost node, or kill -9)" if returncode == -signal.SIGKILL else ""
        return f"was killed by {name}{why}"
    if returncode == 1:
        return "exited with status 1 (its own error is printed above)"
    return f"exited with status {returncode}"


def is_connection_error(exc: BaseException) -> bool:
    """True when ``exc`` (or an exception it was raised from) is a failure of the process group's communication:
    a ``torch.distributed.DistError`` or a RuntimeError from gloo / NCCL / c10d (a peer closed its connection, a
    collective timed out)."""
    try:
        from torch.distributed import DistError
    except ImportError:  # torch without distributed support
        DistError = ()  # noqa: N806
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if DistError and isinstance(exc, DistError):
            return True
        if isinstance(exc, RuntimeError) and any(w in str(exc).lower() for w in _CONNECTION_WORDS):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def checkpoint_steps(run_dir: Path) -> List[tuple]:
    """Every ``last.ckpt`` of a run directory (``checkpoints/`` and a chain's ``stage_*/checkpoints/``) with the
    global step it holds (None when it cannot be read): ``[(path, step), ...]``, newest first."""
    import torch

    found = []
    run_dir = Path(run_dir)
    for path in [run_dir / "checkpoints" / "last.ckpt", *sorted(run_dir.glob("stage_*/checkpoints/last.ckpt"))]:
        if not path.is_file():
            continue
        try:  # mmap: only the few bytes of the step are read, whatever the checkpoint's size
            step = int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["global_step"])
        except Exception:  # a checkpoint we cannot read is still reported, without its step
            step = None
        found.append((path, step))
    return sorted(found, key=lambda item: item[0].stat().st_mtime, reverse=True)


def continue_command(overrides: Sequence[str], run_dir: Path, script: str = "experiments/run.py") -> str:
    """The shell command that continues the run: ``python <script> <overrides> resume=true paths.run_dir=<dir>``
    (the run's own ``paths.run_dir`` / ``resume`` / ``overwrite`` / ``ckpt_path`` overrides replaced)."""
    kept = [o for o in overrides if o.lstrip("+~").split("=", 1)[0] not in _REPLACED_KEYS]
    args = [*kept, "resume=true", f"paths.run_dir={run_dir}"]
    return " ".join(["python", shlex.quote(str(script)), *(shlex.quote(a) for a in args)])


def failure_message(failure: Optional[RankFailure], run_dir: Path, overrides: Sequence[str], mode: str = "train",
                    inversion_dir: Optional[Path] = None, error: Optional[BaseException] = None, rank: int = 0,
                    script: str = "experiments/run.py", head: Optional[str] = None) -> str:
    """The full report of a run that lost a process (see the module docstring).

    Args:
        failure: the process that ended (None: unknown, only the broken connection is known).
        run_dir: the run directory; overrides: the run's command-line overrides; mode: train | evaluate | invert.
        inversion_dir: ``mode=invert``'s output folder (its finished images are counted).
        error: the exception this process got (its first line is quoted when no failure is known).
        rank: the global rank of the process that reports.
        head: replaces the first line (e.g. for Ctrl+C).
    Returns:
        Several lines: what happened ("Error: ..."), what is kept ("Kept: ..."), "Continue with:" and the command.
    """
    if head is None and failure is not None:
        head = (f"Error: DDP rank {failure.rank} (pid {failure.pid}) {describe_exit(failure.returncode)}; "
                f"the run stopped")
        head += " (rank 0 stopped the other processes)." if rank == 0 else f" (reported by rank {rank})."
    elif head is None:
        first = str(error).strip().splitlines()[0][:300] if error is not None and str(error).strip() else \
            type(error).__name__
        head = (f"Error: rank {rank} lost the connection to the other DDP processes ({first}). Another process of "
                f"this run died or hangs; its own output (or torchrun's / srun's summary) names it.")
    lines = [head]
    checkpoints = checkpoint_steps(run_dir)
    for path, step in checkpoints:
        at = f"step {step}" if step is not None else "its last saved step"
        lines.append(f"Kept: {path} ({at}); checkpoints up to {at} are safe.")
    if not checkpoints and mode == "train":
        lines.append(f"No checkpoint had been saved in {run_dir} yet: training starts from the beginning.")
    if mode == "invert" and inversion_dir is not None:
        done = sum(1 for _ in Path(inversion_dir).rglob("record.json")) if Path(inversion_dir).is_dir() else 0
        lines.append(f"Kept: {done} finished image folder(s) under {inversion_dir}; the command below skips them.")
    if mode == "evaluate":
        lines.append("The evaluation itself starts over (its per-image metrics are kept in memory until the end).")
    lines.append("Continue with:")
    lines.append("  " + continue_command(overrides, run_dir, script))
    return "\n".join(lines)


@dataclass
class _State:
    """What the watcher threads and the guard share (one guard per process at a time)."""

    procs: Optional[list] = None            # rank 0: the _Child processes Lightning started (local ranks 1..N-1)
    parent_pid: Optional[int] = None        # a Lightning child: its parent, local rank 0
    failure: Optional[RankFailure] = None
    handling: bool = False                  # the guard is reporting: the watcher must not interrupt any more
    raised: bool = False                    # RankDiedError was raised once
    user_interrupt: bool = False            # SIGINT / SIGTERM arrived: not a dead rank
    stop_signal: str = "SIGINT"             # which of the two
    stopped: bool = False                   # the guard has exited: watchers end
    report: Optional[Callable[[], str]] = None


def _node_rank() -> int:
    try:
        return int(os.environ.get("NODE_RANK", "0"))
    except ValueError:
        return 0


def _local_rank() -> int:
    try:
        return int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError:
        return 0


class _Child:
    """A rank that Lightning started from rank 0 (local rank >= 1), seen through the operating system only.

    A waiter thread blocks in ``os.waitid(..., WNOWAIT)`` until the process exits; a non-zero exit is then reaped
    at once (``os.waitpid``), so that Lightning's observer, polling its ``Popen`` every 5 s, sees no error status
    and does not SIGKILL rank 0 before the guard has reported. ``poll`` / ``wait`` / ``send_signal`` as ``Popen``.
    """

    def __init__(self, pid: int, local_rank: int):
        self.pid, self.local_rank = pid, local_rank
        self.returncode: Optional[int] = None
        self._waiter = threading.Thread(target=self._wait_exit, name=f"rank-wait-{pid}", daemon=True)
        self._waiter.start()

    def _wait_exit(self) -> None:
        try:
            info = os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOWAIT)
        except ChildProcessError:  # already reaped by Lightning's Popen: it ended well, or Lightning reports it
            self.returncode = 0
            return
        except OSError:
            return
        code = info.si_status if info.si_code == os.CLD_EXITED else -info.si_status
        if code != 0:
            try:
                os.waitpid(self.pid, 0)
            except ChildProcessError:
                pass
        self.returncode = code

    def poll(self) -> Optional[int]:
        return self.returncode

    def wait(self, timeout: Optional[float] = None) -> Optional[int]:
        self._waiter.join(timeout)
        return self.returncode

    def send_signal(self, signum: int) -> None:
        os.kill(self.pid, signum)


def _find_children(flag: str = LIGHTNING_CHILD_FLAG) -> List[tuple]:
    """(pid, local rank) of this process's children whose command line holds ``flag`` (Linux /proc; [] elsewhere)."""
    me, found = os.getpid(), []
    try:
        pids = set()
        for task in os.scandir(f"/proc/{me}/task"):
            try:
                pids.update(int(p) for p in Path(task.path, "children").read_text().split())
            except OSError:
                pids = None  # a kernel without the children files: look at every process
                break
        if pids is None:
            pids = {int(e.name) for e in os.scandir("/proc") if e.name.isdigit()}
    except OSError:
        return []
    for pid in sorted(pids):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            if int(stat.rsplit(")", 1)[1].split()[1]) != me:
                continue
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
            if not any(a.startswith(flag) for a in argv):
                continue
            env = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace").split("\0")
            local = next(int(e.partition("=")[2]) for e in env if e.startswith("LOCAL_RANK="))
        except (OSError, ValueError, IndexError, StopIteration):
            continue
        found.append((pid, local))
    return found


def _discover_children(state: _State) -> None:
    """Rank 0's thread: adopt the ranks Lightning starts (checked every 0.1 s until the guard exits)."""
    known = {}
    while not state.stopped:
        new = [(pid, local) for pid, local in _find_children() if pid not in known]
        if new:
            known.update({pid: _Child(pid, local) for pid, local in new})
            state.procs = sorted(known.values(), key=lambda c: c.local_rank)
            if len(known) == 1:
                threading.Thread(target=_watch, args=(state, _dead_child), name="child-watch", daemon=True).start()
        time.sleep(0.1)


def _dead_child(state: _State) -> Optional[RankFailure]:
    """The first child of rank 0 that has exited with a non-zero status (None while all run or ended well)."""
    procs = state.procs or []
    for proc in procs:
        code = proc.poll()
        if code not in (None, 0):
            return RankFailure(_node_rank() * (len(procs) + 1) + proc.local_rank, proc.pid, code)
    return None


def _wait_for_children(state: _State, timeout: float = 60.0) -> None:
    """Rank 0 after a finished job: let the children end first (a child would take a parent that is gone for a
    dead rank 0); a child still running after ``timeout`` seconds is left alone."""
    deadline = time.monotonic() + timeout
    procs = state.procs or []
    for proc in procs:
        try:
            proc.wait(max(0.0, deadline - time.monotonic()))
        except Exception:  # subprocess.TimeoutExpired: it ends on its own
            pass
    for proc in procs:
        if proc.returncode not in (None, 0):
            print(f"Warning: DDP rank {_node_rank() * (len(procs) + 1) + proc.local_rank} (pid {proc.pid}) "
                  f"{describe_exit(proc.returncode)} after the run's work was done.", file=sys.stderr, flush=True)


def _kill_children(state: _State) -> None:
    for proc in state.procs or []:
        if proc.poll() is None:
            try:
                proc.send_signal(signal.SIGKILL)  # Lightning ignores SIGTERM in its processes
            except ProcessLookupError:
                pass
    for proc in state.procs or []:  # reaped by their waiters: Lightning's observer must not see the SIGKILL
        proc.wait(2.0)


def _parent_failure(state: _State) -> Optional[RankFailure]:
    """A Lightning child whose parent (local rank 0 of its node) is gone: that process, else None."""
    if state.parent_pid is not None and os.getppid() != state.parent_pid:
        return RankFailure(_global_rank() - _local_rank(), state.parent_pid, None)
    return None


class RankFailureGuard:
    """Context manager around a whole run.py job that reports a dead DDP process (see the module docstring).

    Args:
        run_dir: the run directory (Hydra's output dir); overrides: the job's command-line overrides.
        mode: train | evaluate | invert (what the message says is kept).
        inversion_dir: callable returning ``mode=invert``'s output folder (read when the message is written).
        script: how the continue command names run.py.
    On a dead rank or a broken process group it prints the message to stderr and raises SystemExit(1); any
    other exception passes through unchanged (rank 0 first SIGKILLs its children, which would otherwise wait
    in their next collective). Install in the main thread (elsewhere it only translates errors).
    """

    def __init__(self, run_dir, overrides: Sequence[str], mode: str = "train",
                 inversion_dir: Optional[Callable[[], Optional[str]]] = None, script: str = "experiments/run.py"):
        self.run_dir = Path(run_dir)
        self.overrides = list(overrides)
        self.mode = mode or "train"
        self.inversion_dir = inversion_dir
        self.script = script
        self.state = _State()
        self._saved: dict = {}

    # ------------------------------------------------------------------ set-up
    def __enter__(self) -> "RankFailureGuard":
        global _ACTIVE
        _ACTIVE = self.state
        self.state.report = self._message
        if threading.current_thread() is not threading.main_thread():
            return self
        self._saved = {sig: signal.getsignal(sig) for sig in (INTERRUPT_SIGNAL, signal.SIGINT, signal.SIGTERM)}
        signal.signal(INTERRUPT_SIGNAL, _on_interrupt)
        previous_sigint = self._saved[signal.SIGINT]

        def on_sigint(signum, frame):
            self.state.user_interrupt = True
            if callable(previous_sigint):
                return previous_sigint(signum, frame)
            raise KeyboardInterrupt

        def on_sigterm(signum, frame):
            if self.state.user_interrupt or self.state.handling:
                return  # already stopping
            self.state.user_interrupt, self.state.stop_signal = True, "SIGTERM"
            raise KeyboardInterrupt

        signal.signal(signal.SIGINT, on_sigint)
        signal.signal(signal.SIGTERM, on_sigterm)
        if any(a.startswith(LIGHTNING_CHILD_FLAG) for a in sys.argv[1:]):
            self.state.parent_pid = os.getppid()
            threading.Thread(target=_watch, args=(self.state, _parent_failure), name="rank0-watch", daemon=True).start()
        elif hasattr(os, "waitid"):  # rank 0 (or a single process): adopt the ranks Lightning starts, if any
            threading.Thread(target=_discover_children, args=(self.state,), name="child-find", daemon=True).start()
        return self

    # ------------------------------------------------------------------ exit
    def __exit__(self, exc_type, exc, tb) -> bool:
        global _ACTIVE
        state = self.state
        state.handling = True
        self._restore()
        try:
            if exc is None or (isinstance(exc, SystemExit) and exc.code in (0, None)):
                _wait_for_children(state)
                return False
            if state.user_interrupt:  # Ctrl+C / SIGTERM: every process got it; rank 0 says how to continue
                if _global_rank() == 0:
                    head = ("Stopped by SIGTERM; the run stopped." if state.stop_signal == "SIGTERM" else
                            "Interrupted (SIGINT / Ctrl+C); the run stopped.")
                    print(self._message(head=head), file=sys.stderr, flush=True)
                if state.stop_signal == "SIGTERM":
                    raise SystemExit(143)
                if isinstance(exc, KeyboardInterrupt):
                    raise SystemExit(130)
                return False
            failure = state.failure or (exc.failure if isinstance(exc, RankDiedError) else None)
            lost = is_connection_error(exc)
            if failure is None and lost:
                failure = self._find_failure()
            if failure is None and not lost:
                _kill_children(state)  # an ordinary error of this process: the others cannot go on without it
                return False
            _kill_children(state)
            print(self._message(failure, exc), file=sys.stderr, flush=True)
            raise SystemExit(1)
        finally:
            state.stopped = True
            _ACTIVE = None

    def _restore(self) -> None:
        for signum, handler in self._saved.items():
            signal.signal(signum, handler)
        self._saved = {}

    def _find_failure(self) -> Optional[RankFailure]:
        """After a broken connection: which process ended (rank 0 waits up to FIND_DEAD_S for the child's exit)."""
        state = self.state
        deadline = time.monotonic() + (FIND_DEAD_S if state.procs else 0)
        while True:
            failure = _dead_child(state) or _parent_failure(state)
            if failure is not None or time.monotonic() >= deadline:
                return failure
            time.sleep(0.1)

    def _message(self, failure: Optional[RankFailure] = None, error: Optional[BaseException] = None,
                 head: Optional[str] = None) -> str:
        failure = failure or self.state.failure
        rank = _global_rank()
        # One full report per run: rank 0, or local rank 1 when its parent (rank 0 of the node) is the one that died.
        parent_died = failure is not None and failure.pid == self.state.parent_pid
        if not (rank == 0 or (parent_died and _local_rank() == 1)):
            what = f"DDP rank {failure.rank} {describe_exit(failure.returncode)}" if failure is not None else \
                "lost the connection to the other DDP processes"
            return (f"[rank {rank}] stopped: {what}. Rank 0 reports what is kept; continue with: "
                    f"{continue_command(self.overrides, self.run_dir, self.script)}")
        inversion_dir = None
        if self.mode == "invert" and self.inversion_dir is not None:
            try:
                inversion_dir = Path(self.inversion_dir()) if self.inversion_dir() else None
            except Exception:  # an unresolvable config value: the message goes on without the count
                inversion_dir = None
        return failure_message(failure, self.run_dir, self.overrides, self.mode, inversion_dir, error, rank,
                               self.script, head)


_ACTIVE: Optional[_State] = None


def _global_rank() -> int:
    try:
        from pytorch_lightning.utilities import rank_zero_only

        return int(getattr(rank_zero_only, "rank", 0))
    except ImportError:
        return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")))


def _on_interrupt(signum, frame) -> None:
    """INTERRUPT_SIGNAL handler (main thread): raise RankDiedError once, unless the guard already reports."""
    state = _ACTIVE
    if state is None or state.failure is None or state.handling or state.raised or state.user_interrupt:
        return
    if frame is not None and frame.f_code is RankFailureGuard.__exit__.__code__:
        return  # the guard is starting to report another error of the same failure
    state.raised = True
    raise RankDiedError(state.failure)


def _watch(state: _State, find: Callable[[_State], Optional[RankFailure]]) -> None:
    """Watcher thread: poll ``find`` until it reports a failure; then stop the other children, interrupt the main
    thread and, if that does not end the run within GRACE_S, print the message and exit (status 1)."""
    while not state.stopped:
        time.sleep(POLL_S)
        if state.stopped or state.handling or state.user_interrupt:
            return
        failure = find(state)
        if failure is None:
            if state.procs is not None and all(p.poll() == 0 for p in state.procs):
                return  # every child finished well
            continue
        state.failure = failure
        _kill_children(state)
        os.kill(os.getpid(), INTERRUPT_SIGNAL)
        deadline = time.monotonic() + GRACE_S
        while time.monotonic() < deadline:
            time.sleep(POLL_S)
            if state.stopped or state.handling:
                return
        if state.report is not None:
            print(state.report(), file=sys.stderr, flush=True)
        os._exit(1)
