"""User-facing errors: a short message and exit status 1 instead of a traceback (HYDRA_FULL_ERROR=1 re-raises)."""
import os
import re
import sys
from contextlib import contextmanager

from hydra.errors import InstantiationException
from omegaconf.errors import InterpolationResolutionError, MissingMandatoryValue


class UserError(Exception):
    """A problem the user fixes on the command line or on disk; run.py prints it without a traceback."""


def _full_key(message: str) -> str | None:
    m = re.search(r"full_key: (\S+)", message)
    return m.group(1) if m else None


def _input_errors() -> tuple:
    """Exception types that report bad input files (imported lazily: they live in heavier modules)."""
    from datamodules.image_folder import DataError
    from networks.checkpoints import CheckpointError

    return DataError, CheckpointError


def describe_user_error(exc: BaseException) -> str | None:
    """Returns a short message for errors the user can fix from the config, or None for anything else (a bug)."""
    if isinstance(exc, UserError):
        return str(exc)
    if isinstance(exc, _input_errors()):  # bad files on disk: the message names the file and config key
        return f"{type(exc).__name__}: {exc}"
    if isinstance(exc, MissingMandatoryValue):
        key = _full_key(str(exc)) or "?"
        return f"Config key '{key}' has no value (it is ??? in the config): set it, e.g. {key}=..."
    if isinstance(exc, InterpolationResolutionError):
        return f"Could not resolve a config value: {str(exc).splitlines()[0]} (key: {_full_key(str(exc))})"
    if isinstance(exc, InstantiationException):
        text = str(exc)
        key = _full_key(text)
        target = re.search(r"target '([^']+)'", text)
        target = target.group(1) if target else None
        where = (f"`{key}`" + (f" ({target})" if target else "")) if key else (target or "?")
        cause = exc.__cause__
        reason = f"{type(cause).__name__}: {cause}" if cause is not None else text.splitlines()[0]
        return f"{reason}\n  while building {where}. Full traceback: HYDRA_FULL_ERROR=1"
    return None


@contextmanager
def report_user_errors():
    """Context manager: turns user errors (see `describe_user_error`) into `Error: ...` on stderr + exit status 1."""
    try:
        yield
    except Exception as exc:
        message = describe_user_error(exc)
        if message is None or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"Error: {message}", file=sys.stderr)
        sys.exit(1)
