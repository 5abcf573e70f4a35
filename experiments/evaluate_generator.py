"""Quality of a SynthFaces generator without downloads: FID with the shipped SynthFaces features.

Samples ``--n`` images (seeded z, stored noise, no truncation) from a generator file, computes the FID
against the held-out SynthFaces test split, prints it next to the blurred-copy baseline (test vs a
Gaussian-blurred copy of itself) and the real-vs-real floor (test vs val), and writes a sample grid.

Usage: ``python experiments/evaluate_generator.py GENERATOR.pt [--n 500] [--grid samples.png]``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from callbacks.sample_grid import save_grid  # noqa: E402
from datamodules.synthfaces_labelled import SynthFacesLabelledDataModule  # noqa: E402
from lightning_modules.fid import DEFAULT_WEIGHTS, fid_score, gaussian_blur  # noqa: E402
from networks.checkpoints import load_generator  # noqa: E402
from networks.synthfaces_nets import SynthFacesFeatures  # noqa: E402


@torch.no_grad()
def sample(generator, n: int, seed: int = 0, batch: int = 64) -> torch.Tensor:
    """n images (n, 3, size, size) in [-1, 1] from seeded z with the stored noise."""
    z = torch.randn(n, generator.style_dim, generator=torch.Generator().manual_seed(seed))
    return torch.cat([generator([z[i:i + batch]])[0].clamp(-1, 1) for i in range(0, n, batch)])


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("generator", type=Path)
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--data-root", default="data/synthfaces")
    parser.add_argument("--features", default=str(DEFAULT_WEIGHTS), help="attribute_classifier.pt")
    parser.add_argument("--grid", type=Path, default=None, help="write an 8x4 sample grid PNG here")
    args = parser.parse_args(argv)

    g, _ = load_generator(args.generator)
    feats = SynthFacesFeatures.from_file(args.features)
    dm = SynthFacesLabelledDataModule.from_existing(args.data_root, resolution=g.size, with_parts=False)
    test = dm.dataset("test").images.float() / 127.5 - 1.0
    val = dm.dataset("val").images.float() / 127.5 - 1.0
    fake = sample(g, args.n)
    results = {
        f"generator ({args.n} samples) vs test": fid_score(test, fake, feats),
        "blurred test (sigma 1) vs test": fid_score(test, gaussian_blur(test, 1.0), feats),
        "val vs test (real-vs-real floor)": fid_score(test, val, feats),
    }
    print("| sets | FID (SynthFaces features) |\n|---|---|")
    for name, value in results.items():
        print(f"| {name} | {value:.2f} |")
    if args.grid:
        save_grid(fake[:32], args.grid, nrow=8)
        print(f"sample grid: {args.grid}")
    return results


if __name__ == "__main__":
    main()
