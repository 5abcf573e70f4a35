"""FID without downloads: torchmetrics' ``FrechetInceptionDistance`` with the project's own features.

The feature network is ``networks.synthfaces_nets.SynthFacesFeatures`` (the SynthFaces attribute
classifier's penultimate activations, trained in the project), torch-fidelity's Inception-v3 from an
explicit weights file (``build_fid_extractor("inception", path)``), or any ``nn.Module`` with
``num_features`` that takes float images in [0, 1]. Numbers are only comparable with the same
feature network and similar set sizes (FID is biased upwards for small sets); only the Inception
network gives numbers comparable to published FIDs. ``python -m lightning_modules.fid`` prints the
scale references of the shipped classifier (held-out real vs blurred real, vs other real images, vs
the OOD twins).
"""
from __future__ import annotations

import argparse
import importlib.util
import math
from pathlib import Path
from typing import Iterable, Iterator, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance

from networks.synthfaces_nets import SynthFacesFeatures

Tensor = torch.Tensor
Images = Union[Tensor, Iterable]
DEFAULT_WEIGHTS = Path(__file__).resolve().parents[1] / "experiments" / "weights" / "synthfaces" / "attribute_classifier.pt"


def _batches(images: Images, batch_size: int) -> Iterator[Tensor]:
    """Yield image tensors from a tensor (N, 3, H, W) or an iterable of tensors / (tensor, ...) / dicts with 'image'."""
    if torch.is_tensor(images):
        yield from images.split(batch_size)
        return
    for item in images:
        if isinstance(item, dict):
            if "image" not in item:
                raise ValueError(f"fid_score: dict batches need an 'image' key, got keys {sorted(item)}")
            item = item["image"]
        elif isinstance(item, (tuple, list)):
            item = item[0]
        if not torch.is_tensor(item):
            raise TypeError(f"fid_score: batches must be image tensors, got {type(item).__name__}")
        yield item


def to_unit_range(x: Tensor, value_range: Tuple[float, float]) -> Tensor:
    """float images in ``value_range`` -> float in [0, 1] (clamped); uint8 images -> float / 255."""
    if x.dtype == torch.uint8:
        return x.float() / 255.0
    lo, hi = value_range
    return ((x.float() - lo) / (hi - lo)).clamp(0.0, 1.0)


FID_KINDS = ("synthfaces", "inception")
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"


def _inception_weights(weights_path: Union[str, Path, None], key: str) -> Path:
    """Check the Inception weights file and torch-fidelity; returns the resolved path."""
    if weights_path is None or not Path(weights_path).expanduser().is_file():
        raise FileNotFoundError(f"{key}={weights_path}: Inception FID needs the weights file {INCEPTION_FILE} "
                                f"(nothing is downloaded); or use the SynthFaces feature network "
                                f"(features=attribute_classifier.pt)")
    if importlib.util.find_spec("torch_fidelity") is None:
        raise ImportError(f"{key}: Inception FID needs torch-fidelity: PIP_CONSTRAINT=constraints.txt pip install "
                          f"torch-fidelity")
    return Path(weights_path).expanduser()


class InceptionFeatures(nn.Module):
    """torch-fidelity's FID Inception-v3 (2048-d pool features) behind the project's feature-network API.

    ``forward(x (B, 3, H, W) float in [0, 1] or uint8) -> (B, 2048)``. Float images are quantised as
    torchmetrics does (``(x * 255).byte()``) and the network resizes to 299 itself, so the features equal
    those of ``FrechetInceptionDistance(feature=2048, normalize=True)``. Frozen, always in eval mode.
    """

    num_features = 2048

    def __init__(self, weights_path: Union[str, Path], key: str = "fid.weights"):
        super().__init__()
        from torchmetrics.image.fid import NoTrainInceptionV3

        path = _inception_weights(weights_path, key)
        self.net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                                      feature_extractor_weights_path=str(path))
        self.net.requires_grad_(False)

    def train(self, mode: bool = True) -> "InceptionFeatures":
        """Ignores ``mode``: the feature network stays in eval mode."""
        return super().train(False)

    def forward(self, imgs: Tensor) -> Tensor:
        x = imgs if imgs.dtype == torch.uint8 else (imgs.float().clamp(0, 1) * 255).byte()
        with torch.no_grad():
            return self.net(x).reshape(x.shape[0], -1).float()


def build_fid_extractor(kind: str = "synthfaces", weights: Union[str, Path, None] = None, *,
                        key: str = "fid.weights") -> nn.Module:
    """Feature network for ``fid_score`` / ``FrechetInceptionDistance(feature=..., normalize=True)``.

    Args:
        kind: "synthfaces" (the attribute classifier's penultimate features; ``weights`` = an
            ``attribute_classifier.pt``, None = the shipped one) or "inception" (torch-fidelity's
            Inception-v3; ``weights`` = ``weights-inception-2015-12-05-6726825d.pth``, required).
        key: config key named in errors.
    Returns an ``nn.Module`` with ``num_features`` mapping float images (B, 3, H, W) in [0, 1] (or uint8)
    to (B, num_features). Raises ValueError for an unknown kind, FileNotFoundError / ImportError (naming
    ``key``) for a missing Inception file or a missing torch-fidelity, CheckpointError for a bad classifier file.
    """
    if kind == "synthfaces":
        return SynthFacesFeatures.from_file(weights or DEFAULT_WEIGHTS)
    if kind == "inception":
        return InceptionFeatures(weights, key=key)
    raise ValueError(f"{key.rsplit('.', 1)[0]}.kind={kind!r}: unknown FID feature network, choose one of {FID_KINDS}")


