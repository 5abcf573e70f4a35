"""LPIPS through the ``lpips`` package, with the ImageNet backbone read from an explicit file.

The package ships its v0.1 linear heads but downloads the AlexNet / VGG16 backbone from torchvision at
run time, which cannot happen here. ``LPIPSLoss`` builds the network without that download
(``pnet_rand=True``) and loads the backbone from ``backbone_weights``, a torchvision state dict
(``alexnet-owt-7be5be79.pth`` / ``vgg16-397923af.pth``, keys ``features.N.*``). Without a file it
refuses, unless the caller opts in to a random backbone: the numbers are then named "lpips-random"
(never LPIPS) and the random backbone is seeded, so runs stay comparable to each other.

``net="synthfaces"`` is the domain's own distance (``networks.domain_perceptual.FeatureLPIPS``, named
"lpips-synthfaces"): the same computation on the taps of the SynthFaces attribute classifier, read from
``backbone_weights`` (``attribute_classifier.pt``), with uniform instead of learned linear heads.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from networks.checkpoints import safe_load

Tensor = torch.Tensor
NETS = ("alex", "vgg", "synthfaces")
RANDOM_BACKBONE_SEED = 0
MIN_SIZE = 32  # smaller images are upsampled to this side first


def torchvision_key_map(pretrained_net: nn.Module) -> Dict[str, str]:
    """Map the lpips backbone's parameter names (``sliceK.N.weight``) to torchvision's (``features.N.weight``).

    lpips fills its slices with torchvision's ``features[N]`` modules under the name ``N``, so the layer
    index survives in the name.
    """
    mapping = {}
    for name, _ in pretrained_net.named_parameters():
        _, index, leaf = name.split(".", 2)
        mapping[name] = f"features.{index}.{leaf}"
    return mapping


def _upsample(t: Tensor) -> Tensor:
    # AlexNet's strided stem and pools leave nothing of images under 32 px: compare them upsampled.
    return F.interpolate(t, size=(MIN_SIZE, MIN_SIZE), mode="bilinear", align_corners=False)


class LPIPSLoss(nn.Module):
    """Per-image LPIPS distance, optionally averaged inside a mask (DHR's masked LPIPS).

    Args:
        net: "alex" or "vgg" (the lpips v0.1 linear heads for both ship with the package), or "synthfaces" (the
            domain distance on the SynthFaces attribute classifier, see the module docstring).
        backbone_weights: torchvision ImageNet state dict of that backbone (for "synthfaces": the
            ``attribute_classifier.pt`` file); required unless ``allow_random_backbone`` (alex / vgg only).
        allow_random_backbone: without ``backbone_weights``, use a seeded random backbone (warns;
            ``metric_name`` becomes "lpips-random").
        key: config key named in errors.

    ``forward(x, y, mask=None) -> (B,)`` for images (B, 3, H, W) in [-1, 1]; with ``mask`` (B, 1, H, W)
    in [0, 1] the spatial LPIPS map is averaged over the mask (0 where the mask is empty). Images under 32 px
    are bilinearly upsampled to 32 px first. The network is
    frozen and in eval mode; gradients flow to the inputs.
    """

    def __init__(self, net: str = "alex", backbone_weights: Optional[str] = None,
                 allow_random_backbone: bool = False, key: str = "model.lpips.backbone_weights"):
        super().__init__()
        if net not in NETS:
            raise ValueError(f"LPIPSLoss: net must be one of {NETS}, got {net!r} ({key.rsplit('.', 1)[0]}.net)")
        if net == "synthfaces":
            self._build_domain_net(backbone_weights, key)
            return
        import lpips

        if backbone_weights is None and not allow_random_backbone:
            raise ValueError(
                f"LPIPS needs the ImageNet {net} backbone and nothing can be downloaded: set {key}=PATH to a "
                f"torchvision state dict ({'alexnet-owt-7be5be79.pth' if net == 'alex' else 'vgg16-397923af.pth'}), "
                f"or opt in to a random backbone with {key.rsplit('.', 1)[0]}.allow_random_backbone=true "
                f"(numbers are then logged as 'lpips-random', not comparable to published LPIPS)")
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            # lpips still calls torchvision's deprecated `pretrained=` argument; the warning is noise here.
            warnings.filterwarnings("ignore", message=r"(The parameter 'pretrained'|Arguments other than a weight)",
                                    category=UserWarning)
            torch.manual_seed(RANDOM_BACKBONE_SEED)  # a random backbone is the same in every run
            self.net = lpips.LPIPS(pretrained=True, net=net, pnet_rand=True, verbose=False)
        if backbone_weights is not None:
            self._load_backbone(Path(backbone_weights).expanduser(), key)
            self.metric_name = "lpips"
        else:
            warnings.warn(f"LPIPSLoss: no {key}; using a random {net} backbone. Values are labelled "
                          f"'lpips-random' and are not LPIPS.", stacklevel=2)
            self.metric_name = "lpips-random"
        self.net.eval().requires_grad_(False)
        self.net_name = net

    def _build_domain_net(self, backbone_weights: Optional[str], key: str) -> None:
        from networks.domain_perceptual import FeatureLPIPS
        from networks.synthfaces_nets import load_attribute_classifier

        if backbone_weights is None:
            raise ValueError(f"LPIPS with net=synthfaces needs the SynthFaces attribute classifier: set {key}=PATH "
                             f"(experiments/weights/synthfaces/attribute_classifier.pt); it has no random variant")
        path = Path(backbone_weights).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"{key}={path}: no such file (the SynthFaces attribute_classifier.pt)")
        self.net = FeatureLPIPS(load_attribute_classifier(path))
        self.metric_name, self.net_name = "lpips-synthfaces", "synthfaces"

    def _load_backbone(self, path: Path, key: str) -> None:
        if not path.is_file():
            raise FileNotFoundError(f"{key}={path}: no such file (a torchvision ImageNet state dict of the backbone); "
                                    f"set {key}=null and {key.rsplit('.', 1)[0]}.allow_random_backbone=true to run "
                                    f"with a random backbone ('lpips-random')")
        state = safe_load(path)
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
        mapping = torchvision_key_map(self.net.net)
        missing = [tv for tv in mapping.values() if tv not in state]
        if missing:
            raise ValueError(f"{key}={path} is not a torchvision {self.net.pnet_type} state dict: missing "
                             f"{missing[:4]}{' ...' if len(missing) > 4 else ''}")
        own = dict(self.net.net.named_parameters())
        for name, tv_key in mapping.items():
            if tuple(state[tv_key].shape) != tuple(own[name].shape):
                raise ValueError(f"{key}={path}: {tv_key} has shape {tuple(state[tv_key].shape)}, "
                                 f"expected {tuple(own[name].shape)}")
        with torch.no_grad():
            for name, tv_key in mapping.items():
                own[name].copy_(state[tv_key])

    def train(self, mode: bool = True) -> "LPIPSLoss":
        """Stays in eval mode (no dropout / batch statistics in a metric)."""
        super().train(False)
        return self

    def style_distance(self, x: Tensor, y: Tensor) -> Tensor:
        """Gram-matrix style distance (B,) of images (B, 3, H, W) in [-1, 1] on the backbone's LPIPS layers: per
        layer the L1 distance of the Gram matrices normalised by C*H*W (BasicSR's style loss, here on the LPIPS
        backbone), summed over layers. Only meaningful with real backbone weights (``metric_name == "lpips"``)."""
        if min(x.shape[-2:]) < MIN_SIZE:
            x, y = (_upsample(t) for t in (x, y))
        fx = self.net.net.forward(self.net.scaling_layer(x))
        fy = self.net.net.forward(self.net.scaling_layer(y))
        total = x.new_zeros(x.shape[0])
        for a, b in zip(fx, fy):
            n, c, h, w = a.shape
            ga = a.reshape(n, c, h * w) @ a.reshape(n, c, h * w).transpose(1, 2) / (c * h * w)
            gb = b.reshape(n, c, h * w) @ b.reshape(n, c, h * w).transpose(1, 2) / (c * h * w)
            total = total + (ga - gb).abs().mean(dim=(1, 2))
        return total

    def spatial_map(self, x: Tensor, y: Tensor) -> Tensor:
        """Per-pixel LPIPS (B, 1, H, W) of images (B, 3, H, W): the sum over layers of each layer's distance map,
        upsampled to the input size (lpips ``spatial=True``); DHR's error map. Its spatial mean is LPIPS."""
        size = x.shape[-2:]
        small = min(size) < MIN_SIZE
        if small:
            x, y = (_upsample(t) for t in (x, y))
        self.net.spatial = True
        try:
            dist = self.net(x, y)
        finally:
            self.net.spatial = False
        return F.interpolate(dist, size=size, mode="bilinear", align_corners=False) if small else dist

    def layer_maps(self, x: Tensor, y: Tensor) -> List[Tensor]:
        """Per-layer LPIPS distance maps of images x, y (B, 3, H, W) in [-1, 1], each at its layer's own size:
        the v0.1 linear head over the squared difference of channel-normalised features, not upsampled (VGG: five
        maps (B, 1, H / 2^l, W / 2^l), l = 0..4; AlexNet: five maps at its strided sizes). The official DHR error
        maps (GANInverter's ``keep_res=True``). Images under 32 px are upsampled to 32 px first."""
        from lpips import normalize_tensor

        if min(x.shape[-2:]) < MIN_SIZE:
            x, y = (_upsample(t) for t in (x, y))
        fx = self.net.net.forward(self.net.scaling_layer(x))
        fy = self.net.net.forward(self.net.scaling_layer(y))
        return [lin((normalize_tensor(a) - normalize_tensor(b)) ** 2) for lin, a, b in zip(self.net.lins, fx, fy)]

    def masked_layer_distance(self, x: Tensor, y: Tensor, masks: Sequence[Tensor]) -> Tensor:
        """LPIPS masked layer by layer (DHR's official refinement loss): per layer, ``layer_maps`` averaged inside the
        mask nearest-resized to that layer's size, summed over layers (a layer whose resized mask is empty adds 0).
        A mask of ones gives LPIPS itself.

        x, y: images (B, 3, H, W) in [-1, 1]; masks: M masks (B or 1, 1, h, w) in [0, 1], any h, w. Returns (M, B).
        """
        for m in masks:
            if m.ndim != 4 or m.shape[1] != 1 or m.shape[0] not in (1, x.shape[0]):
                raise ValueError(f"LPIPSLoss: mask {tuple(m.shape)} must be (B or 1, 1, h, w) for images "
                                 f"{tuple(x.shape)}")
        maps = self.layer_maps(x, y)
        out = []
        for mask in masks:
            total = x.new_zeros(x.shape[0])
            for d in maps:
                m = F.interpolate(mask.to(d.dtype), size=d.shape[-2:], mode="nearest")
                total = total + (d * m).sum(dim=(1, 2, 3)) / m.sum(dim=(1, 2, 3)).clamp_min(1e-8)
            out.append(total)
        return torch.stack(out)

    def forward(self, x: Tensor, y: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        """Images x, y (B, 3, H, W) in [-1, 1], optional mask (B or 1, 1, H, W) in [0, 1] -> distances (B,)."""
        if x.shape != y.shape or x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"LPIPSLoss: x {tuple(x.shape)} and y {tuple(y.shape)} must both be (B, 3, H, W)")
        if mask is not None and (mask.ndim != 4 or mask.shape[1] != 1 or mask.shape[0] not in (1, x.shape[0])
                                 or mask.shape[-2:] != x.shape[-2:]):
            raise ValueError(f"LPIPSLoss: mask {tuple(mask.shape)} must be (B, 1, H, W) for images {tuple(x.shape)}")
        if mask is None:
            if min(x.shape[-2:]) < MIN_SIZE:
                x, y = (_upsample(t) for t in (x, y))
            return self.net(x, y).reshape(x.shape[0])
        dist = self.spatial_map(x, y)  # (B, 1, H, W) at the input size
        mask = mask.to(dist.dtype)
        return (dist * mask).sum(dim=(1, 2, 3)) / mask.sum(dim=(1, 2, 3)).clamp_min(1e-8)
