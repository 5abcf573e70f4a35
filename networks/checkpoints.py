"""Checkpoint I/O: safe loading, strict loading with one readable error, rosinality-layout export.

A generator file follows rosinality's ``stylegan2-ffhq-config-f.pt`` layout::

    {"g_ema": state_dict, "latent_avg": (style_dim,), ["g": state_dict, "d": state_dict], ["meta": {...}]}

``meta`` is this project's addition (constructor kwargs, producer); official files have none, so the
architecture is then inferred from the state-dict shapes.
"""
from __future__ import annotations

import json
import os
import pickle
import re
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from .stylegan2 import Discriminator, Generator


TMP_SUFFIX = ".tmp"  # every temporary file of an atomic write ends so (leftovers of a killed run are found by it)


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, unreadable, unsafe, or does not fit the network."""


@contextmanager
def atomic_target(path) -> Iterator[Path]:
    """Yields a unique temporary path beside ``path`` to write to; on success it is renamed onto ``path``.

    Readers (and a resumed run) never see a half-written file, two processes writing the same path never share a
    temporary name, and the temporary file is removed when the write fails. Parent folders are created.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_atomic(obj: Any, path) -> Path:
    """``torch.save(obj)`` to a unique temporary file beside ``path``, then rename it into place; returns the path.

    Raises OSError when the file cannot be written: torch reports a full disk as a RuntimeError
    ("PytorchStreamWriter failed writing file"), which is turned into an OSError naming ``path``.
    """
    path = Path(path)
    with atomic_target(path) as tmp:
        try:
            torch.save(obj, tmp)
        except RuntimeError as err:
            raise OSError(f"could not write {path}: {str(err).strip().splitlines()[0]}") from err
    return path


def plain_containers(value: Any) -> Any:
    """Mappings and sequences (tuples, lists, config lists) -> plain dicts (str keys) and lists, recursively
    (weights_only-loadable metadata); strings and other values unchanged."""
    if isinstance(value, Mapping):
        return {str(k): plain_containers(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        return [plain_containers(v) for v in value]
    return value


def safe_load(path, *, trust: bool = False, map_location="cpu", trust_key: Optional[str] = None) -> Any:
    """Load a torch file with ``weights_only=True``.

    Args:
        path: file to read.
        trust: allow full unpickling (arbitrary code execution) for files that need it; only for
            files from a source you trust.
        trust_key: the config key that sets ``trust`` for this file (named in the error), if the caller has one.
    Raises:
        CheckpointError: missing file; not a torch file (text, truncated, another format); or a file holding
            pickled Python objects without ``trust`` (the message names the objects, e.g. ``posix.system``).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        objects = unsafe_globals(err)
        if not objects:
            raise CheckpointError(f"{path} is not a readable torch checkpoint ({_first_line(err)}).") from None
        if not trust:
            hint = (f"If you trust its source, set {trust_key}=true." if trust_key else
                    "Nothing here loads such files: use a file that holds only tensors and plain containers "
                    "(dicts, lists, numbers, strings).")
            raise CheckpointError(
                f"{path} holds pickled Python objects ({', '.join(objects)}) that torch.load(weights_only=True) "
                f"refuses: loading them would run code from the file. {hint}") from None
    except Exception as err:  # text files, truncated files, other formats: torch raises many types here
        raise CheckpointError(f"{path} is not a readable torch checkpoint ({type(err).__name__}: "
                              f"{_first_line(err)}).") from None
    return torch.load(path, map_location=map_location, weights_only=False)


def _first_line(err: Exception) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0][:200] if lines else type(err).__name__


def unsafe_globals(err: Exception) -> list:
    """The Python objects a weights_only load refused (``['posix.system']``), from torch's error text; [] when
    the error is not about such objects (then the file is not a torch file at all)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err))
    return sorted(set(re.findall(r"GLOBAL ([\w.]+)", text)))


