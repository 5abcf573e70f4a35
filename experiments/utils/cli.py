"""Checks the command line before Hydra runs, so common mistakes get one clear message instead of Hydra's.

Covered: no experiment, `exp=x` without the `+`, an unknown experiment name, an unknown config key
(with "did you mean"), an unknown group option, an unparsable override. Anything else is left to Hydra.
"""
import contextlib
import difflib
import io
import re
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra._internal.utils import get_args_parser
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


def _unknown_key_message(exc: ConfigCompositionException, overrides: list[str], config_dir, config_name) -> str | None:
    m = re.search(r"Could not override '([^']+)'", str(exc))
    cause = str(exc.__cause__ or "")
    if not m or "not in struct" not in cause:
        return None
    key = m[1]
    missing = re.search(r"full_key: (\S+)", cause)
    missing = missing[1] if missing else key
    parent, _, leaf = missing.rpartition(".")
    bad = next((o for o in overrides if (om := _OVERRIDE.match(o)) and om["key"] == key and not om["prefix"]), key)
    others = [o for o in overrides if o != bad]
    try:
        with initialize_config_dir(str(config_dir), version_base="1.3"):
            keys = _keys_under(compose(config_name, overrides=others), parent)
    except HydraException:
        keys = []
    where = f"under '{parent}'" if parent else "at the top level"
    close = difflib.get_close_matches(leaf, keys, n=3)
    lines = [f"Unknown config key '{missing}' in the override `{bad}`."]
    if close:
        lines.append("Did you mean " + " or ".join(f"{parent + '.' if parent else ''}{c}" for c in close) + "?")
    if keys:
        lines.append(f"Keys {where}: {', '.join(keys)}.")
    lines.append(f"To add a new key on purpose, write +{bad}")
    return "\n".join(lines)


def _strip_search_path(message: str) -> str:
    return message.split("\nConfig search path:")[0].strip()


def check_command_line(argv: list[str], config_dir: str | Path, config_name: str = "config") -> str | None:
    """Returns an error message for a command line Hydra would reject (None if it looks fine or is not ours to judge).

    argv: the arguments after the script name. Composes the config once (single runs only) to find bad keys.
    """
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            args = get_args_parser().parse_args(argv)
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
        return _unknown_key_message(exc, list(args.overrides), config_dir, config_name) or _strip_search_path(str(exc))
    except HydraException as exc:
        return _strip_search_path(str(exc))
    return None
