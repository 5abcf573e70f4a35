"""Convert NVlabs StyleGAN2 generator pickles to this project's rosinality-layout generator file.

Input: ``network-snapshot-*.pkl`` / ``ffhq.pkl`` from NVlabs/stylegan2-ada-pytorch, or a StyleGAN2
pickle from NVlabs/stylegan3 (``training/networks_stylegan2.py``). Output: the layout written by
``networks.checkpoints.export_generator``::

    {"g_ema": state_dict, "latent_avg": (style_dim,),
     "meta": {"generator": Generator kwargs, "converted_from": path, "nvlabs": {...}}}

Usage::

    python -m networks.convert_nvlabs IN.pkl OUT.pt [--which G_ema]

How the pickle is read (facts from NVlabs/stylegan2-ada-pytorch, ``torch_utils/persistence.py`` and
``training/training_loop.py``): a snapshot is ``pickle.dump(dict(G=..., D=..., G_ema=...,
augment_pipe=..., training_set_kwargs=...))``. Every network class is decorated with
``persistence.persistent_class``, whose ``__reduce__`` returns
``(torch_utils.persistence._reconstruct_persistent_obj, (meta,), None)`` with
``meta = dict(type='class', version=6, module_src=<source text of the defining module>,
class_name=..., state=<the module's __dict__>)``. NVlabs' loader ``exec()``s ``module_src``; this
converter never does. A restricted ``pickle.Unpickler`` maps that function to
``_reconstruct_persistent`` (which keeps ``meta`` as a ``PersistentObject``) and refuses every global
that is not on a short allow-list (tensor/storage rebuild functions, ``OrderedDict``/``set``,
``dnnlib.util.EasyDict`` as a dict, numpy scalar/array reconstruction). Tensors in such pickles are
pickled by plain ``pickle`` (not ``torch.save``): ``torch._utils._rebuild_tensor_v2`` over
``torch.storage._load_from_bytes(bytes)``, where the bytes are a legacy ``torch.save`` of one
storage; those bytes are read here with ``torch.load(weights_only=True)``.

Parameter mapping facts (all verified numerically by ``tests/test_convert_nvlabs.py`` against a
forward pass written with NVlabs' maths):

* Up-sampling convs (``synthesis.bR.conv0.weight``) are copied **without flipping**. NVlabs
  ``training/networks.py`` ``SynthesisLayer.forward`` passes ``flip_weight=(self.up == 1)`` i.e.
  False for up=2, and ``torch_utils/ops/conv2d_resample.py`` then runs ``conv_transpose2d`` with
  ``flip_weight=(not flip_weight)`` = True (no flip), weight transposed to (in, out), stride 2,
  padding 0, followed by a FIR filter with padding (1, 1) and gain up**2 = 4: the same operation as
  rosinality's ``ModulatedConv2d(upsample=True)`` (``conv_transpose2d`` + ``Blur`` pad (1, 1),
  kernel x 4). Consistently, both TF converters flip TF's ``Conv0_up/weight``: NVlabs ``legacy.py``
  (``[::-1, ::-1]``) and rosinality ``convert_weight.py`` (``flip=True``), so NVlabs-PyTorch and
  rosinality weights are equal; dvschultz's ``export_weights.py`` (stylegan2-ada-pytorch fork) also
  copies them unflipped.
* ToRGB: NVlabs ``ToRGBLayer`` multiplies the *styles* by ``weight_gain = 1/sqrt(in*k*k)`` and runs
  ``modulated_conv2d(demodulate=False)``; rosinality's ``ToRGB`` conv multiplies the *weight* by
  ``scale = 1/sqrt(in*k*k)``. Both products are the same, so the weight is copied as is (a file with
  a different ``weight_gain`` is rescaled by ``weight_gain * sqrt(in*k*k)``).
* Modulated 3x3 convs: NVlabs applies no weight gain (demodulation removes any constant scale);
  rosinality multiplies by ``scale`` before demodulating, which only changes the effect of the
  1e-8 epsilon (negligible). Copied as is.
* Mapping: NVlabs ``FullyConnectedLayer`` uses ``weight_gain = lr_multiplier/sqrt(in)`` and
  ``bias_gain = lr_multiplier``; rosinality ``EqualLinear`` uses ``scale = lr_mul/sqrt(in)`` and
  ``bias * lr_mul``. With ``lr_mlp`` = the mapping's ``lr_multiplier`` (default 0.01,
  ``MappingNetwork``; ``legacy.py`` ``mapping_lrmul``) weights and biases are copied as is;
  ``lr_mlp`` is read from the pickled ``bias_gain``. ``normalize_2nd_moment`` equals ``PixelNorm``
  (eps 1e-8), and ``bias_act`` 'lrelu' (slope 0.2, gain sqrt 2) equals the fused leaky ReLU.
* Affine layers (``affine.*``, ``bias_init=1``, lr 1) -> ``conv.modulation.*``: NVlabs ``legacy.py``
  and rosinality ``convert_weight.py`` both store TF's ``mod_bias + 1``, so biases copy as is.
* ``mapping.w_avg`` -> ``latent_avg``: ``legacy.py`` fills ``mapping.w_avg`` from TF
  ``dlatent_avg``, which rosinality's ``convert_weight.py`` stores as ``latent_avg``.
* Noise: NVlabs adds ``noise_const * noise_strength`` after the conv, before bias + activation, as
  rosinality's ``NoiseInjection`` does. ``noise_const`` (r, r) -> ``noises.noise_i`` (1, 1, r, r) with
  b4.conv1 -> 0, bR.conv0 -> 2*log2(R)-5, bR.conv1 -> 2*log2(R)-4 (``legacy.py`` noise indices).
* ``resample_filter`` = ``upfirdn2d.setup_filter([1,3,3,1])`` (normalised 4x4 outer product);
  rosinality's ``blur.kernel`` / ``upsample.kernel`` are that times 4 (the up-sampling gain).
* Channels: NVlabs ``min(channel_base // res, channel_max)``; rosinality
  ``min(channel_max, 16384 * channel_multiplier / res)``, so channel_multiplier = channel_base/16384.

Not representable in the rosinality maths (recorded in ``meta["nvlabs"]``, reported by the CLI):
``conv_clamp`` (NVlabs clamps layer outputs to +-conv_clamp) and FP16 execution of the
``num_fp16_res`` highest resolutions. Conditional (c_dim > 0), 'orig'/'resnet' synthesis
architectures and StyleGAN3 generators are refused.
"""
from __future__ import annotations

