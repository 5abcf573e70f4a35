"""GPU benchmark in one command: generator ref vs fast ops, DHR refinement (batch, bf16), stage-2 inference.

Prints one Markdown table (all ratios measured in one run):

- generator forward and forward+backward images/s, ``impl="ref"`` vs ``impl="fast"`` (``networks/stylegan2/ops.py``),
  at 256 and 1024 px (rosinality config-f widths), batch ``--gen-batch``;
- DHR hybrid refinement (``networks.refine.hybrid.hybrid_refine``, official steps ``RefineConfig()``: 50 weight +
  100 feature steps, LPIPS-masked losses) at 1024 px, batch 1 vs 8, fp32 vs bf16 autocast, with the PSNR of each
  bf16 output against the fp32 output on the same inputs (the quality check) and the throughput as a multiple
  of the official DHR (about 12 s per image at batch 1 on an RTX 3090);
- stage-2 inference images/s (e4e IR-SE-50 encoder at 256 px + the ICCV'23 align/mask net at its 4 default
  levels + the generator), fp32 vs bf16 autocast.

Every network has seeded random weights at the real config (no checkpoint is read: timings and memory do not
depend on the weights). DHR refines random W+ codes towards images rendered from perturbed codes with a
pasted out-of-domain square (no e4e encoder is needed for the codes); LPIPS has a random AlexNet backbone (the
cost of the real one). Peak memory is ``torch.cuda.max_memory_allocated`` per cell ("n/a" off CUDA); a cell that
runs out of GPU memory reads "OOM". Each cell is warmed up and synchronised before it is timed.

    python experiments/benchmark_gpu.py                          # CUDA when present, else CPU (slow)
    python experiments/benchmark_gpu.py --out gpu.md             # also write the table
    python experiments/benchmark_gpu.py --device cpu --quick     # tiny sizes and 2 steps: the test suite's run
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import sys
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from experiments.benchmark_generator import best_time, generator_passes, seeded_generator, sync  # noqa: E402
from lightning_modules.perceptual import LPIPSLoss  # noqa: E402
from networks.align_mask import AlignMaskNet, default_levels  # noqa: E402
from networks.encoders import build_encoder, resize_to_encoder  # noqa: E402
from networks.refine.hybrid import RefineConfig, decode, hybrid_refine  # noqa: E402
from networks.stylegan2 import Generator  # noqa: E402

CONFIG_F = dict(style_dim=512, n_mlp=8, channel_multiplier=2)
OFFICIAL_DHR_SECONDS = 12.0  # per image, batch 1, RTX 3090 (the official DHRInference)
GOAL_FACTOR = 10
PRECISIONS = ("fp32", "bf16 autocast")
COLUMNS = ("part", "setting", "batch", "variant", "images/s", "speed-up", "x official DHR", "peak memory",
           "quality")


# ------------------------------------------------------------------------------------------------ settings
@dataclass
class Settings:
    """What one run measures: the full GPU set-up or the tiny ``--quick`` one."""

    generators: Dict[str, dict]  # label -> Generator kwargs (ref vs fast)
    gen_batch: int
    repeats: int
    refine_generator: dict  # DHR and stage 2 run on this generator
    refine: RefineConfig
    refine_batches: Tuple[int, ...]
    encoder: dict  # e4e kwargs except n_styles / style_dim
    stage2_batch: int
    official_scale: bool  # the real sizes and steps: the official DHR's throughput is comparable


def full_settings(gen_batch: int = 4, repeats: int = 3) -> Settings:
    """The real configs: config-f 256 / 1024 px generators, official DHR steps, e4e IR-SE-50 at 256 px."""
    return Settings(
        generators={"config-f 256 px": dict(size=256, **CONFIG_F), "config-f 1024 px": dict(size=1024, **CONFIG_F)},
        gen_batch=gen_batch, repeats=repeats, refine_generator=dict(size=1024, **CONFIG_F), refine=RefineConfig(),
        refine_batches=(1, 8), encoder=dict(num_layers=50, mode="ir_se", input_size=256), stage2_batch=8,
        official_scale=True)


def quick_settings() -> Settings:
    """Tiny sizes and 2 steps, so that the whole script runs in seconds on a CPU (the test suite's run)."""
    tiny = dict(style_dim=64, n_mlp=2, channel_multiplier=1, channel_max=32)
    return Settings(
        generators={"tiny 32 px": dict(size=32, **tiny), "tiny 64 px": dict(size=64, **tiny)},
        gen_batch=2, repeats=1, refine_generator=dict(size=64, **tiny),
        refine=RefineConfig(weight_steps=2, feature_steps=2), refine_batches=(1, 8),
        encoder=dict(num_layers=50, mode="ir_se", input_size=64, width=0.25, units=[1, 1, 1, 1]), stage2_batch=8,
        official_scale=False)


# ------------------------------------------------------------------------------------------------ measuring
@dataclass
class Cell:
    """One measurement: seconds per call (None = failed), peak bytes (None off CUDA), result, and why it failed
    ("OOM" for CUDA out of memory, else the exception's type)."""

    seconds: Optional[float]
    peak_bytes: Optional[int] = None
    result: Any = None
    failure: Optional[str] = None


def precision_context(device, precision: str):
    """A context manager running its body in ``precision``: "fp32" (nothing) or "bf16 autocast"."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)


def measure(fn: Callable[[], Any], device, repeats: int = 1, warmup: Optional[Callable[[], Any]] = None) -> Cell:
    """Time ``fn`` (best of ``repeats`` after a warm-up, synchronised) with its peak GPU memory; the last result is
    kept. A CUDA out-of-memory error gives a failed cell "OOM" and any other RuntimeError a failed cell named by its
    type (message on stderr), so one cell cannot end a GPU run; memory is released."""
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    kept, failure = {}, None
    try:
        seconds = best_time(lambda: kept.update(result=fn()), device, repeats, warmup=warmup)
    except torch.cuda.OutOfMemoryError:
        failure = "OOM"
    except RuntimeError as err:  # e.g. an op without a bf16 kernel on this device
        failure = type(err).__name__
        print(f"benchmark_gpu: cell failed: {failure}: {err}", file=sys.stderr, flush=True)
    if failure is not None:  # outside the except block: the traceback no longer holds the cell's tensors
        kept.clear()
        release(device)
        return Cell(None, failure=failure)
    return Cell(seconds, torch.cuda.max_memory_allocated(device) if cuda else None, kept.get("result"))


def release(device) -> None:
    """Free cached GPU memory between cells (no-op off CUDA)."""
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean per-image PSNR (dB) of images a, b (B, 3, H, W) in [-1, 1] (both clamped), on the [0, 1] scale."""
    a, b = ((t.detach().float().clamp(-1, 1) + 1) / 2 for t in (a, b.to(a.device)))
    mse = (a - b).square().mean(dim=(1, 2, 3)).clamp_min(1e-12)
    return float((10 * torch.log10(1.0 / mse)).mean())


# ------------------------------------------------------------------------------------------------ inputs
def refine_inputs(G: Generator, batch: int, seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Seeded DHR inputs: (W+ codes (B, L, D) from random z, targets (B, 3, S, S) rendered from perturbed codes
    with a pasted flat square, in-domain masks (B, 1, S, S) = 0 on the square)."""
    device, S = G.input.input.device, G.size
    gen = torch.Generator(device="cpu").manual_seed(seed)
    z = torch.randn(batch, G.style_dim, generator=gen)
    jitter = 0.3 * torch.randn(batch, G.n_latent, G.style_dim, generator=gen)
    with torch.no_grad():
        codes = G.get_latent(z.to(device)).unsqueeze(1).repeat(1, G.n_latent, 1)
        targets = G.synthesize(codes + jitter.to(device)).image.clamp(-1, 1)
    in_domain = torch.ones(batch, 1, S, S, device=device)
    for i in range(batch):
        side = S // 4
        y, x = (int(v) for v in torch.randint(0, S - side, (2,), generator=gen))
        targets[i, :, y:y + side, x:x + side] = torch.rand(3, 1, 1, generator=gen).to(device) * 2 - 1
        in_domain[i, :, y:y + side, x:x + side] = 0
    return codes, targets, in_domain


# ------------------------------------------------------------------------------------------------ parts
@dataclass
class Row:
    """One table row (``COLUMNS``); ``cell`` carries the measurement."""

    part: str
    setting: str
    batch: int
    variant: str
    cell: Cell
    speedup: str = "–"
    official: str = "–"
    quality: str = "–"
    extra: Dict[str, Any] = field(default_factory=dict)

    @property
    def images_per_s(self) -> Optional[float]:
        """Images per second, None when the cell failed."""
        return None if self.cell.seconds is None else self.batch / self.cell.seconds


def ratio(row: Row, baseline: Row, suffix: str) -> str:
    """'1.23x <suffix>' of row's images/s over baseline's, '–' when either failed."""
    if row.images_per_s is None or baseline.images_per_s is None:
        return "–"
    return f"{row.images_per_s / baseline.images_per_s:.2f}x {suffix}"


def mark_quality(row: Row, bf16: Optional[torch.Tensor], fp32: Optional[torch.Tensor]) -> None:
    """Set ``row``'s quality to the PSNR of its bf16 output against the fp32 one (kept when either is missing)."""
    if bf16 is not None and fp32 is not None:
        row.extra["psnr"] = psnr(bf16, fp32)
        row.quality = f"PSNR vs fp32 {row.extra['psnr']:.1f} dB"


def generator_rows(settings: Settings, device) -> List[Row]:
    """Forward and forward+backward of each generator config, ref vs fast ops."""
    rows = []
    for label, kwargs in settings.generators.items():
        g, z = seeded_generator(kwargs, device, settings.gen_batch)
        for mode, run in generator_passes(g, z).items():
            pair = []
            for impl in ("ref", "fast"):
                g.set_impl(impl)
                pair.append(Row(f"generator {mode}", label, settings.gen_batch, impl,
                                measure(run, device, settings.repeats)))
                release(device)
            pair[0].speedup = "1.00x (baseline)"
            pair[1].speedup = ratio(pair[1], pair[0], "vs ref")
            rows += pair
        del g, z
        release(device)
    return rows


def refine_once(G: Generator, inputs, lpips: LPIPSLoss, config: RefineConfig, device, precision: str):
    """One DHR refinement (``RefineState``) of ``inputs`` (codes, targets, in-domain masks) in ``precision``."""
    codes, targets, in_domain = inputs
    with precision_context(device, precision):
        return hybrid_refine(G, codes, targets, in_domain, lpips, config)


def decoded(G: Generator, state, codes: torch.Tensor, device, precision: str) -> Optional[torch.Tensor]:
    """The refined images (B, 3, S, S) float32 of ``state`` rendered in ``precision``; None without a state."""
    if state is None:
        return None
    with torch.no_grad(), precision_context(device, precision):
        return decode(G, state, codes).float()


def refine_rows(settings: Settings, G: Generator, lpips: LPIPSLoss, device) -> List[Row]:
    """DHR images/s for each batch size x precision, bf16 quality as PSNR against fp32 on the same inputs."""
    config = settings.refine
    warm = replace(config, weight_steps=min(config.weight_steps, 2), feature_steps=min(config.feature_steps, 2))
    inputs = refine_inputs(G, max(settings.refine_batches))
    steps = f"{config.weight_steps} weight + {config.feature_steps} feature steps"
    rows: List[Row] = []
    for batch in settings.refine_batches:
        part = tuple(t[:batch] for t in inputs)
        outputs = {}
        for precision in PRECISIONS:
            cell = measure(lambda: refine_once(G, part, lpips, config, device, precision), device,
                           warmup=lambda: refine_once(G, part, lpips, warm, device, precision))
            rows.append(Row("DHR refinement", f"{G.size} px, {steps}", batch, precision, cell))
            outputs[precision] = decoded(G, cell.result, part[0], device, precision)
            cell.result = None
            release(device)
        mark_quality(rows[-1], outputs["bf16 autocast"], outputs["fp32"])
    baseline = rows[0]
    for row in rows:
        row.speedup = "1.00x (baseline)" if row is baseline else ratio(row, baseline, "vs fp32 batch 1")
        if settings.official_scale and row.images_per_s is not None:
            row.official = f"{row.images_per_s * OFFICIAL_DHR_SECONDS:.2f}x"
    return rows


def stage2_nets(G: Generator, encoder_kwargs: dict, device, seed: int = 0):
    """Seeded e4e encoder (G's n_latent / style_dim) and align/mask net at ``default_levels(G.size)``, eval mode,
    plus a random latent_avg (1, L, D)."""
    torch.manual_seed(seed)
    encoder = build_encoder("e4e", n_styles=G.n_latent, style_dim=G.style_dim, **encoder_kwargs)
    net = AlignMaskNet(dict(G.channels), dict(encoder.feature_channels), default_levels(G.size),
                       int(encoder.config["input_size"]))
    latent_avg = torch.randn(1, G.n_latent, G.style_dim)
    return encoder.to(device).eval(), net.to(device).eval(), latent_avg.to(device)


def stage2_infer(G: Generator, encoder, net: AlignMaskNet, latent_avg: torch.Tensor, images: torch.Tensor,
                 device, precision: str) -> torch.Tensor:
    """Stage-2 inversion of ``images`` (B, 3, S, S) in ``precision``: encoder codes and taps, aligned synthesis and
    the mask blend; returns the output images float32."""
    with torch.no_grad(), precision_context(device, precision), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="resizing images")
        codes, taps = encoder.forward_features(resize_to_encoder(images, int(encoder.config["input_size"])))
        return net(G, codes + latent_avg, taps, images).output.float()


def stage2_rows(settings: Settings, G: Generator, device) -> List[Row]:
    """Stage-2 inference images/s, fp32 vs bf16 autocast, bf16 quality as PSNR against fp32."""
    encoder, net, latent_avg = stage2_nets(G, settings.encoder, device)
    images = refine_inputs(G, settings.stage2_batch, seed=1)[1]
    setting = f"{G.size} px, e4e {encoder.config['input_size']} px + levels {default_levels(G.size)}"
    rows = []
    for precision in PRECISIONS:
        cell = measure(lambda: stage2_infer(G, encoder, net, latent_avg, images, device, precision), device,
                       settings.repeats)
        rows.append(Row("stage-2 inference", setting, settings.stage2_batch, precision, cell))
        release(device)
    rows[0].speedup = "1.00x (baseline)"
    rows[1].speedup = ratio(rows[1], rows[0], "vs fp32")
    mark_quality(rows[1], rows[1].cell.result, rows[0].cell.result)
    return rows


# ------------------------------------------------------------------------------------------------ report
def format_cells(row: Row) -> List[str]:
    """The row's cells in ``COLUMNS`` order."""
    ips = row.cell.failure if row.images_per_s is None else f"{row.images_per_s:.3g}"
    memory = (row.cell.failure if row.cell.seconds is None else "n/a" if row.cell.peak_bytes is None
              else f"{row.cell.peak_bytes / 2 ** 30:.2f} GiB")
    return [row.part, row.setting, str(row.batch), row.variant, ips, row.speedup, row.official, memory, row.quality]


def format_table(rows: Sequence[Row]) -> str:
    """Markdown table of ``rows`` under ``COLUMNS``."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(format_cells(r)) + " |" for r in rows]
    return "\n".join(lines)


def describe_device(device) -> str:
    """One line naming torch, the device and the precision switches that change fp32 speed."""
    d = torch.device(device)
    if d.type == "cuda":
        name = (f"{torch.cuda.get_device_name(d)}, TF32 matmul {torch.backends.cuda.matmul.allow_tf32}, "
                f"TF32 cuDNN conv {torch.backends.cudnn.allow_tf32}")
    else:
        name = f"{d.type}, {torch.get_num_threads()} threads"
    return f"torch {torch.__version__}, {name}"


def report(rows: Sequence[Row], settings: Settings, device, seconds: float) -> str:
    """The printed report: a context line, the table and the notes."""
    goal = GOAL_FACTOR / OFFICIAL_DHR_SECONDS
    scale = "real configs" if settings.official_scale else "--quick: tiny sizes and steps, not comparable to DHR's"
    notes = [
        f"{describe_device(device)}; {scale}; total {seconds:.0f} s.",
        "",
        format_table(rows),
        "",
        "Seeded random weights (no checkpoint); DHR refines random W+ codes (no e4e encoder) with LPIPS on a "
        "random AlexNet backbone (same cost); peak memory = torch.cuda.max_memory_allocated per cell.",
        f"Official DHR: about {OFFICIAL_DHR_SECONDS:g} s per image at batch 1 on an RTX 3090 "
        f"({1 / OFFICIAL_DHR_SECONDS:.3f} images/s); goal on a GPU: {GOAL_FACTOR}x that ({goal:.2f} images/s) at the "
        f"same quality (bf16 PSNR vs fp32 above).",
    ]
    return "\n".join(notes)


def run_all(settings: Settings, device) -> List[Row]:
    """Every row: generators, then DHR and stage 2 on one seeded generator with one LPIPS."""
    rows = generator_rows(settings, device)
    print("done: generator", file=sys.stderr, flush=True)
    G, _ = seeded_generator(settings.refine_generator, device, 1)
    G.eval().requires_grad_(False)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="LPIPSLoss: no")
        lpips = LPIPSLoss(allow_random_backbone=True).to(device)
    rows += refine_rows(settings, G, lpips, device)
    print("done: DHR", file=sys.stderr, flush=True)
    rows += stage2_rows(settings, G, device)
    print("done: stage 2", file=sys.stderr, flush=True)
    return rows


def parse_args(argv=None) -> argparse.Namespace:
    """Command-line flags."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--quick", action="store_true", help="tiny sizes and 2 DHR steps (CPU test run)")
    parser.add_argument("--gen-batch", type=int, default=4, help="generator batch (not with --quick)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per generator / stage-2 cell (best)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--out", type=Path, default=None, help="also write the report to this Markdown file")
    return parser.parse_args(argv)


def main(argv=None) -> List[Row]:
    """CLI entry: measure, print the report (and write ``--out``); returns the rows."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    settings = quick_settings() if args.quick else full_settings(args.gen_batch, args.repeats)
    start = time.perf_counter()
    rows = run_all(settings, device)
    text = report(rows, settings, device, time.perf_counter() - start)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return rows


if __name__ == "__main__":
    main()
