"""Cost of the real-face recipe at 1024 px on the CPU: seconds and peak memory per image for e4e, stage-2 inference
and DHR (batch 1 and 2), plus the byte counts behind the GPU memory budget of per-sample weights.

Every network has seeded random weights at the real configuration (timings and memory do not depend on the weights):
the files are built once in a temporary folder by ``experiments/rehearse_real.py``'s ``build_weights`` (official
layouts) and loaded the way a run loads them (``RefineModule`` from the e4e file, BiSeNet ``79999_iter.pth``,
LPIPS-Alex for the refinement and LPIPS-VGG16 for the DSS on torchvision files, the official stage-2 file).
Each part runs in its own process, so its peak RSS (``getrusage`` maxrss) is its own.

- ``e4e``: encoder (IR-SE-50 at 256 px) + generator, per image (batch 1, mean of ``--repeat`` calls after a warm-up);
- ``stage2``: encoder + the official align/mask net (levels 32..256) + generator, likewise;
- ``dhr`` (batch B): ``RefineModule.invert`` with the official real-face settings (coarse W projection with
  LPIPS-VGG at 256 px, SLIC 200 superpixels, BiSeNet at 512 px, hybrid refinement with LPIPS-Alex at 1024 px). A
  full run (40 coarse + 50 weight-and-feature + 50 feature-only steps) takes most of an hour per image here, so the
  script runs 4 coarse + 3 weight-and-feature + 3 feature-only steps, times every step (the generator's syntheses
  with gradients, one per step), and extrapolates: the rest of the run + 40 / 50 / 50 x the median step of each kind;
- ``bytes``: parameter counts and the bytes autograd saves for the backward of one DHR step at 1024 px (batch 1,
  ``torch.autograd.graph.saved_tensors_hooks``, each storage counted once).

    python experiments/cost_real_cpu.py                     # every part (about 15 min on 2 cores)
    python experiments/cost_real_cpu.py --parts e4e stage2  # some of them
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

PARTS = ("e4e", "stage2", "dhr1", "dhr2", "bytes")
OFFICIAL_STEPS = {"coarse": 40, "both": 50, "feature": 50}  # DHR: 50 steps tune weights and f*, 50 more f* only
SHORT_RUN = (4, 3, 6)  # (coarse, weight, feature) steps of the timed DHR run: 3 / 3 / 2 clean step intervals
WEIGHT_FILES = {"e4e": "e4e_ffhq_encode.pt", "bisenet": "79999_iter.pth", "ood_official": "net_g_410000.pth"}
REAL_FACE_SEGMENTATION = {  # exp/dhr.yaml's real-face command (official DSS, BiSeNet)
    "source": "error_superpixels", "coarse": {"resolution": 256}, "error_scoring": "official_per_layer",
    "lpips": {"net": "vgg", "allow_random_backbone": True}, "parser_kind": "bisenet",
    "superpixels": {"n_segments": 200}, "default_threshold": 0.6,
    "thresholds": {"skin": 0.7, "nose": 0.8, "mouth": 0.8}, "ood_classes": ["background", "cloth", "hat"]}


def peak_rss_gib() -> float:
    """This process's peak resident memory so far (GiB; Linux reports maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def photo_batch(batch: int, size: int = 1024) -> torch.Tensor:
    """(batch, 3, size, size) in [-1, 1]: scikit-image's astronaut (and coffee), resized."""
    import torch.nn.functional as F
    from skimage import data

    photos = [data.astronaut(), data.coffee()[:, 100:500]]
    out = []
    for b in range(batch):
        x = torch.from_numpy(photos[b % 2].copy()).permute(2, 0, 1)[None].float() / 127.5 - 1
        out.append(F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False).clamp(-1, 1))
    return torch.cat(out)


