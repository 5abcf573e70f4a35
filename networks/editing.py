"""Latent editing: InterFaceGAN directions and GANSpace components (methods.md §1.4).

* InterFaceGAN: a unit normal ``d`` (1, D) of a linear boundary in W separating high from low
  attribute scores; an edit is ``w+ + strength * d`` on all (or selected) rows of the W+ code. Files
  are the official ``.pt`` tensors ((1, D), e.g. e4e's ``smile.pt``) or ``.npy`` boundaries ((1, D)).
* GANSpace: PCA of mapping outputs, stored like e4e/HFGI's ``ffhq_pca.pt``: ``{"mean" (1, D),
  "comp" (K, 1, D), "std" (K,)}`` (components unit norm, ``std`` = sqrt of the explained variance,
  sorted descending). An edit ``(index, start, end, strength)`` takes row 0 of the centred code, reads
  its coordinate along component ``index`` in units of ``std``, and adds to rows ``start:end`` the
  delta that moves that coordinate to ``strength``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch

from networks.checkpoints import CheckpointError, safe_load, save_atomic

Tensor = torch.Tensor
Layers = Union[None, slice, range, Sequence[int], tuple]
FIT_METHODS = ("linear_svm", "logistic")


# ----------------------------------------------------------------------------------------- InterFaceGAN
def load_direction(path, dim: Optional[int] = None) -> Tensor:
    """Read an InterFaceGAN direction: ``.pt``/``.pth`` tensor (1, D) or (D,), or ``.npy`` array (1, D) / (D,).

    Args:
        path: the file.
        dim: expected D (e.g. the generator's ``style_dim``); None = any.
    Returns:
        float32 tensor (1, D) (not renormalised: strengths keep the file's scale).
    Raises:
        CheckpointError naming the file when it is missing, of another format, or of another shape.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in (".pt", ".pth"):
        data = safe_load(path)
    elif suffix == ".npy":
        if not path.is_file():
            raise CheckpointError(f"direction file not found: {path}")
        try:
            data = np.load(path, allow_pickle=False)
        except (ValueError, OSError) as err:
            raise CheckpointError(f"{path} is not a readable .npy array: {err}") from None
    else:
        raise CheckpointError(f"{path}: unsupported direction format {suffix or '(no extension)'!r}; "
                              f"expected a .pt/.pth tensor or a .npy array of shape (1, D)")
    if isinstance(data, np.ndarray):
        data = torch.from_numpy(np.ascontiguousarray(data))
    if not torch.is_tensor(data):
        raise CheckpointError(f"{path} holds a {type(data).__name__}, expected a tensor of shape (1, D)")
    if data.ndim == 1:
        data = data.unsqueeze(0)
    if data.ndim != 2 or data.shape[0] != 1 or not data.is_floating_point():
        raise CheckpointError(f"{path}: expected a float direction of shape (1, D) or (D,), "
                              f"got {data.dtype} {tuple(data.shape)}")
    if dim is not None and data.shape[1] != dim:
        raise CheckpointError(f"{path}: direction has D={data.shape[1]} but the generator's style_dim is {dim}")
    return data.float()


def save_direction(path, direction: Tensor) -> Path:
    """Write ``direction`` (1, D) or (D,) as a float32 (1, D) ``.pt`` tensor (atomically); returns the path."""
    return save_atomic(direction.detach().float().cpu().reshape(1, -1).clone(), path)


def _row_mask(n_rows: int, layers: Layers, device) -> Tensor:
    """(n_rows,) float mask of the rows an edit touches."""
    mask = torch.zeros(n_rows, device=device)
    if layers is None:
        mask[:] = 1
    elif isinstance(layers, slice):
        mask[layers] = 1
    elif isinstance(layers, tuple) and len(layers) == 2 and all(isinstance(v, int) for v in layers):
        mask[layers[0]:layers[1]] = 1  # (start, end), end exclusive
    else:
        idx = [int(i) for i in layers]
        bad = [i for i in idx if not -n_rows <= i < n_rows]
        if bad:
            raise ValueError(f"layers {bad} out of range for codes with {n_rows} rows")
        mask[idx] = 1
    return mask


def _strength(strength: Union[float, Tensor], batch: int, like: Tensor) -> Tensor:
    """Strength as (B,) tensor on ``like``'s device/dtype."""
    s = torch.as_tensor(strength, dtype=like.dtype, device=like.device)
    if s.ndim == 0:
        return s.expand(batch)
    if s.shape != (batch,):
        raise ValueError(f"strength must be a float or a tensor of shape ({batch},), got {tuple(s.shape)}")
    return s


def apply_interfacegan(codes: Tensor, direction: Tensor, strength: Union[float, Tensor],
                       layers: Layers = None) -> Tensor:
    """InterFaceGAN edit ``codes + strength * direction`` on the selected rows.

    Args:
        codes: (B, L, D) W+ codes.
        direction: (1, D) (same for every row) or (L, D) (one per row).
        strength: float or (B,) tensor (one strength per image).
        layers: rows to edit: None (all), a slice, range, ``(start, end)`` tuple (end exclusive) or list of ints.
    Returns:
        (B, L, D) edited codes (a new tensor; differentiable).
    """
    if codes.ndim != 3:
        raise ValueError(f"apply_interfacegan: codes must be (B, L, D), got {tuple(codes.shape)}")
    b, n_rows, d = codes.shape
    direction = direction.to(device=codes.device, dtype=codes.dtype)
    if direction.ndim == 1:
        direction = direction.unsqueeze(0)
    if direction.ndim != 2 or direction.shape[1] != d or direction.shape[0] not in (1, n_rows):
        raise ValueError(f"apply_interfacegan: direction must be (1, {d}) or ({n_rows}, {d}), "
                         f"got {tuple(direction.shape)}")
    s = _strength(strength, b, codes)
    mask = _row_mask(n_rows, layers, codes.device).to(codes.dtype)
    return codes + s.view(b, 1, 1) * mask.view(1, n_rows, 1) * direction.unsqueeze(0)


def fit_interfacegan_direction(latents: Union[Tensor, np.ndarray], scores: Union[Tensor, np.ndarray],
                               method: str = "linear_svm", quantile: float = 0.3, C: float = 1.0,
                               seed: int = 0) -> Tensor:
    """Fit an InterFaceGAN boundary: the samples with the top / bottom ``quantile`` of scores are the
    positive / negative class, a linear classifier (scikit-learn) separates them, and its unit normal
    is the direction.

    Args:
        latents: (N, D) codes (W).
        scores: (N,) attribute scores; the returned direction points towards higher scores.
        method: "linear_svm" (``sklearn.svm.SVC(kernel="linear")`` as InterFaceGAN) or "logistic".
        quantile: fraction of samples in each class, in (0, 0.5].
        C: inverse regularisation strength of the classifier.
        seed: random_state of the classifier.
    Returns:
        float32 (1, D) unit-norm direction.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.svm import SVC

    x = (latents.detach().cpu().double().numpy() if torch.is_tensor(latents) else np.asarray(latents, np.float64))
    y = (scores.detach().cpu().double().numpy() if torch.is_tensor(scores) else np.asarray(scores, np.float64))
    if x.ndim != 2 or y.ndim != 1 or x.shape[0] != y.shape[0]:
        raise ValueError(f"fit_interfacegan_direction: need latents (N, D) and scores (N,), "
                         f"got {x.shape} and {y.shape}")
    if method not in FIT_METHODS:
        raise ValueError(f"fit_interfacegan_direction: method must be one of {FIT_METHODS}, got {method!r}")
    if not 0 < quantile <= 0.5:
        raise ValueError(f"fit_interfacegan_direction: quantile must be in (0, 0.5], got {quantile}")
    n = int(x.shape[0] * quantile)
    if n < 2:
        raise ValueError(f"fit_interfacegan_direction: {x.shape[0]} samples with quantile {quantile} leave "
                         f"{n} per class; need at least 2")
    order = np.argsort(y, kind="stable")
    neg, pos = order[:n], order[-n:]
    train_x = np.concatenate([x[pos], x[neg]])
    train_y = np.concatenate([np.ones(n), np.zeros(n)])
    if method == "linear_svm":
        clf = SVC(kernel="linear", C=C, random_state=seed)
    else:
        clf = LogisticRegression(C=C, max_iter=5000, random_state=seed)
    clf.fit(train_x, train_y)
    normal = np.asarray(clf.coef_, np.float64).reshape(1, -1)
    norm = np.linalg.norm(normal)
    if not np.isfinite(norm) or norm == 0:
        raise ValueError("fit_interfacegan_direction: the classifier found no separating direction (zero normal)")
    normal = normal / norm
    # sklearn's coef_ already points to the larger label; the check guards against that convention changing.
    if (x[pos] @ normal.T).mean() < (x[neg] @ normal.T).mean():
        normal = -normal
    return torch.from_numpy(normal).float()


# ----------------------------------------------------------------------------------------------- GANSpace
@dataclass
class GanSpace:
    """GANSpace PCA of W: ``mean`` (1, D), ``comp`` (K, D) unit-norm components sorted by explained
    variance, ``std`` (K,) their standard deviations (sqrt of the explained variance). ``var_ratio``
    (K,) optional: explained-variance ratios (fraction of the total W variance) when known."""

    mean: Tensor
    comp: Tensor
    std: Tensor
    var_ratio: Optional[Tensor] = None

    def __post_init__(self):
        d = self.comp.shape[-1]
        self.mean = self.mean.reshape(1, d).float()
        self.comp = self.comp.reshape(-1, d).float()
        self.std = self.std.reshape(-1).float()
        if self.var_ratio is not None:
            self.var_ratio = self.var_ratio.reshape(-1).float()
        if self.std.shape[0] != self.comp.shape[0]:
            raise ValueError(f"GanSpace: {self.comp.shape[0]} components but {self.std.shape[0]} std values")

    @property
    def n_components(self) -> int:
        """K."""
        return self.comp.shape[0]

    def to(self, device) -> "GanSpace":
        """A copy on ``device``."""
        ratio = None if self.var_ratio is None else self.var_ratio.to(device)
        return GanSpace(self.mean.to(device), self.comp.to(device), self.std.to(device), ratio)

    def state_dict(self) -> dict:
        """``ffhq_pca.pt`` layout: {"mean" (1, D), "comp" (K, 1, D), "std" (K,)} (CPU float32), plus
        "var_ratio" (K,) when known (readers of the official layout ignore it)."""
        out = {"mean": self.mean.cpu().clone(), "comp": self.comp.cpu().unsqueeze(1).clone(),
               "std": self.std.cpu().clone()}
        if self.var_ratio is not None:
            out["var_ratio"] = self.var_ratio.cpu().clone()
        return out

    def save(self, path) -> Path:
        """Write ``state_dict()`` to ``path`` atomically; returns the path."""
        return save_atomic(self.state_dict(), path)


def load_ganspace(path) -> GanSpace:
    """Read a GANSpace file: ``ffhq_pca.pt``-style dict {"mean", "comp", "std"} (comp (K, D) or (K, 1, D),
    mean (1, D) / (D,)), or GANSpace's own ``.npz`` with ``lat_mean``, ``lat_comp``, ``lat_stdev``.

    Raises CheckpointError naming the file for missing keys or inconsistent shapes.
    """
    path = Path(path)
    if path.suffix.lower() == ".npz":
        if not path.is_file():
            raise CheckpointError(f"GANSpace file not found: {path}")
        with np.load(path, allow_pickle=False) as z:
            data = {"mean": z["lat_mean"], "comp": z["lat_comp"], "std": z["lat_stdev"]} \
                if {"lat_mean", "lat_comp", "lat_stdev"} <= set(z.files) else {k: z[k] for k in z.files}
    else:
        data = safe_load(path)
    if not isinstance(data, dict) or not {"mean", "comp", "std"} <= set(data):
        keys = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise CheckpointError(f"{path}: a GANSpace file needs keys 'mean', 'comp', 'std'; found {keys}")
    mean, comp, std = (torch.as_tensor(data[k])
                       for k in ("mean", "comp", "std"))
    d = comp.shape[-1] if comp.ndim else 0
    if comp.ndim not in (2, 3) or comp.ndim == 3 and comp.shape[1] != 1 or mean.numel() != d \
            or std.numel() != comp.shape[0]:
        raise CheckpointError(f"{path}: inconsistent GANSpace shapes mean {tuple(mean.shape)}, "
                              f"comp {tuple(comp.shape)}, "
                              f"std {tuple(std.shape)}; expected (1, D), (K, D) or (K, 1, D), (K,)")
    ratio = data.get("var_ratio")
    ratio = None if ratio is None else torch.as_tensor(ratio)
    if ratio is not None and ratio.numel() != comp.shape[0]:
        raise CheckpointError(f"{path}: var_ratio has {ratio.numel()} values for {comp.shape[0]} components")
    return GanSpace(mean, comp, std, ratio)


def apply_ganspace(codes: Tensor, pca: GanSpace, index: int, start: int, end: int,
                   strength: Union[float, Tensor]) -> Tensor:
    """GANSpace edit (e4e / HFGI ``get_delta``), batched.

    coord = <codes[:, 0] - mean, comp[index]> / std[index];
    delta = (strength - coord) * comp[index] * std[index], added to rows ``start:end``.

    Args:
        codes: (B, L, D) W+ codes.
        pca: GanSpace.
        index: component index (< K).
        start, end: rows receiving the delta (end exclusive).
        strength: float or (B,) target coordinate in std units.
    Returns:
        (B, L, D) edited codes.
    """
    if codes.ndim != 3 or codes.shape[2] != pca.comp.shape[1]:
        raise ValueError(f"apply_ganspace: codes must be (B, L, {pca.comp.shape[1]}), got {tuple(codes.shape)}")
    if not 0 <= index < pca.n_components:
        raise ValueError(f"apply_ganspace: component index {index} out of range (K={pca.n_components})")
    b, n_rows, _ = codes.shape
    if not 0 <= start <= end <= n_rows:
        raise ValueError(f"apply_ganspace: need 0 <= start <= end <= {n_rows}, got start={start}, end={end}")
    comp = pca.comp[index].to(codes)
    sd = pca.std[index].to(codes)
    coord = ((codes[:, 0] - pca.mean.to(codes)) * comp).sum(-1) / sd
    delta = (_strength(strength, b, codes) - coord).unsqueeze(-1) * comp * sd  # (B, D)
    mask = torch.zeros(n_rows, dtype=codes.dtype, device=codes.device)
    mask[start:end] = 1
    return codes + mask.view(1, n_rows, 1) * delta.unsqueeze(1)


@torch.no_grad()
def compute_ganspace_pca(G, n_samples: int = 10000, n_components: Optional[int] = None, seed: int = 0,
                         batch: int = 4096) -> GanSpace:
    """PCA of ``n_samples`` mapping outputs w = G.get_latent(z), z ~ N(0, I) drawn with ``seed``.

    Args:
        G: generator with ``style_dim`` and ``get_latent``.
        n_samples: number of w samples (> n_components).
        n_components: K (default min(80, style_dim), GANSpace's count for FFHQ).
        seed, batch: sampling seed and mapping batch size.
    Returns:
        GanSpace (with ``var_ratio``) with orthonormal components sorted by explained variance; each component's sign is
        fixed so its largest-magnitude entry is positive (deterministic output).
    """
    d = G.style_dim
    k = min(80, d) if n_components is None else int(n_components)
    if not 1 <= k <= min(d, n_samples - 1):
        raise ValueError(f"compute_ganspace_pca: n_components must be in [1, {min(d, n_samples - 1)}], got {k}")
    device = next(G.parameters()).device
    z = torch.randn(n_samples, d, generator=torch.Generator().manual_seed(seed))
    w = torch.cat([G.get_latent(chunk.to(device)).double().cpu() for chunk in z.split(batch)])
    mean = w.mean(0, keepdim=True)
    _, s, vh = torch.linalg.svd(w - mean, full_matrices=False)
    comp = vh[:k]
    variance = s[:k] ** 2 / (n_samples - 1)
    flip = torch.sign(comp.gather(1, comp.abs().argmax(1, keepdim=True)))
    comp = comp * flip
    ratio = s[:k] ** 2 / (s ** 2).sum()
    return GanSpace(mean.float(), comp.float(), variance.sqrt().float(), ratio.float())


__all__ = ["load_direction", "save_direction", "apply_interfacegan", "fit_interfacegan_direction", "GanSpace",
           "load_ganspace", "apply_ganspace", "compute_ganspace_pca", "FIT_METHODS"]
