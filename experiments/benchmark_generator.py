"""Generator speed: forward and forward+backward images/s, ``impl="ref"`` vs ``impl="fast"``.

``ref`` is rosinality's plain-PyTorch path (``upfirdn2d_native``, grouped modulated convolutions,
``fused_leaky_relu`` CPU branch), re-expressed in ``networks/stylegan2/ops.py``; ``fast`` is this
project's default. Both run in the same process, so the printed ratios are measured in one run.
FLOPs are counted with ``torch.utils.flop_counter`` (convolutions and matmuls, 2 per MAC); the
machine's peak is the best GFLOP/s of a plain 3x3 convolution of similar shape.

Usage: ``python experiments/benchmark_generator.py [--batch 4] [--repeats 3] [--device cpu cuda]``.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from networks.stylegan2 import Generator  # noqa: E402

CONFIGS = {
    "config-f 256px": dict(size=256, style_dim=512, n_mlp=8, channel_multiplier=2),
    "tiny 64px (default)": dict(size=64, style_dim=128, n_mlp=4, channel_multiplier=1, channel_max=64),
}


def sync(device) -> None:
    """Wait for the queued kernels of ``device`` (a str or torch.device) to finish; no-op off CUDA."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def best_time(fn: Callable[[], None], device, repeats: int, warmup: Optional[Callable[[], None]] = None) -> float:
    """Best wall time of ``repeats`` calls after one warm-up call (``warmup``, default ``fn``), in seconds."""
    (warmup or fn)()
    sync(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def count_flops(fn: Callable[[], None]) -> float:
    """Total FLOPs of one call of ``fn`` as counted by torch's FlopCounterMode."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def conv_peak_gflops(device: str, repeats: int) -> float:
    """Best GFLOP/s of a plain 3x3 convolution (4x256x64x64 -> 256 channels) on ``device``."""
    x = torch.randn(4, 256, 64, 64, device=device)
    w = torch.randn(256, 256, 3, 3, device=device)
    flops = 2 * 4 * 256 * 256 * 9 * 64 * 64
    with torch.no_grad():
        best = best_time(lambda: F.conv2d(x, w, padding=1), device, repeats)
    return flops / best / 1e9


def seeded_generator(kwargs: Dict, device, batch: int, seed: int = 0):
    """(Generator(**kwargs) with weights drawn from ``seed`` on ``device``, random z (batch, style_dim))."""
    torch.manual_seed(seed)
    g = Generator(**kwargs).to(device)
    return g, torch.randn(batch, g.style_dim, device=device)


def generator_passes(g: Generator, z: torch.Tensor) -> Dict[str, Callable[[], None]]:
    """The two timed passes of ``g`` on z: {"forward": no-grad forward, "forward+backward": forward + backward
    of the mean squared image (gradients w.r.t. the weights and z)}; they use ``g``'s current impl."""
    def forward():
        with torch.no_grad():
            g([z])

    def forward_backward():
        g.zero_grad(set_to_none=True)
        image, _ = g([z.requires_grad_(True)])
        image.square().mean().backward()

    return {"forward": forward, "forward+backward": forward_backward}


def bench_config(name: str, kwargs: Dict, device: str, batch: int, repeats: int) -> List[Dict]:
    """Measure both impls of one generator config; returns one row per impl."""
    g, w = seeded_generator(kwargs, device, batch)
    passes = generator_passes(g, w)
    forward, forward_backward = passes["forward"], passes["forward+backward"]
    rows = []
    for impl in ("ref", "fast"):
        g.set_impl(impl)
        flops_f = count_flops(forward)
        flops_fb = count_flops(forward_backward)
        t_f = best_time(forward, device, repeats)
        t_fb = best_time(forward_backward, device, repeats)
        rows.append(dict(config=name, device=device, impl=impl, fwd_s=t_f, fwd_ips=batch / t_f,
                         fwd_gflops=flops_f / t_f / 1e9, fwd_gflop=flops_f / 1e9,
                         fb_s=t_fb, fb_ips=batch / t_fb, fb_gflops=flops_fb / t_fb / 1e9))
    ref, fast = rows
    fast["fwd_speedup"] = ref["fwd_s"] / fast["fwd_s"]
    fast["fb_speedup"] = ref["fb_s"] / fast["fb_s"]
    return rows


def format_table(rows: List[Dict], peaks: Dict[str, float], batch: int) -> str:
    """Markdown table of the measured rows."""
    head = (f"| config (batch {batch}) | device | impl | fwd s | fwd img/s | fwd GFLOP/s (% peak) | "
            f"fwd+bwd s | fwd+bwd img/s | fwd+bwd GFLOP/s | speed-up fwd / fwd+bwd |")
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        peak = peaks[r["device"]]
        speed = (f"{r['fwd_speedup']:.2f}x / {r['fb_speedup']:.2f}x" if "fwd_speedup" in r else "1.00x (baseline)")
        lines.append(f"| {r['config']} ({r['fwd_gflop']:.1f} GFLOP fwd) | {r['device']} | {r['impl']} | "
                     f"{r['fwd_s']:.3f} | {r['fwd_ips']:.2f} | {r['fwd_gflops']:.1f} ({100 * r['fwd_gflops'] / peak:.0f}%) | "
                     f"{r['fb_s']:.3f} | {r['fb_ips']:.2f} | {r['fb_gflops']:.1f} | {speed} |")
    lines.append("")
    lines += [f"measured 3x3 convolution peak on {d}: {p:.1f} GFLOP/s  " for d, p in peaks.items()]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--device", nargs="+", default=None, help="default: cpu, plus cuda when available")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--out", type=Path, default=None, help="also write the table to this Markdown file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = args.device or (["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    rows, peaks = [], {}
    for device in devices:
        peaks[device] = conv_peak_gflops(device, args.repeats)
        for name in args.configs:
            rows += bench_config(name, CONFIGS[name], device, args.batch, args.repeats)
            print(f"done: {name} on {device}", file=sys.stderr, flush=True)
    table = format_table(rows, peaks, args.batch)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads"
          + (f", {torch.cuda.get_device_name()}" if "cuda" in devices else ""))
    print(table)
    if args.out:
        args.out.write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