import argparse
import io
import math
import pickle
import re
import sys
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
import torch._utils

from .checkpoints import CheckpointError, describe_mismatch, export_generator, load_strict
from .stylegan2 import Generator, channel_table


class NVlabsConversionError(CheckpointError):
    """The NVlabs pickle is unsafe, unreadable, or holds a network this converter cannot map."""


# ------------------------------------------------------------------------------------------------
# Restricted unpickling


@dataclass
class PersistentObject:
    """An NVlabs ``persistent_class`` object as stored in the pickle, without its code.

    Attributes:
        class_name: e.g. "Generator", "SynthesisLayer".
        state: the module's ``__dict__`` (``_parameters``, ``_buffers``, ``_modules``,
            ``_init_kwargs``, plain attributes such as ``weight_gain``).
        module_src: source text of the defining module (kept for inspection, never executed).
        version: NVlabs persistence format version.
    """

    class_name: str
    state: Dict[str, Any]
    module_src: str = field(default="", repr=False)
    version: Any = None

    def children(self) -> "OrderedDict[str, Any]":
        """Sub-modules by attribute name (values are ``PersistentObject`` or None)."""
        return self.state.get("_modules") or OrderedDict()

    def child(self, name: str) -> Optional["PersistentObject"]:
        """The sub-module ``name`` or None."""
        return self.children().get(name)

    def attr(self, name: str, default: Any = None) -> Any:
        """A plain attribute of the pickled module (e.g. ``weight_gain``), or ``default``."""
        return self.state.get(name, default)

    @property
    def init_kwargs(self) -> Dict[str, Any]:
        """Constructor kwargs NVlabs recorded for the module (plain nested dicts)."""
        return _plain(self.state.get("_init_kwargs") or {})


class _EasyDict(dict):
    """Stand-in for ``dnnlib.util.EasyDict`` (a dict with attribute access): just a dict."""

    def __setstate__(self, state):
        if isinstance(state, dict):
            self.update(state)