def _module(files: Dict[str, str], method: str = "dhr", coarse: int = 40, weight: int = 50, feature: int = 100):
    """A ``RefineModule`` as ``+exp=dhr``'s real-face command builds it, with the given step counts."""
    from lightning_modules.stage3_module import RefineModule

    seg = dict(REAL_FACE_SEGMENTATION, parser=files["bisenet"], coarse={"resolution": 256, "steps": coarse})
    return RefineModule(files["e4e"], method=method, segmentation=seg,
                        refine={"weight_steps": weight, "feature_steps": feature},
                        lpips={"net": "alex", "allow_random_backbone": True}).eval()


class Clock:
    """Wall and process CPU seconds of a block (``with Clock() as c: ...``; then ``c.wall``, ``c.cpu``). CPU seconds
    are the robust number on a shared machine: other jobs stretch the wall time, not this process's CPU time."""

    def __enter__(self):
        self._wall, self._cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self._wall, time.process_time() - self._cpu


def _timed(fn, repeat: int) -> Dict[str, float]:
    fn()  # warm-up
    with Clock() as c:
        for _ in range(repeat):
            fn()
    return {"wall_s": c.wall / repeat, "cpu_s": c.cpu / repeat}


def measure_inference(part: str, files: Dict[str, str], repeat: int) -> Dict[str, float]:
    """e4e or stage-2 inference of one 1024 px image: seconds (mean of ``repeat`` after a warm-up), peak RSS."""
    from networks.align_mask import load_align_mask

    module = _module(files, method="e4e")
    x = photo_batch(1)
    if part == "e4e":
        def run():
            with torch.no_grad():
                codes, _ = module.encode(x)
                module.generator.synthesize(codes)
    else:
        net, _ = load_align_mask(files["ood_official"])
        net.eval()

        def run():
            with torch.no_grad():
                codes, taps = module.encode(x)
                net(module.generator, codes, taps, x)
    load = os.getloadavg()[0]
    t = _timed(run, repeat)
    return {"wall_s_per_image": t["wall_s"], "cpu_s_per_image": t["cpu_s"], "peak_rss_gib": peak_rss_gib(),
            "load_average": [load, os.getloadavg()[0]]}


def measure_dhr(batch: int, files: Dict[str, str]) -> Dict[str, float]:
    """DHR at 1024 px on ``batch`` images: one short run (``SHORT_RUN`` steps) whose generator calls are timed (a
    forward pre-hook on the generator's constant input: one call per synthesis), the median cost of each kind of step,
    and the run extrapolated to the official step counts."""
    coarse, weight, feature = SHORT_RUN
    module = _module(files, coarse=coarse, weight=weight, feature=feature)
    x = photo_batch(batch)
    calls = []
    hook = module.generator.input.register_forward_pre_hook(
        lambda *_: calls.append((time.perf_counter(), time.process_time(), torch.is_grad_enabled())))
    load = os.getloadavg()[0]
    with Clock() as c, torch.enable_grad():
        module.invert(x)
    hook.remove()
    steps = max(weight, feature)
    timed = [(wall, cpu) for wall, cpu, grad in calls if grad]  # coarse steps, then refinement steps
    if len(timed) != coarse + steps:
        raise RuntimeError(f"expected {coarse} coarse + {steps} refinement syntheses with gradients, timed "
                           f"{len(timed)}")
    out: Dict[str, float] = {"batch": batch, "load_average": [load, os.getloadavg()[0]], "peak_rss_gib": peak_rss_gib()}
    for k, kind in enumerate(("wall", "cpu")):
        est = extrapolate_dhr([v[k] for v in timed], c.wall if kind == "wall" else c.cpu, coarse, weight, feature)
        out.update({f"{kind}_short_run_s": est["total"], f"{kind}_fixed_s": est["fixed"], f"{kind}_full_s": est["full"],
                    f"{kind}_full_s_per_image": est["full"] / batch})
        out.update({f"{kind}_{name}_step_s": est[name] for name in OFFICIAL_STEPS})
    return out


