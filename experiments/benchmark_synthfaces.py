"""SynthFaces speed: renderer images/s per size, OOD corruption images/s per family, dataset writing.

The machine may be shared, so every measurement is repeated and the best run is reported next to
the median. The renderer target is >= 1,000 images/s at 64 px with batch 256 and 2 CPU threads.

Usage: ``python experiments/benchmark_synthfaces.py [--threads 2] [--batch 256] [--repeats 5]
[--sizes 32 64 128 256] [--write 1000] [--out table.md]``.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, List, Tuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from datamodules.synthfaces import OOD_FAMILIES, corrupt_batch, render_batch  # noqa: E402
from datamodules.synthfaces.writer import write_dataset  # noqa: E402

TARGET_64 = 1000.0


def timings(fn: Callable[[], object], repeats: int) -> List[float]:
    """Wall times in seconds of ``repeats`` calls of ``fn`` after one warm-up call."""
    fn()
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def row(name: str, n: int, times: List[float]) -> Tuple[str, int, float, float, float]:
    """(name, images per call, best s, best images/s, median images/s)."""
    return name, n, min(times), n / min(times), n / statistics.median(times)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--batch", type=int, default=256, help="images per call at 64 px (scaled by pixels elsewhere)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 64, 128, 256])
    parser.add_argument("--no-corrupt", action="store_true", help="skip the OOD corruption rows")
    parser.add_argument("--write", type=int, default=0, metavar="N",
                        help="also time writing an N-image 64 px dataset (PNG encoding included) to a temp dir")
    parser.add_argument("--out", type=Path, default=None, help="also write the table to this Markdown file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    rows = []
    for size in args.sizes:
        n = max(8, args.batch * 64 * 64 // (size * size))
        rows.append(row(f"render {size} px", n, timings(lambda: render_batch(0, n, size), args.repeats)))
        print(f"done: render {size} px", file=sys.stderr, flush=True)
    if not args.no_corrupt:
        clean = render_batch(1, args.batch, 64)
        for fam in OOD_FAMILIES:
            times = timings(lambda: corrupt_batch(clean["images"], clean["parts"], fam, 0.75, 0), args.repeats)
            rows.append(row(f"corrupt {fam} 64 px", args.batch, times))
        print("done: corruptions", file=sys.stderr, flush=True)
    if args.write:
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            write_dataset(Path(tmp) / "ds", n=args.write, size=64, n_eval=max(1, args.write // 20),
                          log=lambda s: None)
            rows.append(row(f"write dataset 64 px (PNG, {args.write} + OOD twins)", args.write,
                            [time.perf_counter() - start]))

    head = f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, best of {args.repeats} after a warm-up"
    lines = [head, "", "| what | images per call | best s | best images/s | median images/s |", "|---|---|---|---|---|"]
    lines += [f"| {name} | {n} | {t:.3f} | {ips:,.0f} | {med:,.0f} |" for name, n, t, ips, med in rows]
    r64 = [r for r in rows if r[0] == "render 64 px"]
    if r64:
        verdict = "met" if r64[0][3] >= TARGET_64 else "NOT met"
        lines += ["", f"target >= {TARGET_64:,.0f} images/s at 64 px: {verdict} (best {r64[0][3]:,.0f})"]
    table = "\n".join(lines)
    print(table)
    if args.out:
        args.out.write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
