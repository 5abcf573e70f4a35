"""Face parsers for DHR's domain-specific segmentation: the CelebAMask-HQ BiSeNet and the SynthFaces parser.

``BiSeNet`` reproduces the architecture of zllrunning/face-parsing.PyTorch (the parser GANInverter and SAM use,
checkpoint ``79999_iter.pth``) with the same state-dict key names, so that file loads strictly. ``FaceParsing``
wraps either parser behind one contract: images (B, 3, H, W) in [-1, 1] at any size -> logits (B, K, H, W) at
the input size, with ``class_names`` giving the meaning of the K channels. ``load_face_parsing(kind, path)``
builds one from a file.

The BiSeNet preprocessing follows the official test script: RGB in [0, 1], ImageNet mean/std normalisation,
bilinear resize to 512 x 512 (PIL's bilinear filter is antialiased when shrinking, hence ``antialias=True`` when
downsampling here).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from labels.synthfaces import PART_INDEX

from .checkpoints import CheckpointError, load_strict, safe_load

# Index order of the 19 classes of 79999_iter.pth (face-parsing.PyTorch's prepropess_data.py paints the
# CelebAMask-HQ part masks with label = 1 + position in this list, 0 = background).
CELEBAMASK_CLASSES: Tuple[str, ...] = (
    "background", "skin", "l_brow", "r_brow", "l_eye", "r_eye", "eye_g", "l_ear", "r_ear", "ear_r",
    "nose", "mouth", "u_lip", "l_lip", "neck", "neck_l", "cloth", "hair", "hat",
)
SYNTHFACES_CLASSES: Tuple[str, ...] = tuple(sorted(PART_INDEX, key=PART_INDEX.__getitem__))

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

FACE_PARSING_KINDS = ("synthfaces", "bisenet")


# ------------------------------------------------------------------------------------------------ BiSeNet
class ConvBNReLU(nn.Module):
    """Conv (no bias) -> BatchNorm -> ReLU. Keys: ``conv.weight``, ``bn.*``. (B, in_chan, H, W) -> (B, out_chan, H', W')."""

    def __init__(self, in_chan: int, out_chan: int, ks: int = 3, stride: int = 1, padding: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(in_chan, out_chan, kernel_size=ks, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(out_chan)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)))


class BasicBlock(nn.Module):
    """ResNet basic block (two 3x3 convs + shortcut); a 1x1 conv + BN ``downsample`` when the shape changes."""

    def __init__(self, in_chan: int, out_chan: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chan, out_chan, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_chan)
        self.conv2 = nn.Conv2d(out_chan, out_chan, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_chan)
        self.downsample: Optional[nn.Sequential] = None
        if in_chan != out_chan or stride != 1:
            self.downsample = nn.Sequential(nn.Conv2d(in_chan, out_chan, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(out_chan))

    def forward(self, x: Tensor) -> Tensor:
        residual = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(shortcut + residual)


def _basic_layer(in_chan: int, out_chan: int, stride: int, blocks: int = 2) -> nn.Sequential:
    return nn.Sequential(BasicBlock(in_chan, out_chan, stride),
                         *[BasicBlock(out_chan, out_chan, 1) for _ in range(blocks - 1)])


class Resnet18(nn.Module):
    """ResNet-18 trunk without the classifier (torchvision key names minus ``fc``).

    ``forward(x (B,3,H,W)) -> (feat8 (B,128,H/8,W/8), feat16 (B,256,H/16,W/16), feat32 (B,512,H/32,W/32))``.
    """

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = _basic_layer(64, 64, 1)
        self.layer2 = _basic_layer(64, 128, 2)
        self.layer3 = _basic_layer(128, 256, 2)
        self.layer4 = _basic_layer(256, 512, 2)

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        feat8 = self.layer2(self.layer1(x))
        feat16 = self.layer3(feat8)
        feat32 = self.layer4(feat16)
        return feat8, feat16, feat32


class AttentionRefinementModule(nn.Module):
    """ConvBNReLU, then channel attention: sigmoid(BN(1x1 conv(global average))) scales the features."""

    def __init__(self, in_chan: int, out_chan: int):
        super().__init__()
        self.conv = ConvBNReLU(in_chan, out_chan, ks=3, stride=1, padding=1)
        self.conv_atten = nn.Conv2d(out_chan, out_chan, kernel_size=1, bias=False)
        self.bn_atten = nn.BatchNorm2d(out_chan)

    def forward(self, x: Tensor) -> Tensor:
        feat = self.conv(x)
        atten = torch.sigmoid(self.bn_atten(self.conv_atten(F.adaptive_avg_pool2d(feat, 1))))
        return feat * atten


class ContextPath(nn.Module):
    """ResNet-18 + attention refinement of the 1/16 and 1/32 features with a global-context term.

    ``forward(x) -> (feat8 (B,128,H/8), feat16_up (B,128,H/8), feat32_up (B,128,H/16))`` (spatial sizes of
    the ResNet stages; upsampling is nearest, as in the official code).
    """

    def __init__(self):
        super().__init__()
        self.resnet = Resnet18()
        self.arm16 = AttentionRefinementModule(256, 128)
        self.arm32 = AttentionRefinementModule(512, 128)
        self.conv_head32 = ConvBNReLU(128, 128, ks=3, stride=1, padding=1)
        self.conv_head16 = ConvBNReLU(128, 128, ks=3, stride=1, padding=1)
        self.conv_avg = ConvBNReLU(512, 128, ks=1, stride=1, padding=0)

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        feat8, feat16, feat32 = self.resnet(x)
        avg = self.conv_avg(F.adaptive_avg_pool2d(feat32, 1))
        feat32_sum = self.arm32(feat32) + F.interpolate(avg, size=feat32.shape[-2:], mode="nearest")
        feat32_up = self.conv_head32(F.interpolate(feat32_sum, size=feat16.shape[-2:], mode="nearest"))
        feat16_sum = self.arm16(feat16) + feat32_up
        feat16_up = self.conv_head16(F.interpolate(feat16_sum, size=feat8.shape[-2:], mode="nearest"))
        return feat8, feat16_up, feat32_up


class FeatureFusionModule(nn.Module):
    """Concatenate two feature maps, ConvBNReLU 1x1, then add a squeeze-excitation-weighted copy of itself."""

    def __init__(self, in_chan: int, out_chan: int):
        super().__init__()
        self.convblk = ConvBNReLU(in_chan, out_chan, ks=1, stride=1, padding=0)
        self.conv1 = nn.Conv2d(out_chan, out_chan // 4, kernel_size=1, bias=False)
        self.conv2 = nn.Conv2d(out_chan // 4, out_chan, kernel_size=1, bias=False)

    def forward(self, fsp: Tensor, fcp: Tensor) -> Tensor:
        feat = self.convblk(torch.cat([fsp, fcp], dim=1))
        atten = torch.sigmoid(self.conv2(F.relu(self.conv1(F.adaptive_avg_pool2d(feat, 1)))))
        return feat * atten + feat


class BiSeNetOutput(nn.Module):
    """Segmentation head: ConvBNReLU 3x3 (in_chan -> mid_chan) then a 1x1 conv to ``n_classes`` logits."""

    def __init__(self, in_chan: int, mid_chan: int, n_classes: int):
        super().__init__()
        self.conv = ConvBNReLU(in_chan, mid_chan, ks=3, stride=1, padding=1)
        self.conv_out = nn.Conv2d(mid_chan, n_classes, kernel_size=1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv_out(self.conv(x))


class BiSeNet(nn.Module):
    """BiSeNet face parser of zllrunning/face-parsing.PyTorch (state-dict compatible with ``79999_iter.pth``).

    The spatial path is the ResNet 1/8 feature (as in the official repo: no ``sp.*`` keys). The auxiliary
    heads ``conv_out16`` / ``conv_out32`` exist for key compatibility but are not evaluated.

    Args:
        n_classes: output classes (19 for CelebAMask-HQ, see ``CELEBAMASK_CLASSES``).
    Input: ImageNet-normalised RGB (B, 3, H, W), trained at 512 x 512.
    Output: main-head logits (B, n_classes, H, W), bilinearly upsampled (align_corners=True) to the input size.
    """

    def __init__(self, n_classes: int = 19):
        super().__init__()
        if int(n_classes) < 1:
            raise ValueError(f"BiSeNet: n_classes must be >= 1, got {n_classes}")
        self.config = {"n_classes": int(n_classes)}
        self.n_classes = int(n_classes)
        self.cp = ContextPath()
        self.ffm = FeatureFusionModule(256, 256)
        self.conv_out = BiSeNetOutput(256, 256, n_classes)
        self.conv_out16 = BiSeNetOutput(128, 64, n_classes)
        self.conv_out32 = BiSeNetOutput(128, 64, n_classes)

    def forward(self, x: Tensor) -> Tensor:
        feat_res8, feat_cp8, _ = self.cp(x)
        logits = self.conv_out(self.ffm(feat_res8, feat_cp8))
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=True)


# ------------------------------------------------------------------------------------------------ wrapper
def _resize(x: Tensor, size: Sequence[int]) -> Tensor:
    size = (int(size[0]), int(size[1]))
    if tuple(x.shape[-2:]) == size:
        return x
    shrink = size[0] < x.shape[-2] or size[1] < x.shape[-1]
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=shrink)


class FaceParsing(nn.Module):
    """A frozen face parser behind one contract: images in [-1, 1] -> logits at the input size.

    Args:
        net: a ``BiSeNet`` (kind "bisenet") or ``networks.synthfaces_nets.FaceParser`` (kind "synthfaces").
        kind: "bisenet" or "synthfaces".
        input_size: BiSeNet working resolution (default 512, its training size); ignored for synthfaces
            (the SynthFaces parser resizes to its own ``resolution``).
    Attributes: ``kind``, ``class_names`` (K names in channel order), ``num_classes`` (K), ``input_size``.

    The net's parameters are frozen and it always runs in eval mode (BatchNorm running statistics), whatever
    mode the wrapper is switched to; gradients still flow to the input images.
    """

    def __init__(self, net: nn.Module, kind: str, input_size: Optional[int] = None):
        super().__init__()
        from .synthfaces_nets import FaceParser

        if kind == "bisenet":
            if not isinstance(net, BiSeNet):
                raise TypeError(f"FaceParsing(kind='bisenet') wraps a BiSeNet, got {type(net).__name__}")
            if net.n_classes != len(CELEBAMASK_CLASSES):
                raise ValueError(f"FaceParsing(kind='bisenet') needs the {len(CELEBAMASK_CLASSES)}-class "
                                 f"CelebAMask-HQ BiSeNet, got n_classes={net.n_classes}")
            self.class_names = CELEBAMASK_CLASSES
            self.input_size = int(input_size) if input_size is not None else 512
            if self.input_size < 32:
                raise ValueError(f"FaceParsing: BiSeNet input_size must be >= 32, got {input_size}")
        elif kind == "synthfaces":
            if not isinstance(net, FaceParser):
                raise TypeError(f"FaceParsing(kind='synthfaces') wraps a synthfaces_nets.FaceParser, "
                                f"got {type(net).__name__}")
            if net.num_classes != len(SYNTHFACES_CLASSES):
                raise ValueError(f"FaceParsing(kind='synthfaces') needs a {len(SYNTHFACES_CLASSES)}-class "
                                 f"SynthFaces parser, got num_classes={net.num_classes}")
            self.class_names = SYNTHFACES_CLASSES
            self.input_size = int(net.resolution)
        else:
            raise ValueError(f"FaceParsing: kind must be one of {FACE_PARSING_KINDS}, got {kind!r}")
        self.kind = kind
        self.num_classes = len(self.class_names)
        self.net = net.eval().requires_grad_(False)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> "FaceParsing":
        """Ignores ``mode``: the parser stays in eval mode."""
        return super().train(False)

    def forward(self, images: Tensor) -> Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> logits (B, num_classes, H, W) float at the input size."""
        if not torch.is_tensor(images) or images.dim() != 4 or images.shape[1] != 3:
            shape = tuple(images.shape) if torch.is_tensor(images) else type(images).__name__
            raise ValueError(f"FaceParsing expects images (B, 3, H, W) in [-1, 1], got {shape}")
        x = images.float()
        if self.kind == "synthfaces":
            return self.net(x)
        size = x.shape[-2:]
        x = ((x + 1.0) * 0.5 - self.mean) / self.std
        logits = self.net(_resize(x, (self.input_size, self.input_size)))
        return _resize(logits, size)

    def probabilities(self, images: Tensor) -> Tensor:
        """Softmax class probabilities (B, num_classes, H, W) for images (B, 3, H, W) in [-1, 1]."""
        return self(images).softmax(dim=1)

    def predict(self, images: Tensor) -> Tensor:
        """Part map (B, H, W) int64 of indices into ``class_names``."""
        return self(images).argmax(dim=1)


