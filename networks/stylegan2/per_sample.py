"""Per-sample generator weights: a batch of images, each with its own tuned generator, in one pass.

Every layer accepts a parameter with one extra leading batch dimension (B, *shape) in place of its
shared parameter. ``torch.func.functional_call`` swaps such tensors in for one call, so the same
module serves both cases without copies of the network (DHR / PTI weight modulation).
"""
from __future__ import annotations

from typing import Dict, Iterable, Optional

import torch
from torch import nn
from torch.func import functional_call


def expand_params(module: nn.Module, batch: int, names: Optional[Iterable[str]] = None,
                  requires_grad: bool = True) -> Dict[str, torch.Tensor]:
    """Copy parameters into per-sample tensors (B, *shape), detached from ``module``.

    Args:
        module: e.g. a ``Generator``.
        batch: B.
        names: parameter names to expand (default: all of the synthesis network, i.e. not ``style.*``).
        requires_grad: make the copies leaves that require grad (ready for an optimiser).
    Returns:
        {name: (B, *param.shape) tensor}.
    """
    params = dict(module.named_parameters())
    if names is None:
        names = [n for n in params if not n.startswith("style.")]
    out = {}
    for n in names:
        if n not in params:
            raise KeyError(f"{type(module).__name__} has no parameter {n!r}")
        p = params[n].detach()
        out[n] = p.unsqueeze(0).repeat(batch, *([1] * p.ndim)).requires_grad_(requires_grad)
    return out


def call_with_params(module: nn.Module, params: Dict[str, torch.Tensor], method: str = "forward",
                     *args, **kwargs):
    """Call ``module.<method>(*args, **kwargs)`` with ``params`` (shared or per-sample) swapped in."""
    if method == "forward":
        return functional_call(module, params, args, kwargs, strict=False)

    class _Bound(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, *a, **kw):
            return getattr(self.inner, method)(*a, **kw)

    prefixed = {f"inner.{k}": v for k, v in params.items()}
    return functional_call(_Bound(module), prefixed, args, kwargs, strict=False)


def take_sample(params: Dict[str, torch.Tensor], index: int) -> Dict[str, torch.Tensor]:
    """Slice sample ``index`` out of per-sample params: {name: (*shape)} (for export / re-editing)."""
    return {k: v[index] for k, v in params.items()}