def _plain(value):
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    if isinstance(value, np.generic):
        return value.item()
    return value


def _reconstruct_persistent(meta):
    """Replacement for ``torch_utils.persistence._reconstruct_persistent_obj``: keep, don't execute."""
    if not isinstance(meta, dict) or meta.get("type") != "class" or not isinstance(meta.get("state"), dict):
        raise pickle.UnpicklingError("malformed NVlabs persistent object (expected meta dict with type='class' "
                                     "and a state dict)")
    return PersistentObject(class_name=str(meta.get("class_name")), state=dict(meta["state"]),
                            module_src=str(meta.get("module_src") or ""), version=meta.get("version"))


def _load_storage(data):
    """Replacement for ``torch.storage._load_from_bytes``: the same bytes, read with weights_only=True."""
    if not isinstance(data, (bytes, bytearray)):
        raise pickle.UnpicklingError("storage payload is not bytes")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TypedStorage deprecation noise
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
    """Parameters become plain tensors (the converter only needs values)."""
    if not isinstance(data, torch.Tensor):
        raise pickle.UnpicklingError("parameter payload is not a tensor")
    return data.detach()


def _latin1_bytes(text, encoding="latin1"):
    """Replacement for ``_codecs.encode``, which protocol-2 pickles use to store bytes."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("unexpected _codecs.encode call in pickle")
    return text.encode("latin1")


def _numpy_multiarray():
    try:
        from numpy._core import multiarray  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray
    return multiarray


def _allowed_globals() -> Dict[Tuple[str, str], Any]:
    multiarray = _numpy_multiarray()
    allowed: Dict[Tuple[str, str], Any] = {
        ("torch_utils.persistence", "_reconstruct_persistent_obj"): _reconstruct_persistent,
        ("dnnlib.util", "EasyDict"): _EasyDict,
        ("dnnlib", "EasyDict"): _EasyDict,
        ("collections", "OrderedDict"): OrderedDict,
        ("builtins", "set"): set,
        ("builtins", "frozenset"): frozenset,
        ("__builtin__", "set"): set,  # protocol < 3 spelling (pickle's fix_imports)
        ("__builtin__", "frozenset"): frozenset,
        ("_codecs", "encode"): _latin1_bytes,
        ("torch._utils", "_rebuild_tensor"): torch._utils._rebuild_tensor,
        ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
        ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
        ("torch.storage", "_load_from_bytes"): _load_storage,
        ("numpy", "dtype"): np.dtype,
        ("numpy", "ndarray"): np.ndarray,
    }
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(mod, "scalar")] = multiarray.scalar
        allowed[(mod, "_reconstruct")] = multiarray._reconstruct
    return allowed


class RestrictedUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` that only resolves allow-listed globals and never runs pickled code.

    Args:
        file: binary file object positioned at the pickle.
        source: name used in error messages (the file path).
    Raises (from ``load``):
        NVlabsConversionError: a global outside the allow-list, naming ``module.name``.
    """

    def __init__(self, file, source: str = "<pickle>"):
        super().__init__(file)
        self._source = source
        self._allowed = _allowed_globals()

    def find_class(self, module: str, name: str):
        target = self._allowed.get((module, name))
        if target is not None:
            return target
        hint = ""
        if module.startswith("dnnlib.tflib"):
            hint = (" This is a TensorFlow StyleGAN pickle: convert it with rosinality's convert_weight.py "
                    "(or NVlabs' legacy.py) instead.")
        elif module.startswith("torch_utils") or module.startswith("training"):
            hint = " Only NVlabs persistent_class objects are supported (their code is never imported)."
        raise NVlabsConversionError(
            f"{self._source}: refusing to unpickle global '{module}.{name}': it is not on the allow-list "
            f"(tensor/storage rebuilders, OrderedDict, set, dnnlib EasyDict, numpy scalars/arrays, NVlabs "
            f"persistence). Loading it could run arbitrary code.{hint}")

    def persistent_load(self, pid):
        raise NVlabsConversionError(f"{self._source}: unexpected persistent id {str(pid)[:80]!r}: this is not a "
                                    f"plain NVlabs pickle (torch.save files are not NVlabs network pickles)")