def extrapolate_dhr(starts: Sequence[float], total: float, coarse: int, weight: int, feature: int,
                    official: Dict[str, int] = OFFICIAL_STEPS) -> Dict[str, float]:
    """A short DHR run extrapolated to the official step counts.

    starts: the clock at the start of each synthesis with gradients, ``coarse`` coarse steps then
    max(weight, feature) refinement steps; total: the run's whole time on that clock. The median gap between
    consecutive starts of each kind is that kind's step time ("coarse", "both" = weights and f*, "feature" = f*
    only; the gap that crosses from one kind to the next is left out); "fixed" = total minus the steps;
    "full" = fixed + ``official`` x the step times.
    """
    steps = max(weight, feature)
    if len(starts) != coarse + steps or coarse < 2 or weight < 1 or feature - weight < 2:
        raise ValueError(f"extrapolate_dhr: need coarse >= 2, weight >= 1, feature >= weight + 2 and one start per "
                         f"step ({coarse} + {steps}), got {len(starts)} starts for ({coarse}, {weight}, {feature})")
    gaps = [b - a for a, b in zip(starts, starts[1:])]
    step = {"coarse": statistics.median(gaps[:coarse - 1]), "both": statistics.median(gaps[coarse:coarse + weight]),
            "feature": statistics.median(gaps[coarse + weight:])}
    fixed = total - coarse * step["coarse"] - weight * step["both"] - (steps - weight) * step["feature"]
    return {**step, "total": total, "fixed": fixed,
            "full": fixed + sum(official[name] * step[name] for name in official)}