def inception_fid_metric(weights_path: Union[str, Path, None], key: str = "fid.inception_weights"
                         ) -> FrechetInceptionDistance:
    """torchmetrics' Inception-v3 FID (2048 features) with the weights read from ``weights_path``.

    The weights are torch-fidelity's ``weights-inception-2015-12-05-6726825d.pth`` (the file the FID
    papers use); torchmetrics would download it, which cannot happen here, so the path is required.
    Needs the ``torch-fidelity`` package (``pip install torch-fidelity`` with the constraints file).
    Raises FileNotFoundError / ImportError naming ``key``.
    """
    path = _inception_weights(weights_path, key)
    return FrechetInceptionDistance(feature=2048, normalize=True, reset_real_features=True,
                                    feature_extractor_weights_path=str(path))


def fid_score(real: Images, fake: Images, features: Union[nn.Module, str, Path, None] = None, *,
              value_range: Tuple[float, float] = (-1.0, 1.0), batch_size: int = 256,
              device: Union[str, torch.device] = "cpu") -> float:
    """FID between two image sets with a custom feature network.

    Args:
        real, fake: tensors (N, 3, H, W) or iterables of batches (DataLoaders of tensors, of tuples
            whose first item is the images, or of dicts with ``image``). Float images are taken in
            ``value_range`` (the project's [-1, 1] by default), uint8 images in [0, 255].
        features: "inception:PATH" (``inception_fid_metric``: real Inception FID from a weights file),
            an ``nn.Module`` with ``num_features`` taking float (B, 3, H, W) in [0, 1]
            (``build_fid_extractor``'s result, e.g. ``SynthFacesFeatures``), or the path of an
            ``attribute_classifier.pt``; None = the shipped ``experiments/weights/synthfaces/attribute_classifier.pt``.
        batch_size: split size for tensor inputs; device: where features are computed.
    Returns the FID (float). Raises ValueError if a set has fewer than 2 images.
    """
    if isinstance(features, str) and features.startswith("inception:"):
        metric = inception_fid_metric(features.split(":", 1)[1]).to(device)
    else:
        if features is None or isinstance(features, (str, Path)):
            features = SynthFacesFeatures.from_file(features or DEFAULT_WEIGHTS)
        if not hasattr(features, "num_features"):
            raise TypeError("fid_score: the feature network needs a `num_features` attribute (see SynthFacesFeatures)")
        metric = FrechetInceptionDistance(feature=features, normalize=True, reset_real_features=True).to(device)
    counts = {True: 0, False: 0}
    for is_real, images in ((True, real), (False, fake)):
        for batch in _batches(images, batch_size):
            metric.update(to_unit_range(batch, value_range).to(device), real=is_real)
            counts[is_real] += len(batch)
    if min(counts.values()) < 2:
        raise ValueError(f"fid_score needs >= 2 images per set, got {counts[True]} real and {counts[False]} fake")
    return float(metric.compute())


def gaussian_blur(images: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur of float images (B, C, H, W) (kernel radius ceil(3 sigma), reflect padding)."""
    if sigma <= 0:
        return images.clone()
    radius = max(1, math.ceil(3 * sigma))
    if radius >= min(images.shape[-2:]):
        raise ValueError(f"gaussian_blur: sigma={sigma} is too large for {tuple(images.shape[-2:])} images")
    t = torch.arange(-radius, radius + 1, dtype=torch.float32, device=images.device)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = (k / k.sum()).to(images.dtype)
    c = images.shape[1]
    x = F.pad(images, (radius, radius, radius, radius), mode="reflect")
    x = F.conv2d(x, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(x, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def reference_fids(weights=None, data_root="data/synthfaces", blur_sigma: float = 1.0, seed: int = 0) -> dict:
    """Scale references of the SynthFaces FID: held-out (test) real images vs a Gaussian-blurred copy,
    vs the val split, vs 500 and vs all train images, and vs their OOD twins. Returns {name: FID}."""
    from datamodules.synthfaces_labelled import SynthFacesLabelledDataModule

    feats = SynthFacesFeatures.from_file(weights or DEFAULT_WEIGHTS)
    dm = SynthFacesLabelledDataModule.from_existing(data_root, resolution=feats.classifier.resolution, with_parts=False)
    test = dm.dataset("test").images.float() / 127.5 - 1.0
    train = dm.dataset("train").images.float() / 127.5 - 1.0
    val = dm.dataset("val").images.float() / 127.5 - 1.0
    ood = dm.dataset("test", "ood/images").images.float() / 127.5 - 1.0
    pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:len(test)]
    return {
        "test vs test (same set)": fid_score(test, test, feats),
        f"test vs blurred test (sigma {blur_sigma:g})": fid_score(test, gaussian_blur(test, blur_sigma), feats),
        "test vs val (500 vs 500)": fid_score(test, val, feats),
        f"test vs train ({len(test)} random)": fid_score(test, train[pick], feats),
        f"test vs train (all {len(train)})": fid_score(train, test, feats),
        "test vs OOD twins of test": fid_score(test, ood, feats),
    }


def main(argv=None) -> dict:
    """CLI: print the reference FIDs of a classifier file on a SynthFaces dataset."""
    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--weights", default=str(DEFAULT_WEIGHTS), help="attribute_classifier.pt")
    p.add_argument("--data-root", default="data/synthfaces")
    p.add_argument("--blur-sigma", type=float, default=1.0)
    args = p.parse_args(argv)
    out = reference_fids(args.weights, args.data_root, args.blur_sigma)
    print("| sets | FID |\n|---|---|")
    for name, value in out.items():
        print(f"| {name} | {value:.3f} |")
    return out


if __name__ == "__main__":
    main()