def load_nvlabs_pickle(path) -> Any:
    """Read an NVlabs network pickle safely.

    Args:
        path: ``.pkl`` file.
    Returns:
        The unpickled top-level object (usually a dict with "G", "D", "G_ema", ...), where each
        network is a ``PersistentObject`` and tensors are plain CPU tensors.
    Raises:
        NVlabsConversionError: missing/unreadable file or disallowed content.
    """
    path = Path(path)
    if not path.is_file():
        raise NVlabsConversionError(f"NVlabs pickle not found: {path}")
    with open(path, "rb") as f:
        head = f.read(4)
        if head == b"PK\x03\x04":
            raise NVlabsConversionError(f"{path} is a zip (torch.save) file, not an NVlabs network pickle; "
                                        f"if it is already a rosinality checkpoint, load it directly")
        f.seek(0)
        try:
            return RestrictedUnpickler(f, source=str(path)).load()
        except NVlabsConversionError:
            raise
        except (pickle.UnpicklingError, EOFError, AttributeError, ValueError, TypeError, RuntimeError) as err:
            raise NVlabsConversionError(f"{path} is not a readable NVlabs network pickle: "
                                        f"{type(err).__name__}: {err}") from None


# ------------------------------------------------------------------------------------------------
# Module tree -> flat NVlabs state dict


def flatten_state(obj: PersistentObject, prefix: str = "") -> "OrderedDict[str, torch.Tensor]":
    """Walk a ``PersistentObject`` tree into a state dict with NVlabs names.

    Args:
        obj: the root module (e.g. the pickled ``G_ema``).
        prefix: prepended to every key.
    Returns:
        {"mapping.fc0.weight": tensor, ..., "synthesis.b4.const": tensor, ...} (params and
        persistent buffers, like ``nn.Module.state_dict``).
    """
    out: "OrderedDict[str, torch.Tensor]" = OrderedDict()
    non_persistent = set(obj.state.get("_non_persistent_buffers_set") or ())
    for group in ("_parameters", "_buffers"):
        for name, value in (obj.state.get(group) or {}).items():
            if value is None or (group == "_buffers" and name in non_persistent):
                continue
            if not isinstance(value, torch.Tensor):
                raise NVlabsConversionError(f"{prefix}{name} is a {type(value).__name__}, expected a tensor")
            out[prefix + name] = value
    for name, child in obj.children().items():
        if child is None:
            continue
        if not isinstance(child, PersistentObject):
            raise NVlabsConversionError(f"sub-module {prefix}{name} is a {type(child).__name__}, expected an "
                                        f"NVlabs persistent module")
        out.update(flatten_state(child, f"{prefix}{name}."))
    return out


# ------------------------------------------------------------------------------------------------
# Generator description


@dataclass
class NVlabsGenerator:
    """What the converter learned about one pickled StyleGAN2 generator.

    Attributes:
        config: ``networks.stylegan2.Generator`` kwargs.
        state: flat NVlabs state dict (see ``flatten_state``).
        root: the pickled module tree.
        notes: NVlabs-only settings without rosinality equivalent (conv_clamp, num_fp16_res, ...).
    """

    config: Dict[str, Any]
    state: Dict[str, torch.Tensor]
    root: PersistentObject
    notes: Dict[str, Any]

    @property
    def resolutions(self) -> List[int]:
        """Synthesis block resolutions 4, 8, ..., size."""
        return [2 ** i for i in range(2, int(math.log2(self.config["size"])) + 1)]


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise NVlabsConversionError(msg)


def _taps_from_filter(f: torch.Tensor) -> List[float]:
    """Recover 1-D FIR taps from NVlabs' ``setup_filter`` output (2-D normalised outer product or 1-D)."""
    taps = (f.double().sum(1) if f.ndim == 2 else f.double())
    taps = taps / taps.min()
    rounded = taps.round()
    if torch.allclose(taps, rounded, atol=1e-4):
        return [int(v) for v in rounded.tolist()]
    return [float(v) for v in taps.tolist()]


