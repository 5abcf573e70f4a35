"""Encoder checkpoints in the layout of the official e4e / pSp releases (``e4e_ffhq_encode.pt``,
``psp_ffhq_encode.pt``).

Layout::

    {"state_dict": {"encoder.<key>": tensor, ..., "decoder.<key>": tensor, ...},   # decoder = rosinality Generator
     "opts": {"encoder_type": "Encoder4Editing" | "GradualStyleEncoder", "stylegan_size" / "output_size": int,
              "start_from_latent_avg": bool, ...},
     "latent_avg": (n_styles, style_dim) or (style_dim,)}

Files written here add ``opts["encoder_config"]`` (encoder constructor kwargs, e.g. a narrow variant) and
``opts["generator_config"]`` (Generator kwargs); official files have neither, so the generator is inferred from
the decoder's shapes and the encoder from the body's units (IR-SE-50, input 256 for the releases).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Mapping, NamedTuple, Optional

import torch
from torch import nn

from networks.checkpoints import (CheckpointError, infer_generator_config, load_strict, plain_containers, safe_load,
                                  save_atomic)
from networks.encoders import build_encoder
from networks.encoders.irse import infer_backbone_args
from networks.stylegan2 import Generator

ENCODER_TYPES = {"Encoder4Editing": "e4e", "GradualStyleEncoder": "psp"}
KIND_TO_TYPE = {kind: name for name, kind in ENCODER_TYPES.items()}
OFFICIAL_INPUT_SIZE = 256  # e4e / pSp resize every input to 256x256


class LoadedEncoder(NamedTuple):
    """What ``load_e4e_checkpoint`` returns.

    Fields:
        encoder: ``Encoder4Editing`` / ``GradualStyleEncoder`` in eval mode (all deltas on).
        generator: the ``decoder`` as a ``networks.stylegan2.Generator`` in eval mode.
        latent_avg: (n_styles, style_dim) offset to add to ``encoder(x)`` (zeros when
            ``opts["start_from_latent_avg"]`` is false).
        opts: the file's ``opts`` as a plain dict.
    """

    encoder: nn.Module
    generator: Generator
    latent_avg: torch.Tensor
    opts: Dict[str, Any]


def _sub_state(state: Mapping[str, Any], prefix: str) -> Dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if isinstance(k, str) and k.startswith(prefix)}


def _as_rows(latent_avg: torch.Tensor, n_styles: int, style_dim: int, where: str) -> torch.Tensor:
    """(style_dim,), (1, style_dim) or (n_styles, style_dim) -> (n_styles, style_dim) float32."""
    t = torch.as_tensor(latent_avg).detach().float().cpu()
    if t.numel() == style_dim:
        return t.reshape(1, style_dim).repeat(n_styles, 1)
    if tuple(t.shape) == (n_styles, style_dim):
        return t.clone()
    raise CheckpointError(f"{where}: latent_avg has shape {tuple(t.shape)}; expected ({style_dim},) or "
                          f"({n_styles}, {style_dim}) for a generator with n_latent={n_styles}, style_dim={style_dim}")


def load_e4e_checkpoint(path, *, trust: bool = False, map_location="cpu",
                       trust_key: Optional[str] = None) -> LoadedEncoder:
    """Load an official e4e / pSp checkpoint, or one written by ``export_e4e_checkpoint``.

    Args:
        path: the ``.pt`` file.
        trust: allow files that need full unpickling (see ``networks.checkpoints.safe_load``).
        map_location: passed to ``torch.load``.
    Returns:
        ``LoadedEncoder(encoder, generator, latent_avg (n_styles, style_dim), opts)``; reconstruct with
        ``generator([encoder(x) + latent_avg], input_is_latent=True)`` for x (B, 3, input_size, input_size).
    Raises:
        CheckpointError: unreadable file, wrong layout (no ``state_dict``, no ``encoder.*`` / ``decoder.*``
            keys, unknown ``opts["encoder_type"]``) or keys / shapes that do not fit; the message names the file.
    """
    path = Path(path)
    ckpt = safe_load(path, trust=trust, map_location=map_location, trust_key=trust_key)
    layout = ("an e4e/pSp checkpoint is a dict with 'state_dict' (encoder.* and decoder.* keys), 'opts' "
              "(with encoder_type) and 'latent_avg'")
    if not isinstance(ckpt, Mapping) or not isinstance(ckpt.get("state_dict"), Mapping):
        found = sorted(map(str, ckpt))[:10] if isinstance(ckpt, Mapping) else type(ckpt).__name__
        raise CheckpointError(f"{path} is not an e4e/pSp encoder checkpoint: {layout}; found {found}")
    state = ckpt["state_dict"]
    opts = ckpt.get("opts") or {}
    if not isinstance(opts, Mapping):
        opts = vars(opts) if hasattr(opts, "__dict__") else None
        if opts is None:
            raise CheckpointError(f"{path}: 'opts' must be a dict; {layout}")
    opts = dict(opts)
    enc_state, dec_state = _sub_state(state, "encoder."), _sub_state(state, "decoder.")
    if not enc_state:
        raise CheckpointError(f"{path}: state_dict has no 'encoder.*' keys ({layout})")
    if not dec_state:
        raise CheckpointError(f"{path}: state_dict has no 'decoder.*' keys (the generator is required; {layout})")

    encoder_type = opts.get("encoder_type")
    if encoder_type not in ENCODER_TYPES:
        raise CheckpointError(f"{path}: opts['encoder_type'] is {encoder_type!r}; supported: {list(ENCODER_TYPES)}")

    gen_cfg = opts.get("generator_config")
    if gen_cfg is None:
        try:
            gen_cfg = infer_generator_config(dec_state)
        except CheckpointError as err:
            raise CheckpointError(f"{path}: decoder.*: {err}") from None
    generator = Generator(**dict(gen_cfg))
    load_strict(generator, dec_state, f"{path} [decoder.*]")
    for key in ("stylegan_size", "output_size"):
        if opts.get(key) is not None and int(opts[key]) != generator.size:
            raise CheckpointError(f"{path}: opts['{key}']={opts[key]} but the decoder makes "
                                  f"{generator.size}x{generator.size} images")

    n_styles, style_dim = generator.n_latent, generator.style_dim
    enc_cfg = opts.get("encoder_config")
    if enc_cfg is None:
        try:
            enc_cfg = infer_backbone_args(enc_state)
        except KeyError as err:
            raise CheckpointError(f"{path}: encoder.*: not an IR-SE encoder (no key {err})") from None
        enc_cfg.update(input_size=OFFICIAL_INPUT_SIZE, input_nc=int(opts.get("input_nc", 3)))
    enc_cfg = dict(enc_cfg)
    for key, expected in (("n_styles", n_styles), ("style_dim", style_dim)):
        if enc_cfg.setdefault(key, expected) != expected:
            raise CheckpointError(f"{path}: opts['encoder_config']['{key}']={enc_cfg[key]} does not match the "
                                  f"decoder ({key}={expected})")
    try:
        encoder = build_encoder(ENCODER_TYPES[encoder_type], **enc_cfg)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: opts['encoder_config'] is not a valid {encoder_type} config: {err}") from None
    load_strict(encoder, enc_state, f"{path} [encoder.*]")

    if not opts.get("start_from_latent_avg", True):
        latent_avg = torch.zeros(n_styles, style_dim)
    elif ckpt.get("latent_avg") is None:
        raise CheckpointError(f"{path}: opts['start_from_latent_avg'] is true but the file has no 'latent_avg'")
    else:
        latent_avg = _as_rows(ckpt["latent_avg"], n_styles, style_dim, str(path))
    return LoadedEncoder(encoder.eval(), generator.eval(), latent_avg, opts)


def export_e4e_checkpoint(path, encoder: nn.Module, generator: Generator, latent_avg: torch.Tensor, *,
                          opts: Optional[Mapping[str, Any]] = None,
                          extra: Optional[Mapping[str, Any]] = None) -> Path:
    """Write ``encoder`` + ``generator`` in the e4e / pSp checkpoint layout (atomically: tmp file + ``os.replace``).

    Args:
        path: output file (parent directories are created).
        encoder: an ``Encoder4Editing`` or ``GradualStyleEncoder`` (with ``kind`` and ``config``).
        generator: the decoder (``networks.stylegan2.Generator``).
        latent_avg: (style_dim,), (1, style_dim) or (n_styles, style_dim); stored as (n_styles, style_dim).
        opts: more ``opts`` entries (JSON-like values). ``encoder_type``, ``encoder_config``, ``generator_config``,
            ``stylegan_size``, ``output_size`` and ``n_styles`` are always taken from the networks;
            ``start_from_latent_avg`` defaults to True.
        extra: more top-level entries (must not be named state_dict / opts / latent_avg).
    Returns:
        The written path; ``load_e4e_checkpoint`` reads it back to identical networks and latent_avg.
    Raises:
        ValueError: an encoder of unknown kind, mismatched sizes, or clashing ``extra`` keys.
    """
    path = Path(path)
    kind = getattr(encoder, "kind", None)
    if kind not in KIND_TO_TYPE:
        raise ValueError(f"export_e4e_checkpoint: encoder kind {kind!r} is not one of {list(KIND_TO_TYPE)}")
    cfg = dict(encoder.config)
    if (cfg["n_styles"], cfg["style_dim"]) != (generator.n_latent, generator.style_dim):
        raise ValueError(f"export_e4e_checkpoint: encoder makes ({cfg['n_styles']}, {cfg['style_dim']}) codes but "
                         f"the generator takes ({generator.n_latent}, {generator.style_dim})")
    try:
        rows = _as_rows(latent_avg, generator.n_latent, generator.style_dim, "export_e4e_checkpoint")
    except CheckpointError as err:
        raise ValueError(str(err)) from None
    clash = sorted(set(extra or {}) & {"state_dict", "opts", "latent_avg"})
    if clash:
        raise ValueError(f"export_e4e_checkpoint: extra may not override {clash}")

    state = {f"encoder.{k}": v.detach().cpu().clone() for k, v in encoder.state_dict().items()}
    state.update({f"decoder.{k}": v.detach().cpu().clone() for k, v in generator.state_dict().items()})
    full_opts = dict(opts or {})
    full_opts.setdefault("start_from_latent_avg", True)
    full_opts.update(encoder_type=KIND_TO_TYPE[kind], encoder_config=plain_containers(cfg),
                     generator_config=plain_containers(dict(generator.config)), stylegan_size=int(generator.size),
                     output_size=int(generator.size), n_styles=int(generator.n_latent))
    ckpt: Dict[str, Any] = {"state_dict": state, "opts": full_opts, "latent_avg": rows}
    ckpt.update(extra or {})

    return save_atomic(ckpt, path)
