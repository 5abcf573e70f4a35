"""Compute GANSpace components (PCA of the mapping network's outputs) for a generator file.

Writes ``{"mean" (1, D), "comp" (K, 1, D), "std" (K,)}`` in the layout of e4e/HFGI's ``ffhq_pca.pt``
(readable with ``networks.editing.load_ganspace``) and prints the leading explained-variance ratios.

Usage: ``python experiments/compute_ganspace.py GENERATOR.pt [--n 10000] [--components 80] [--out pca.pt]``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from networks.checkpoints import load_generator  # noqa: E402
from networks.editing import compute_ganspace_pca  # noqa: E402


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("generator", type=Path, help="generator file (rosinality layout, e.g. generator.pt)")
    parser.add_argument("--n", type=int, default=10000, help="number of w samples")
    parser.add_argument("--components", type=int, default=None, help="K (default min(80, style_dim))")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None,
                        help="output .pt (default: <generator dir>/directions/ganspace_pca.pt)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    G, _ = load_generator(args.generator)
    try:
        pca = compute_ganspace_pca(G, n_samples=args.n, n_components=args.components, seed=args.seed)
    except ValueError as err:
        parser.error(str(err))
    out = pca.save(args.out or args.generator.resolve().parent / "directions" / "ganspace_pca.pt")
    ratio = pca.var_ratio
    print(f"{pca.n_components} components -> {out}")
    print("explained variance ratio of the first components: " + ", ".join(f"{r:.3f}" for r in ratio[:8].tolist()))
    return out


if __name__ == "__main__":
    main()