def _choose_channels(channels: Dict[int, int], size: int, kwargs_cm: Optional[float]) -> Tuple[float, int]:
    channel_max = max(channels.values())
    candidates = []
    if kwargs_cm:
        candidates.append(kwargs_cm)
    for res in sorted(channels):
        if channels[res] < channel_max:
            candidates.append(channels[res] * res / 16384)
            break
    candidates += [2, 1]
    for cm in candidates:
        cm = int(cm) if float(cm).is_integer() else float(cm)
        if channel_table(size, cm, channel_max) == channels:
            return cm, channel_max
    raise NVlabsConversionError(f"channel widths {channels} do not follow min(channel_max, 16384*cm/res) for any "
                                f"channel_multiplier; cannot express them as a rosinality Generator")


def describe_generator(root: PersistentObject, source: str = "<pickle>") -> NVlabsGenerator:
    """Check that ``root`` is an unconditional StyleGAN2 'skip' generator and infer its config.

    Args:
        root: the pickled generator object (``data["G_ema"]``).
        source: name for error messages.
    Returns:
        ``NVlabsGenerator`` with rosinality ``Generator`` kwargs and the flat NVlabs state.
    Raises:
        NVlabsConversionError: StyleGAN3, conditional, non-'skip' or otherwise unmappable networks.
    """
    _require(isinstance(root, PersistentObject),
             f"{source}: expected an NVlabs network object, found {type(root).__name__}")
    _require(root.class_name == "Generator", f"{source}: object is a {root.class_name}, not a Generator")
    synthesis, mapping = root.child("synthesis"), root.child("mapping")
    _require(isinstance(synthesis, PersistentObject) and isinstance(mapping, PersistentObject),
             f"{source}: generator has no synthesis/mapping sub-networks")
    syn_children = synthesis.children()
    if ("input" in syn_children or any(re.fullmatch(r"L\d+_\d+_\d+", n) for n in syn_children)
            or "class SynthesisInput" in synthesis.module_src):
        raise NVlabsConversionError(
            f"{source}: this is a StyleGAN3 generator (SynthesisInput + L*_ layers, networks_stylegan3.py); only "
            f"StyleGAN2 generators (synthesis blocks b4, b8, ...) can be converted to the rosinality layout")
    state = flatten_state(root)
    gkw = root.init_kwargs
    skw = gkw.get("synthesis_kwargs") or {}
    mkw = gkw.get("mapping_kwargs") or {}

    c_dim = int(root.attr("c_dim", gkw.get("c_dim", 0)) or 0)
    _require(c_dim == 0 and mapping.child("embed") is None,
             f"{source}: conditional generator (c_dim={c_dim}); rosinality's Generator has no label embedding")

    blocks = sorted(int(m.group(1)) for n in syn_children if (m := re.fullmatch(r"b(\d+)", n)))
    _require(bool(blocks) and blocks[0] == 4, f"{source}: synthesis network has no b4 block; not StyleGAN2")
    size = blocks[-1]
    _require(blocks == [2 ** i for i in range(2, int(math.log2(size)) + 1)] and size >= 8,
             f"{source}: synthesis blocks {blocks} are not 4, 8, ..., resolution (>= 8)")

    channels: Dict[int, int] = {}
    notes: Dict[str, Any] = {}
    conv_clamps = set()
    for res in blocks:
        block = synthesis.child(f"b{res}")
        name = f"synthesis.b{res}"
        _require(block.child("skip") is None,
                 f"{source}: {name} has a residual 'skip' layer (architecture='resnet'); only 'skip' is supported")
        _require(block.child("torgb") is not None,
                 f"{source}: {name} has no torgb (architecture='orig'); only 'skip' generators are supported")
        layers = ["conv1"] if res == 4 else ["conv0", "conv1"]
        for lname in layers:
            layer = block.child(lname)
            _require(layer is not None, f"{source}: {name} has no {lname}")
            w = state.get(f"{name}.{lname}.weight")
            _require(w is not None and w.ndim == 4 and w.shape[-1] == 3 and w.shape[-2] == 3,
                     f"{source}: {name}.{lname}.weight must be (out, in, 3, 3), found "
                     f"{None if w is None else tuple(w.shape)}")
            act = layer.attr("activation", "lrelu")
            _require(act == "lrelu", f"{source}: {name}.{lname} uses activation {act!r}; only 'lrelu' maps")
            up = int(layer.attr("up", 2 if lname == "conv0" else 1))
            _require(up == (2 if lname == "conv0" else 1), f"{source}: {name}.{lname} has up={up}")
            conv_clamps.add(layer.attr("conv_clamp"))
        channels[res] = int(state[f"{name}.conv1.weight"].shape[0])
        if res == 4:
            _require(f"{name}.const" in state, f"{source}: {name} has no const input")
        rgb = state.get(f"{name}.torgb.weight")
        _require(rgb is not None and rgb.shape[0] == 3 and rgb.shape[-1] == 1,
                 f"{source}: {name}.torgb.weight must be (3, in, 1, 1) (RGB output), found "
                 f"{None if rgb is None else tuple(rgb.shape)}")
        conv_clamps.add(block.child("torgb").attr("conv_clamp"))

    style_dim = int(state["synthesis.b4.conv1.affine.weight"].shape[1])
    fcs = sorted(int(m.group(1)) for n in mapping.children() if (m := re.fullmatch(r"fc(\d+)", n)))
    _require(bool(fcs) and fcs == list(range(len(fcs))), f"{source}: mapping network has layers {fcs}")
    for i in fcs:
        w = state[f"mapping.fc{i}.weight"]
        _require(tuple(w.shape) == (style_dim, style_dim),
                 f"{source}: mapping.fc{i}.weight is {tuple(w.shape)}; rosinality needs z_dim = layer width = "
                 f"w_dim = {style_dim}")
        act = mapping.child(f"fc{i}").attr("activation", "lrelu")
        _require(act == "lrelu", f"{source}: mapping.fc{i} uses activation {act!r}; only 'lrelu' maps")

    lr_mlp = mapping.child("fc0").attr("bias_gain")
    lr_mlp = float(lr_mlp if lr_mlp is not None else mkw.get("lr_multiplier", 0.01))

    base = skw.get("channel_base")
    cm, channel_max = _choose_channels(channels, size, base / 16384 if base else None)
    blur = _taps_from_filter(state["synthesis.b4.resample_filter"])

    clamp = sorted({c for c in conv_clamps if c is not None})
    notes.update(conv_clamp=(clamp[0] if len(clamp) == 1 else clamp) if clamp else None,
                 num_fp16_res=skw.get("num_fp16_res", 0),
                 use_noise="synthesis.b4.conv1.noise_const" in state,
                 has_w_avg="mapping.w_avg" in state,
                 persistence_version=root.version)
    config = dict(size=size, style_dim=style_dim, n_mlp=len(fcs), channel_multiplier=cm, blur_kernel=blur,
                  lr_mlp=lr_mlp, channel_max=channel_max)
    return NVlabsGenerator(config=config, state=state, root=root, notes=notes)


