"""Import hook that lets the CUDA-only torchvision wheel import beside a CPU torch.

Why it exists: PyPI has no CPU build of torchvision 0.28 (the version that matches torch 2.13).
The CUDA wheel's compiled ``_C`` extension cannot load without CUDA torch, and torchvision then
fails while registering fake kernels for ``torchvision::nms`` because that operator schema was never
defined. ``lpips`` imports ``torchvision.models`` and ``torchmetrics``/``pytorch_lightning`` import
torchvision when it is installed, so all of them break.

What it does: just before ``torchvision._meta_registrations`` is imported (which happens right after
torchvision tried to load ``_C``), it checks whether the ``nms`` operator exists. If not, it defines
the two operator *schemas* (``nms`` and ``qnms``) without kernels, so the registration succeeds.
Pure-Python parts of torchvision (``models``, ``transforms``, ``utils``) then work; compiled ops
(``ops.nms``, ``io.read_image``) still raise when called. On a machine where ``_C`` loads (CUDA torch)
the hook does nothing.

It is installed as ``_invertlab_tv_shim.py`` plus a one-line ``.pth`` file in site-packages by
``tools/install_tv_shim.py`` so that every interpreter, including DDP child processes, gets it.
"""
import importlib.abc
import sys

_LIBRARIES = []  # keeps the torch.library fragments alive for the life of the process


class _TorchvisionOpsSchemaHook(importlib.abc.MetaPathFinder):
    """Meta-path finder that fires once, on ``torchvision._meta_registrations``."""

    trigger = "torchvision._meta_registrations"

    def find_spec(self, fullname, path=None, target=None):
        if fullname != self.trigger:
            return None
        sys.meta_path.remove(self)
        import torch

        if not _has_operator(torch, "nms"):
            lib = torch.library.Library("torchvision", "FRAGMENT")
            lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
            lib.define("qnms(Tensor qdets, Tensor scores, float iou_threshold) -> Tensor")
            _LIBRARIES.append(lib)
        return None  # let the normal finders import the module


def _has_operator(torch, name):
    try:
        getattr(torch.ops.torchvision, name)
        return True
    except (AttributeError, RuntimeError):
        return False


if not any(isinstance(f, _TorchvisionOpsSchemaHook) for f in sys.meta_path):
    sys.meta_path.insert(0, _TorchvisionOpsSchemaHook())
