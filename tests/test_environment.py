"""The installed environment: CPU torch pin, and the torchvision shim that lets lpips/torchmetrics/Lightning import."""
import subprocess
import sys
import textwrap

import torch


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=240)


def test_torch_is_the_pinned_cpu_build():
    assert torch.__version__.startswith("2.13.0")


def test_shim_lets_torchvision_stack_import_in_a_fresh_interpreter():
    """A fresh process (as a DDP child would be) imports the whole stack and builds LPIPS offline."""
    proc = _run("""
        import torchvision, torchmetrics, pytorch_lightning, lpips, torch
        from torchvision import models
        net = lpips.LPIPS(pretrained=True, net="alex", pnet_rand=True, verbose=False)
        x = torch.zeros(1, 3, 32, 32)
        print("ok", float(net(x, x).sum()))
    """)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().startswith("ok 0.0")


def test_shim_is_a_no_op_when_the_operator_exists():
    """The hook only defines schemas that are missing, so a working torchvision is left alone."""
    proc = _run("""
        import sys, torch, _invertlab_tv_shim as shim
        hooks = [f for f in sys.meta_path if isinstance(f, shim._TorchvisionOpsSchemaHook)]
        import torchvision
        assert not [f for f in sys.meta_path if isinstance(f, shim._TorchvisionOpsSchemaHook)], "hook must unregister"
        print(len(hooks), len(shim._LIBRARIES), shim._has_operator(torch, "nms"))
    """)
    assert proc.returncode == 0, proc.stderr[-2000:]
    n_hooks, n_libs, has_nms = proc.stdout.split()
    assert n_hooks == "1" and has_nms == "True"
    assert n_libs in ("0", "1")  # 1 on a CPU torch (schemas defined), 0 where torchvision's _C loaded