# ------------------------------------------------------------------------------------------------
# Name/shape mapping


def _scaled(t: torch.Tensor, factor: float) -> torch.Tensor:
    t = t.detach().float()
    # keep exact copies when the gains agree (they do in every NVlabs release)
    return t.clone() if abs(factor - 1.0) < 1e-6 else t * factor


def to_rosinality(gen: NVlabsGenerator) -> Dict[str, torch.Tensor]:
    """Map an NVlabs generator state to rosinality ``Generator`` names and shapes.

    Args:
        gen: from ``describe_generator``.
    Returns:
        g_ema state dict without the FIR kernel buffers (``convs.{k}.conv.blur.kernel``,
        ``to_rgbs.{k}.upsample.kernel``), e.g. ``convs.0.conv.weight`` (1, out, in, 3, 3).
    """
    s, root = gen.state, gen.root
    synthesis, mapping = root.child("synthesis"), root.child("mapping")
    lr = gen.config["lr_mlp"]
    out: Dict[str, torch.Tensor] = {}

    def fc(nv_obj: PersistentObject, nv: str, ros: str, lr_mul: float) -> None:
        w, b = s[f"{nv}.weight"], s[f"{nv}.bias"]
        gain = nv_obj.attr("weight_gain")
        bgain = nv_obj.attr("bias_gain")
        out[f"{ros}.weight"] = _scaled(w, 1.0 if gain is None else float(gain) * math.sqrt(w.shape[1]) / lr_mul)
        out[f"{ros}.bias"] = _scaled(b, 1.0 if bgain is None else float(bgain) / lr_mul)

    def styled(block: PersistentObject, nv: str, lname: str, ros: str, noise_idx: int) -> None:
        layer = block.child(lname)
        out[f"{ros}.conv.weight"] = _scaled(s[f"{nv}.weight"], 1.0).unsqueeze(0)
        fc(layer.child("affine"), f"{nv}.affine", f"{ros}.conv.modulation", 1.0)
        res = int(2 ** ((noise_idx + 5) // 2))
        if f"{nv}.noise_const" in s:
            out[f"{ros}.noise.weight"] = _scaled(s[f"{nv}.noise_strength"], 1.0).reshape(1)
            out[f"noises.noise_{noise_idx}"] = _scaled(s[f"{nv}.noise_const"], 1.0).reshape(1, 1, res, res)
        else:  # use_noise=False: a zero noise strength reproduces it
            out[f"{ros}.noise.weight"] = torch.zeros(1)
            out[f"noises.noise_{noise_idx}"] = torch.zeros(1, 1, res, res)
        out[f"{ros}.activate.bias"] = _scaled(s[f"{nv}.bias"], 1.0)

    def to_rgb(block: PersistentObject, nv: str, ros: str) -> None:
        torgb = block.child("torgb")
        w = s[f"{nv}.weight"]
        fan_in = w.shape[1] * w.shape[2] * w.shape[3]
        gain = torgb.attr("weight_gain")
        out[f"{ros}.conv.weight"] = _scaled(w, 1.0 if gain is None else float(gain) * math.sqrt(fan_in)).unsqueeze(0)
        fc(torgb.child("affine"), f"{nv}.affine", f"{ros}.conv.modulation", 1.0)
        out[f"{ros}.bias"] = _scaled(s[f"{nv}.bias"], 1.0).reshape(1, 3, 1, 1)

    for i in range(gen.config["n_mlp"]):
        fc(mapping.child(f"fc{i}"), f"mapping.fc{i}", f"style.{i + 1}", lr)
    b4 = synthesis.child("b4")
    out["input.input"] = _scaled(s["synthesis.b4.const"], 1.0).unsqueeze(0)
    styled(b4, "synthesis.b4.conv1", "conv1", "conv1", 0)
    to_rgb(b4, "synthesis.b4.torgb", "to_rgb1")
    for k, res in enumerate(gen.resolutions[1:]):
        block = synthesis.child(f"b{res}")
        styled(block, f"synthesis.b{res}.conv0", "conv0", f"convs.{2 * k}", 2 * k + 1)
        styled(block, f"synthesis.b{res}.conv1", "conv1", f"convs.{2 * k + 1}", 2 * k + 2)
        to_rgb(block, f"synthesis.b{res}.torgb", f"to_rgbs.{k}")
    return out


def build_generator(gen: NVlabsGenerator, source: str = "<pickle>") -> Generator:
    """Create a rosinality ``Generator`` and load the converted weights strictly.

    The FIR kernels come from the Generator itself and are checked against 4 x the pickled
    ``resample_filter`` buffers.
    """
    g = Generator(**gen.config)
    converted = to_rosinality(gen)
    full = g.state_dict()
    for key, value in full.items():
        if key.endswith("blur.kernel") or key.endswith("upsample.kernel"):
            k = int(key.split(".")[1])
            res = 2 ** (k // 2 + 3) if key.startswith("convs.") else 2 ** (k + 3)
            f = gen.state.get(f"synthesis.b{res}.resample_filter", gen.state["synthesis.b4.resample_filter"])
            f = f if f.ndim == 2 else torch.outer(f, f)
            _require(tuple(f.shape) == tuple(value.shape) and torch.allclose(4 * f.float(), value, atol=1e-6),
                     f"{source}: synthesis.b{res}.resample_filter does not match blur_kernel "
                     f"{gen.config['blur_kernel']} (x4 up-sampling gain)")
            converted[key] = value.clone()
    report = describe_mismatch(g, converted)
    if report:  # a bug here rather than bad input, but say precisely what is off
        raise NVlabsConversionError(f"{source}: converted weights do not fit Generator({gen.config}):\n{report}")
    load_strict(g, converted, source)
    return g.eval()


# ------------------------------------------------------------------------------------------------
# Top level


def select_network(data: Any, which: str, source: str) -> PersistentObject:
    """Pick ``data[which]`` from an unpickled snapshot (or ``data`` itself if it is one network)."""
    if isinstance(data, PersistentObject):
        return data
    _require(isinstance(data, Mapping), f"{source}: top-level object is a {type(data).__name__}, expected a "
                                        f"dict with 'G', 'D', 'G_ema'")
    if which not in data or data[which] is None:
        raise NVlabsConversionError(f"{source}: no network {which!r}; the pickle holds "
                                    f"{sorted(k for k, v in data.items() if isinstance(v, PersistentObject))}")
    return data[which]


def convert_nvlabs_pickle(in_path, out_path, which: str = "G_ema") -> Tuple[Path, Generator, torch.Tensor,
                                                                            Dict[str, Any]]:
    """Convert one generator of an NVlabs pickle into a rosinality-layout ``.pt`` file.

    Args:
        in_path: NVlabs ``.pkl``.
        out_path: output file (written with ``networks.checkpoints.export_generator``).
        which: "G_ema" (default) or "G".
    Returns:
        (written path, the loaded Generator, latent_avg (style_dim,), meta written to the file).
    Raises:
        NVlabsConversionError: see ``load_nvlabs_pickle`` and ``describe_generator``.
    """
    source = str(in_path)
    data = load_nvlabs_pickle(in_path)
    name = f"{source} [{which}]"
    try:
        gen = describe_generator(select_network(data, which, source), name)
        g = build_generator(gen, name)
    except KeyError as err:
        raise NVlabsConversionError(f"{name}: the StyleGAN2 generator lacks tensor {err}") from None
    w_avg = gen.state.get("mapping.w_avg")
    if w_avg is not None:
        _require(w_avg.numel() == g.style_dim, f"{name}: mapping.w_avg has {w_avg.numel()} values, w_dim is "
                                               f"{g.style_dim}")
        w_avg = w_avg.detach().float().clone().reshape(-1)
    else:  # w_avg_beta=None: no tracked average; estimate it like rosinality's mean_latent
        w_avg = g.mean_latent(10000, seed=0).reshape(-1)
        gen.notes["latent_avg"] = "estimated from 10000 z (pickle has no mapping.w_avg)"
    meta = {"converted_from": str(Path(in_path).resolve()),
            "nvlabs": {"which": which, **{k: _plain(v) for k, v in gen.notes.items()}}}
    path = export_generator(out_path, g, w_avg, meta=meta)
    return path, g, w_avg, {"generator": dict(g.config), **meta}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """CLI: ``python -m networks.convert_nvlabs IN.pkl OUT.pt [--which G_ema]``; returns the exit code."""
    parser = argparse.ArgumentParser(
        prog="python -m networks.convert_nvlabs",
        description="Convert an NVlabs StyleGAN2(-ADA) network pickle to a rosinality-layout generator file "
                    "(without running any code stored in the pickle).")
    parser.add_argument("input", help="NVlabs .pkl (network-snapshot-*.pkl, ffhq.pkl, ...)")
    parser.add_argument("output", help="output .pt (g_ema, latent_avg, meta)")
    parser.add_argument("--which", default="G_ema", choices=["G_ema", "G"], help="generator to export")
    args = parser.parse_args(argv)
    try:
        path, g, _, meta = convert_nvlabs_pickle(args.input, args.output, which=args.which)
    except NVlabsConversionError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {path}: Generator({', '.join(f'{k}={v}' for k, v in g.config.items())})")
    notes = meta["nvlabs"]
    if notes.get("conv_clamp") is not None:
        print(f"note: the NVlabs network clamps layer outputs to +-{notes['conv_clamp']} (conv_clamp); the rosinality "
              f"maths does not clamp, outputs differ only where activations exceed it")
    if notes.get("num_fp16_res"):
        print(f"note: NVlabs ran the {notes['num_fp16_res']} highest resolutions in FP16; the converted generator "
              f"runs in FP32 (tiny numerical differences)")
    if "latent_avg" in notes:
        print(f"note: {notes['latent_avg']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
