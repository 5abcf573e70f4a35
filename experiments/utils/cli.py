"""Checks the command line before Hydra runs, so common mistakes get one clear message instead of Hydra's.

Covered: no experiment, `exp=x` without the `+`, an unknown experiment name, an unknown config key
(with "did you mean"), an unknown group option, an unparsable override. Anything else is left to Hydra.
Only Hydra's public API is used: the flags are read by this module's own copy of Hydra's documented command line
(an unknown flag leaves the line to Hydra), and an unknown key is found by looking the override's key up in the
config composed without it, not by reading Hydra's error text.
"""
import argparse
import contextlib
import difflib
import io
import re
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException, HydraException, OverrideParseException
from omegaconf import DictConfig, OmegaConf

_OVERRIDE = re.compile(r"^(?P<prefix>\+{1,2}|~)?(?P<key>[^=~+][^=]*)=(?P<value>.*)$", re.S)
_SIMPLE_LIST = re.compile(r"[\w\-/.]+(,[\w\-/.]+)*")


def available_exps(config_dir: str | Path) -> list[str]:
    """Names usable as `+exp=<name>`: the yaml files under `<config_dir>/exp` (sub-folders as `a/b`), sorted."""
    exp_dir = Path(config_dir) / "exp"
    return sorted(p.relative_to(exp_dir).with_suffix("").as_posix() for p in exp_dir.rglob("*.yaml"))


def _check_exp(override: str, exps: list[str]) -> str | None:
    m = _OVERRIDE.match(override)
    if not m or m["key"] != "exp":
        return None
    listing = f"Available experiments: {', '.join(exps) or '(none)'}."
    if not m["prefix"]:
        return (
            f"`{override}` needs a leading '+': experiments are added to the config (exp is not in the "
            f"defaults list, so there is nothing to override). Write +{override}. {listing}"
        )
    value = m["value"]
    if m["prefix"] != "~" and _SIMPLE_LIST.fullmatch(value):
        unknown = [v for v in value.split(",") if v not in exps]
        if unknown:
            return f"Unknown experiment {', '.join(repr(u) for u in unknown)} in `{override}`. {listing}"
    return None


def _keys_under(cfg: DictConfig, parent: str) -> list[str]:
    node = OmegaConf.select(cfg, parent) if parent else cfg
    return [str(k) for k in node.keys()] if isinstance(node, DictConfig) else []


def _args_parser() -> argparse.ArgumentParser:
    """Hydra's documented command line (``python run.py --help``): the flags, then the overrides."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--help", "-h", action="store_true")
    parser.add_argument("--hydra-help", action="store_true")
    parser.add_argument("--version", action="store_true")
    parser.add_argument("--cfg", "-c", choices=["job", "hydra", "all"])
    parser.add_argument("--resolve", action="store_true")
    parser.add_argument("--package", "-p")
    parser.add_argument("--run", "-r", action="store_true")
    parser.add_argument("--multirun", "-m", action="store_true")
    parser.add_argument("--shell-completion", "-sc", action="store_true")
    parser.add_argument("--config-path", "-cp")
    parser.add_argument("--config-name", "-cn")
    parser.add_argument("--config-dir", "-cd")
    parser.add_argument("--experimental-rerun")
    parser.add_argument("--info", "-i", const="all", nargs="?")
    return parser


_ABSENT = object()


def _first_missing(cfg: DictConfig, key: str) -> str | None:
    """The shortest prefix of the dotted ``key`` that ``cfg`` does not hold (None when it holds the key)."""
    parts = key.split(".")
    for i in range(1, len(parts) + 1):
        prefix = ".".join(parts[:i])
        if OmegaConf.select(cfg, prefix, default=_ABSENT) is _ABSENT:
            return prefix
    return None


def _unknown_key_message(overrides: list[str], config_dir, config_name) -> str | None:
    """The message for the first plain override (``a.b=v``) whose key the config composed without it lacks."""
    for bad in overrides:
        m = _OVERRIDE.match(bad)
        if not m or m["prefix"] or "/" in m["key"] or "@" in m["key"]:
            continue
        others = [o for o in overrides if o != bad]
        try:
            with initialize_config_dir(str(config_dir), version_base="1.3"):
                cfg = compose(config_name, overrides=others, return_hydra_config=True)
        except HydraException:
            continue
        missing = _first_missing(cfg, m["key"])
        if missing is None:
            continue
        parent, _, leaf = missing.rpartition(".")
        keys = _keys_under(cfg, parent)
        where = f"under '{parent}'" if parent else "at the top level"
        close = difflib.get_close_matches(leaf, keys, n=3)
        lines = [f"Unknown config key '{missing}' in the override `{bad}`."]
        if close:
            lines.append("Did you mean " + " or ".join(f"{parent + '.' if parent else ''}{c}" for c in close) + "?")
        if keys:
            lines.append(f"Keys {where}: {', '.join(keys)}.")
        lines.append(f"To add a new key on purpose, write +{bad}")
        return "\n".join(lines)
    return None


def _strip_search_path(message: str) -> str:
    return message.split("\nConfig search path:")[0].strip()


def check_command_line(argv: list[str], config_dir: str | Path, config_name: str = "config") -> str | None:
    """Returns an error message for a command line Hydra would reject (None if it looks fine or is not ours to judge).

    argv: the arguments after the script name. Composes the config once (single runs only) to find bad keys.
    """
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            args = _args_parser().parse_args(argv)
    except SystemExit:
        return None  # a malformed flag: Hydra prints argparse's usage message
    if args.help or args.hydra_help or args.info or args.shell_completion:
        return None
    if args.config_path or args.config_name or args.config_dir:
        return None
    exps = available_exps(config_dir)
    for override in args.overrides:
        if message := _check_exp(override, exps):
            return message
    parsed = [m for o in args.overrides if (m := _OVERRIDE.match(o))]
    has_exp = any(m["key"] == "exp" and m["prefix"] in ("+", "++") for m in parsed)
    if not has_exp and not args.cfg:
        return f"No experiment given: add +exp=<name>. Available experiments: {', '.join(exps) or '(none)'}."
    if args.multirun:
        return None  # sweep values (a=1,2) cannot be composed as one config; Hydra checks each job
    try:
        with initialize_config_dir(str(config_dir), version_base="1.3"):
            compose(config_name, overrides=list(args.overrides), return_hydra_config=True)
    except OverrideParseException as exc:
        return f"Could not parse an override: {_strip_search_path(str(exc))}"
    except ConfigCompositionException as exc:
        return _unknown_key_message(list(args.overrides), config_dir, config_name) or _strip_search_path(str(exc))
    except HydraException as exc:
        return _strip_search_path(str(exc))
    return None
