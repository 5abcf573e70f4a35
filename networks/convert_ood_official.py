"""Convert official OOD-GAN-inversion (ICCV 2023) stage-2 checkpoints to this project's ``AlignMaskNet``.

Input: a ``net_g_<iter>.pth`` written by the official training (AbnerVictor/OOD-GAN-inversion,
``ood_faceGAN_Model.save``): ``{"params": state, "params_ema": state}``, each state filtered to the keys that
contain ``modulation`` or ``feats_conv`` (the official inference loads ``params_ema``). A bare state dict with
those keys is accepted too. Output: the stage-2 hand-off ``{"state_dict", "config", "meta"}`` of
``networks.align_mask.save_align_mask``, configured for the official function (``OFFICIAL_MATHS``)::

    python -m networks.convert_ood_official net_g_410000.pth align_mask.pt [--param-key params_ema]
        [--cycles 2] [--warp-scale 0.08]

``networks.align_mask.load_align_mask`` (and so ``model.align_mask_checkpoint``) also reads an official file
directly, converting it in memory with the defaults below.

Key mapping (official level index i is the resolution r = 2 ** (8 - i): 0 -> 256, 1 -> 128, 2 -> 64, 3 -> 32):

* ``feats_conv.{i}.{weight,bias}`` -> ``levels.{r}.proj.*`` (the 1x1 conv on encoder tap f_i);
* ``modulation.{i}.alignment.body.body.{j}.res_layer.{k}.*`` -> ``levels.{r}.align.body.{j}.res.{k}.*``;
* ``modulation.{i}.alignment.body.body.{j}.shortcut_layer.{k}.*`` -> ``levels.{r}.align.body.{j}.shortcut.{k}.*``;
* ``modulation.{i}.alignment.blur.kernel`` -> ``levels.{r}.align.blur.kernel``;
* dropped: ``modulation.{i}.weight`` and ``modulation.{i}.noiseInj.weight`` (built but never used by the official
  forward) and every ``generator.*`` key (the save filter keeps the frozen generator's ``*.modulation.*`` style
  layers; this project takes the generator from the stage-1 file).

Any other key is kept under its own name, so the strict load reports it (with missing and mis-shaped keys) in a
``CheckpointError`` naming the file. Not stored in an official file, taken from the official test config
(``options/test/E4E_Face_test.yml``) unless given: ``warp_scale`` 0.08, ``cycles`` (``cycle_align``) 2. The
architecture (channels per level, encoder tap channels, conv biases) is read from the tensor shapes; the encoder
input is 256 px, as in the official e4e variant.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from networks.align_mask import OFFICIAL_MATHS, AlignMaskNet, save_align_mask
from networks.checkpoints import CheckpointError, load_strict, safe_load

PARAM_KEYS = ("params_ema", "params")
OFFICIAL_TEST_CONFIG = {"warp_scale": 0.08, "cycles": 2}
ENCODER_INPUT_SIZE = 256
PRODUCED_BY = "networks.convert_ood_official"

_RENAMES = (
    (re.compile(r"^feats_conv\.(\d+)\.(weight|bias)$"), "proj.{1}"),
    (re.compile(r"^modulation\.(\d+)\.alignment\.body\.body\.(\d+)\.res_layer\.(.+)$"), "align.body.{1}.res.{2}"),
    (re.compile(r"^modulation\.(\d+)\.alignment\.body\.body\.(\d+)\.shortcut_layer\.(.+)$"),
     "align.body.{1}.shortcut.{2}"),
    (re.compile(r"^modulation\.(\d+)\.alignment\.blur\.kernel$"), "align.blur.kernel"),
)
_DROPPED = re.compile(r"^(generator\..*|modulation\.\d+\.weight|modulation\.\d+\.noiseInj\.weight)$")
_FIRST_CONV = re.compile(r"^modulation\.(\d+)\.alignment\.body\.body\.0\.res_layer\.1\.weight$")


def level_resolution(index: int) -> int:
    """Official level index -> resolution: 2 ** (8 - index) (0 -> 256 ... 3 -> 32)."""
    return 2 ** (8 - int(index))


def _has_official_keys(state: Any) -> bool:
    return isinstance(state, Mapping) and any(isinstance(k, str) and k.startswith(("modulation.", "feats_conv."))
                                              for k in state)


def is_official_checkpoint(ckpt: Any) -> bool:
    """True for an official ``net_g_*.pth`` (``params_ema`` / ``params`` holding ``modulation.*`` / ``feats_conv.*``
    keys) or a bare state dict with such keys."""
    if not isinstance(ckpt, Mapping):
        return False
    return any(_has_official_keys(ckpt.get(k)) for k in PARAM_KEYS) or _has_official_keys(ckpt)


def select_state(ckpt: Mapping, param_key: str = "params_ema", source: str = "<checkpoint>") -> Mapping:
    """The official state dict inside a checkpoint: ``ckpt[param_key]``, or ``ckpt`` itself when it is bare."""
    if param_key in ckpt and isinstance(ckpt[param_key], Mapping):
        return ckpt[param_key]
    if _has_official_keys(ckpt) and not any(k in ckpt for k in PARAM_KEYS):
        return ckpt
    raise CheckpointError(f"{source}: no {param_key!r} state in this official checkpoint (it holds "
                          f"{sorted(k for k in PARAM_KEYS if k in ckpt)}; choose one with --param-key)")


def convert_official_state(state: Mapping[str, torch.Tensor], warp_scale: float = 0.08, cycles: int = 2,
                           source: str = "<checkpoint>") -> Tuple[Dict[str, torch.Tensor], Dict[str, Any], List[str]]:
    """Official state dict -> (our state dict, ``AlignMaskNet`` kwargs, dropped official keys).

    The kwargs describe the official function (``OFFICIAL_MATHS``, no error cue); channels per level come from the
    first IR conv of each level ((2C, 2C, 3, 3)), tap channels from ``feats_conv.{i}.weight`` ((C, Ct, 1, 1)).
    """
    indices = sorted(int(m.group(1)) for k in state if (m := _FIRST_CONV.match(k)))
    if not indices:
        raise CheckpointError(f"{source}: no official alignment weights (modulation.<i>.alignment.body.body.0."
                              f"res_layer.1.weight); is it an OOD-GAN-inversion net_g_*.pth?")
    generator_channels, tap_channels = {}, {}
    for i in indices:
        generator_channels[level_resolution(i)] = int(state[f"modulation.{i}.alignment.body.body.0.res_layer.1.weight"]
                                                      .shape[0]) // 2
        key = f"feats_conv.{i}.weight"
        if key not in state:
            raise CheckpointError(f"{source}: official level {i} ({level_resolution(i)} px) has no {key} "
                                  f"(the e4e variant's 1x1 conv on encoder tap f{i})")
        tap_channels[f"f{i}"] = int(state[key].shape[1])
    bias = f"modulation.{indices[0]}.alignment.body.body.0.res_layer.1.bias" in state
    config = dict(generator_channels=generator_channels, tap_channels=tap_channels,
                  levels=sorted(generator_channels), encoder_input_size=ENCODER_INPUT_SIZE,
                  warp_scale=float(warp_scale), cycles=int(cycles), bias=bias, alpha_init=0.0, error_cue=False,
                  **OFFICIAL_MATHS)
    ours: Dict[str, torch.Tensor] = {}
    dropped: List[str] = []
    for key, value in state.items():
        if _DROPPED.match(key):
            dropped.append(key)
            continue
        for pattern, template in _RENAMES:
            m = pattern.match(key)
            if m:
                ours[f"levels.{level_resolution(int(m.group(1)))}." + template.format(*m.groups())] = value
                break
        else:
            ours[key] = value  # not an official stage-2 key: the strict load names it as unexpected
    return ours, config, dropped


def load_official(ckpt, param_key: str = "params_ema", warp_scale: float = 0.08, cycles: int = 2,
                  source: Optional[str] = None) -> Tuple[AlignMaskNet, Dict[str, Any]]:
    """An official checkpoint (a path or the loaded dict) -> (AlignMaskNet in eval mode running the official
    function, meta {"produced_by", "converted_from", "official": {...}}). CheckpointError naming the file for
    anything that does not fit (missing / unexpected / mis-shaped keys)."""
    if not isinstance(ckpt, Mapping):
        source = source or str(ckpt)
        ckpt = safe_load(Path(ckpt).expanduser())
    source = source or "<checkpoint>"
    state = select_state(ckpt, param_key, source)
    ours, config, dropped = convert_official_state(state, warp_scale, cycles, source)
    net = AlignMaskNet(**config)
    load_strict(net, ours, source=f"{source} (official OOD-GAN-inversion layout, {param_key})")
    meta = {"produced_by": PRODUCED_BY, "converted_from": source,
            "official": {"param_key": param_key, "dropped_keys": len(dropped), "warp_scale": float(warp_scale),
                         "cycles": int(cycles)}}
    return net.eval(), meta


def convert_ood_official(in_path, out_path, param_key: str = "params_ema", warp_scale: float = 0.08,
                         cycles: int = 2) -> Tuple[Path, AlignMaskNet, Dict[str, Any]]:
    """Convert an official ``net_g_*.pth`` into a stage-2 hand-off at ``out_path``; returns (path, net, meta)."""
    source = str(Path(in_path).expanduser().resolve())
    net, meta = load_official(safe_load(Path(in_path).expanduser()), param_key, warp_scale, cycles, source)
    return save_align_mask(out_path, net, meta), net, meta


def main(argv: Optional[Sequence[str]] = None) -> int:
    """CLI: ``python -m networks.convert_ood_official IN.pth OUT.pt [--param-key K] [--cycles N] [--warp-scale S]``."""
    parser = argparse.ArgumentParser(
        prog="python -m networks.convert_ood_official",
        description="Convert an official OOD-GAN-inversion stage-2 checkpoint (net_g_*.pth) to this project's "
                    "align_mask.pt (runs with the official resampling choices).")
    parser.add_argument("input", help="official net_g_<iter>.pth (or a bare state dict with modulation.* keys)")
    parser.add_argument("output", help="output align_mask.pt (state_dict, config, meta)")
    parser.add_argument("--param-key", default="params_ema", choices=PARAM_KEYS,
                        help="which weights to convert (the official inference uses params_ema)")
    parser.add_argument("--cycles", type=int, default=OFFICIAL_TEST_CONFIG["cycles"],
                        help="alignment cycles (official cycle_align; not stored in the file)")
    parser.add_argument("--warp-scale", type=float, default=OFFICIAL_TEST_CONFIG["warp_scale"],
                        help="flow bound (official warp_scale; not stored in the file)")
    args = parser.parse_args(argv)
    try:
        path, net, meta = convert_ood_official(args.input, args.output, args.param_key, args.warp_scale, args.cycles)
    except CheckpointError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    levels = ", ".join(f"{r} px: {net.levels[str(r)].channels} ch <- {net.taps[r]}" for r in net.level_list)
    print(f"wrote {path}: levels {levels}; {meta['official']['dropped_keys']} unused official keys dropped "
          f"(generator style layers, unused modulation scalars)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