# ------------------------------------------------------------------------------------------------ loading
def _bisenet_state(ckpt: Any, path: Path) -> Dict[str, Tensor]:
    """The BiSeNet state dict inside a loaded file: raw, or under "state_dict"; "module." prefixes removed."""
    if isinstance(ckpt, Mapping) and isinstance(ckpt.get("state_dict"), Mapping):
        ckpt = ckpt["state_dict"]
    if not isinstance(ckpt, Mapping) or not ckpt or not all(torch.is_tensor(v) for v in ckpt.values()):
        raise CheckpointError(f"{path} is not a BiSeNet checkpoint: expected a state dict (name -> tensor) "
                              f"or {{'state_dict': ...}}, got {type(ckpt).__name__}")
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in ckpt.items()}


def load_face_parsing(kind: str, path, *, input_size: Optional[int] = None,
                      map_location="cpu") -> FaceParsing:
    """Load a face parser file as a frozen ``FaceParsing`` (eval mode).

    Args:
        kind: "synthfaces" (a ``face_parser.pt`` from ``networks.synthfaces_nets``) or "bisenet"
            (face-parsing.PyTorch's ``79999_iter.pth``: a raw state dict or ``{"state_dict": ...}``, keys
            optionally prefixed "module."). "farl" is not supported.
        path: checkpoint file (read with ``torch.load(weights_only=True)``).
        input_size: BiSeNet working resolution (default 512).
    Raises:
        ValueError: unknown kind (or "farl").
        CheckpointError: the file is missing, unsafe, or its keys/shapes do not fit (message names the file).
    """
    if kind == "farl":
        raise ValueError("load_face_parsing: kind 'farl' is not supported: FaRL parsing needs facer's RetinaFace "
                         "face detection and alignment; use kind 'bisenet' (face-parsing.PyTorch 79999_iter.pth) "
                         "or 'synthfaces'")
    if kind not in FACE_PARSING_KINDS:
        raise ValueError(f"load_face_parsing: unknown kind {kind!r}; expected one of {FACE_PARSING_KINDS}")
    path = Path(path).expanduser()
    if kind == "synthfaces":
        from .synthfaces_nets import load_face_parser

        return FaceParsing(load_face_parser(path, map_location=map_location), "synthfaces")
    state = _bisenet_state(safe_load(path, map_location=map_location), path)
    net = BiSeNet(n_classes=len(CELEBAMASK_CLASSES))
    # Files saved before PyTorch 0.4.1 lack BatchNorm's num_batches_tracked (unused in eval): keep the net's own.
    for key, value in net.state_dict().items():
        if key.endswith("num_batches_tracked") and key not in state:
            state[key] = value
    load_strict(net, state, source=str(path))
    return FaceParsing(net.eval(), "bisenet", input_size=input_size)


__all__ = ["BiSeNet", "FaceParsing", "load_face_parsing", "CELEBAMASK_CLASSES", "SYNTHFACES_CLASSES",
           "FACE_PARSING_KINDS", "IMAGENET_MEAN", "IMAGENET_STD"]