def describe_mismatch(module: nn.Module, state: Mapping[str, torch.Tensor], limit: int = 12) -> str:
    """Return '' when ``state`` fits ``module`` exactly, else a report of missing/unexpected/mis-shaped keys."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shaped = [f"{k}: file {tuple(state[k].shape)} vs network {tuple(own[k].shape)}"
              for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    parts = []
    for title, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", shaped)):
        if items:
            more = f" ... (+{len(items) - limit} more)" if len(items) > limit else ""
            parts.append(f"  {title} ({len(items)}): " + ", ".join(items[:limit]) + more)
    return "\n".join(parts)


def load_strict(module: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """``load_state_dict(strict=True)`` with one readable ``CheckpointError`` naming ``source``."""
    report = describe_mismatch(module, state)
    if report:
        raise CheckpointError(f"{source} does not fit {type(module).__name__}"
                              f"({getattr(module, 'config', '')}):\n{report}")
    module.load_state_dict(state, strict=True)


def infer_generator_config(g_state: Mapping[str, torch.Tensor]) -> Dict[str, Any]:
    """Infer Generator kwargs (size, style_dim, n_mlp, channel_multiplier, channel_max) from a g_ema state dict."""
    try:
        style_dim = g_state["conv1.conv.modulation.weight"].shape[1]
        n_mlp = len({k.split(".")[1] for k in g_state if re.match(r"style\.\d+\.weight$", k)})
        n_rgb = len({k.split(".")[1] for k in g_state if k.startswith("to_rgbs.")})
        size = 2 ** (n_rgb + 2)
        channels = {4: g_state["input.input"].shape[1]}
        for k in range(n_rgb):
            channels[2 ** (k + 3)] = g_state[f"convs.{2 * k}.conv.weight"].shape[1]
    except KeyError as err:
        raise CheckpointError(f"not a StyleGAN2 generator state dict (no key {err})") from None
    channel_max = max(channels.values())
    # smallest multiplier reproducing the table: channels[res] = min(max, 16384*cm/res)
    cm = 2
    for res, ch in channels.items():
        if ch < channel_max:
            cm = ch * res / 16384
            break
    cm = int(cm) if float(cm).is_integer() else cm
    return dict(size=size, style_dim=style_dim, n_mlp=n_mlp, channel_multiplier=cm, channel_max=channel_max)


def export_generator(path, g_ema: Generator, latent_avg: torch.Tensor, *, g: Optional[Generator] = None,
                     d: Optional[Discriminator] = None, meta: Optional[Dict[str, Any]] = None) -> Path:
    """Write a rosinality-layout generator file (readable by ``torch.load(weights_only=True)``).

    Args:
        path: output file (parent directories are created).
        g_ema: the generator to publish; g, d: optional training networks.
        latent_avg: mean w, (style_dim,) or (1, style_dim).
        meta: extra JSON-like information (producer, step, config); constructor kwargs are added.
    Returns:
        The written path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ckpt: Dict[str, Any] = {"g_ema": _cpu_state(g_ema), "latent_avg": latent_avg.detach().reshape(-1).cpu()}
    info = {"generator": dict(g_ema.config), "generator_sha1": weights_fingerprint(g_ema)}
    if g is not None:
        ckpt["g"] = _cpu_state(g)
    if d is not None:
        ckpt["d"] = _cpu_state(d)
        info["discriminator"] = dict(d.config)
    info.update(meta or {})
    ckpt["meta"] = info
    return save_atomic(ckpt, path)