def measure_bytes(size: int = 1024) -> Dict[str, float]:
    """Parameter counts of the config-f generator at ``size`` (1024 px) and the bytes autograd saves for the backward
    of one DHR step at batch 1: the synthesis with per-sample weights (``expand_params``) and f* swapped in at the 128 px block's
    output (``Generator.next_block_input``), LPIPS-Alex masked per layer and the masked MSE, as
    ``networks/refine/hybrid.py`` computes them. The tuned leaves themselves (weights, f*) are not counted."""
    import torch.nn.functional as F

    from lightning_modules.perceptual import LPIPSLoss
    from networks.stylegan2 import Generator, call_with_params, expand_params

    torch.manual_seed(0)
    g = Generator(size, 512, 8, channel_multiplier=2).eval()
    lpips = LPIPSLoss("alex", allow_random_backbone=True)
    codes = torch.randn(1, g.n_latent, 512) * 0.5
    images = photo_batch(1, size)
    in_domain = torch.ones(1, 1, size, size)
    in_domain[..., size * 600 // 1024:, size * 300 // 1024:size * 700 // 1024] = 0
    point = g.next_block_input(g.size // 8)  # the official feature_idx 11: convs.10.in at 1024 px
    mask_r = F.adaptive_avg_pool2d(in_domain, (g.size // 8, g.size // 8))
    noise = [n.detach() for n in g.stored_noise()]
    params = expand_params(g, 1)
    with torch.no_grad():
        feature = g.synthesize(codes, noise=noise, capture=[point]).features[point].clone().requires_grad_(True)
    leaves = {p.untyped_storage().data_ptr() for p in params.values()} | {feature.untyped_storage().data_ptr()}
    seen, by_side = set(), {}

    def pack(t):
        key = t.untyped_storage().data_ptr()
        if key not in seen and key not in leaves:
            seen.add(key)
            side = int(t.shape[-1]) if t.ndim == 4 else 0  # spatial side of feature maps; 0 = anything else
            by_side[side] = by_side.get(side, 0) + t.untyped_storage().nbytes()
        return t

    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = call_with_params(g, params, "synthesize", codes, noise=noise,
                               edits={point: lambda h: h * mask_r + feature * (1 - mask_r)}).image
        lpips.masked_layer_distance(out, images, [1 - mask_r, mask_r]).sum()
        ((out - images) ** 2 * in_domain).sum()
    return {"generator_params": sum(p.numel() for p in g.parameters()),
            "synthesis_params": sum(v[0].numel() for v in params.values()), "feature_elems": feature.numel(),
            "saved_for_backward_bytes": sum(by_side.values()),
            "saved_by_side_bytes": {str(k): v for k, v in sorted(by_side.items())}, "peak_rss_gib": peak_rss_gib()}


def child(part: str, files: Dict[str, str], repeat: int) -> Dict[str, float]:
    """One part, in this process."""
    if part in ("e4e", "stage2"):
        return measure_inference(part, files, repeat)
    if part.startswith("dhr"):
        return measure_dhr(int(part[3:]), files)
    return measure_bytes()


def table(results: Dict[str, Dict[str, float]], threads: int) -> str:
    """The Markdown table of the README (one row per measured part): CPU seconds per image (this process, all
    threads), wall seconds as measured, the load average while measuring, peak RSS."""
    rows = ["| what (1024 px, config-f) | batch | CPU s / image | wall s / image (load avg) | peak RSS | how |",
            "|---|---|---|---|---|---|"]
    names = {"e4e": "e4e inference (IR-SE-50 + G)",
             "stage2": "stage-2 inference (e4e + official align/mask levels 32..256 + G)"}
    for part in ("e4e", "stage2"):
        if part in results:
            r = results[part]
            rows.append(f"| {names[part]} | 1 | {r['cpu_s_per_image']:.1f} | {r['wall_s_per_image']:.1f} "
                        f"({max(r['load_average']):.1f}) | {r['peak_rss_gib']:.1f} GiB | measured |")
    for part in ("dhr1", "dhr2"):
        if part in results:
            r = results[part]
            rows.append(f"| DHR, official steps (40 coarse + 50 weight+feature + 50 feature) | {r['batch']} | "
                        f"{r['cpu_full_s_per_image']:.0f} | {r['wall_full_s_per_image']:.0f} "
                        f"({max(r['load_average']):.1f}) | {r['peak_rss_gib']:.1f} GiB | extrapolated; wall s per "
                        f"batch: coarse step {r['wall_coarse_step_s']:.1f}, weight+feature step "
                        f"{r['wall_both_step_s']:.1f}, feature step {r['wall_feature_step_s']:.1f}, the rest "
                        f"{r['wall_fixed_s']:.0f} |")
    return "\n".join(rows) + f"\n\n(torch {torch.__version__}, {threads} threads)"


def main(argv: Optional[Sequence[str]] = None) -> int:
    """CLI (see the module docstring); prints the table and the raw numbers as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=2, help="timed calls of the inference parts")
    parser.add_argument("--weights", type=Path, default=None, help="a folder of the rehearsal's files "
                        "(rehearse_real.py --keep: <work>/weights); default: built in a temporary folder")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--files", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.child:
        print("RESULT " + json.dumps(child(args.child, json.loads(args.files), args.repeat)), flush=True)
        return 0
    from experiments.rehearse_real import build_weights

    results: Dict[str, Dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="cost_real_") as tmp:
        if args.weights is not None:
            files = {k: str(args.weights / name) for k, name in WEIGHT_FILES.items()}
        else:
            files = {k: str(v) for k, v in build_weights(Path(tmp), log=print).items()}
        for part in args.parts:
            start = time.perf_counter()
            proc = subprocess.run([sys.executable, __file__, "--child", part, "--files", json.dumps(files),
                                   "--threads", str(args.threads), "--repeat", str(args.repeat)],
                                  capture_output=True, text=True)
            lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
            if proc.returncode != 0 or not lines:
                print(f"{part} failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
                return 1
            results[part] = json.loads(lines[-1][len("RESULT "):])
            print(f"{part}: {time.perf_counter() - start:.0f} s {json.dumps(results[part])}", flush=True)
    print(table(results, args.threads))
    return 0


if __name__ == "__main__":
    sys.exit(main())
