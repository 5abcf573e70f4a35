"""Command line: write a SynthFaces dataset, or a preview grid.

    python -m datamodules.synthfaces --out data/synthfaces --n 10000 --size 64 --seed 0 --n-eval 500
    python -m datamodules.synthfaces --preview grid.png --size 128
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from .corrupt import OOD_FAMILIES
from .render import SIZES
from .writer import DEFAULT_SEVERITIES, write_dataset


def _floats(text: str) -> List[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from exc


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``python -m datamodules.synthfaces``."""
    p = argparse.ArgumentParser(
        prog="python -m datamodules.synthfaces",
        description="Render the SynthFaces dataset (FFHQ-like folders: images/, parts/, labels.json, "
                    "splits.json, ood/ with corrupted test twins and exact masks). Re-running with the same "
                    "arguments into a complete directory does nothing; a partial one is completed.")
    p.add_argument("--out", help="dataset directory to create or complete (e.g. data/synthfaces)")
    p.add_argument("--n", type=int, default=10000, help="number of images (default 10000)")
    p.add_argument("--size", type=int, default=64, choices=SIZES, help="image size in pixels (default 64)")
    p.add_argument("--seed", type=int, default=0, help="dataset seed (default 0)")
    p.add_argument("--n-eval", type=int, default=500,
                   help="test images (the last indices), each with one OOD-corrupted twin (default 500)")
    p.add_argument("--n-val", type=int, default=None,
                   help="validation images before the test split (default: --n-eval)")
    p.add_argument("--families", default=",".join(OOD_FAMILIES),
                   help=f"comma-separated OOD families, cycled over test images (default: {','.join(OOD_FAMILIES)})")
    p.add_argument("--severities", type=_floats, default=list(DEFAULT_SEVERITIES),
                   help="comma-separated severities in (0, 1], cycled per family (default 0.25,0.5,0.75,1)")
    p.add_argument("--workers", type=int, default=None, help="PNG encoding threads (default min(4, CPUs))")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads for rendering (default: torch's)")
    p.add_argument("--preview", metavar="PNG", help="only write a preview grid (clean, parts, smile sweep, "
                                                    "every OOD family with masks) to this PNG and exit")
    p.add_argument("--verify", action="store_true",
                   help="check every file even if the directory is marked complete; rewrite missing ones")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point; returns the process exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.preview:
        from .preview import save_preview
        print(save_preview(args.preview, seed=args.seed, size=args.size))
        return 0
    if not args.out:
        parser.error("--out is required (or give --preview PNG)")
    try:
        write_dataset(args.out, n=args.n, size=args.size, seed=args.seed, n_eval=args.n_eval, n_val=args.n_val,
                      families=[f.strip() for f in args.families.split(",") if f.strip()],
                      severities=args.severities, workers=args.workers, verify=args.verify,
                      log=(lambda s: None) if args.quiet else (lambda s: print(s, flush=True)))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