def weights_fingerprint(module: nn.Module) -> str:
    """SHA-1 (hex) of a module's state dict (keys in order, float32 values): equal fingerprints, equal weights.
    Hand-offs record their generator's (``generator_sha1``) so a later stage can refuse another run's generator."""
    import hashlib

    digest = hashlib.sha1()
    for key, value in sorted(module.state_dict().items()):
        digest.update(key.encode())
        digest.update(value.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def check_same_generator(generator: nn.Module, config: Optional[Mapping[str, Any]], sha1: Optional[str],
                         theirs: str, ours: str, made: str = "trained") -> None:
    """CheckpointError unless the generator another file was made with is ``generator`` (the one such check).

    Args:
        generator: the generator in use (``.config`` dict, weights).
        config: the other file's generator config (None = not recorded: not checked).
        sha1: the other file's ``weights_fingerprint`` of its generator (None = not recorded: not checked).
        theirs: how the messages name the other file (``"model.align_mask_checkpoint=a.pt"``).
        ours: how they name the file ``generator`` came from (``"model.encoder_checkpoint=e.pt"``).
        made: the verb for the other file ("trained", "saved").
    """
    mine = dict(generator.config)
    if config is not None and dict(config) != mine:
        raise CheckpointError(f"{theirs} and {ours} hold different generators: {theirs} was {made} for generator "
                              f"{dict(config)}, but {ours} holds {mine} (size / latent count must match)")
    if sha1 is not None and sha1 != weights_fingerprint(generator):
        raise CheckpointError(f"{theirs} was {made} with another generator than the one inside {ours} (same "
                              f"architecture, different weights: a hand-off from another run?)")


def handoff_metadata(path) -> Dict[str, Any]:
    """The record a hand-off file keeps of what produced it: its ``meta`` dict (generator, align_mask) or its
    ``opts`` (encoder, e4e layout), made JSON-safe (non-JSON values as strings); {} for files without one, such
    as official pickles that cannot be read without trusting them."""
    try:  # mmap: a 1 GB generator file is not read just for its metadata
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        try:  # the legacy (non-zip) format has no mmap
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:
            return {}
    if not isinstance(ckpt, Mapping):
        return {}
    meta = ckpt.get("meta") if isinstance(ckpt.get("meta"), Mapping) else ckpt.get("opts")
    return json.loads(json.dumps(dict(meta), default=str)) if isinstance(meta, Mapping) else {}


def _cpu_state(module: nn.Module) -> Dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def load_generator(path, *, config: Optional[Mapping[str, Any]] = None, trust: bool = False,
                   trust_key: Optional[str] = None,
                   key: str = "g_ema", map_location="cpu") -> Tuple[Generator, torch.Tensor]:
    """Build and strictly load a Generator from a rosinality-layout file.

    Args:
        path: ``generator.pt`` / ``stylegan2-ffhq-config-f.pt``-style file.
        config: Generator kwargs; default: the file's ``meta.generator``, else inferred from shapes.
        key: which generator to load ("g_ema" or "g").
        trust, trust_key: see ``safe_load``.
    Returns:
        (generator in eval mode, latent_avg (style_dim,)). latent_avg is computed from 4096 fixed z
        when the file has none.
    Raises:
        CheckpointError: unreadable file, wrong layout, or keys/shapes that do not fit.
    """
    ckpt = safe_load(path, trust=trust, map_location=map_location, trust_key=trust_key)
    if not isinstance(ckpt, Mapping) or key not in ckpt:
        found = sorted(ckpt)[:10] if isinstance(ckpt, Mapping) else type(ckpt).__name__
        raise CheckpointError(f"{path} is not a StyleGAN2 generator file: expected a dict with {key!r} "
                              f"(rosinality layout: g_ema, latent_avg), found {found}")
    state = ckpt[key]
    cfg = dict(config or (ckpt.get("meta") or {}).get("generator") or infer_generator_config(state))
    generator = Generator(**cfg)
    load_strict(generator, state, f"{path} [{key}]")
    latent_avg = ckpt.get("latent_avg")
    if latent_avg is None:
        latent_avg = generator.mean_latent(4096, seed=0)
    latent_avg = latent_avg.reshape(-1)
    if latent_avg.numel() != generator.style_dim:
        raise CheckpointError(f"{path}: latent_avg has {latent_avg.numel()} values, generator style_dim is "
                              f"{generator.style_dim}")
    return generator.eval(), latent_avg


def load_discriminator(path, *, config: Optional[Mapping[str, Any]] = None, trust: bool = False) -> Discriminator:
    """Strictly load the ``d`` entry of a generator file into a Discriminator."""
    ckpt = safe_load(path, trust=trust)
    if not isinstance(ckpt, Mapping) or "d" not in ckpt:
        raise CheckpointError(f"{path} has no discriminator ('d') entry")
    cfg = dict(config or (ckpt.get("meta") or {}).get("discriminator") or _infer_d_config(ckpt))
    d = Discriminator(**cfg)
    load_strict(d, ckpt["d"], f"{path} [d]")
    return d


def _infer_d_config(ckpt) -> Dict[str, Any]:
    gcfg = (ckpt.get("meta") or {}).get("generator") or infer_generator_config(ckpt["g_ema"])
    return dict(size=gcfg["size"], channel_multiplier=gcfg["channel_multiplier"], channel_max=gcfg["channel_max"])
