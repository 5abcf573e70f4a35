"""Benchmark: DHR hybrid refinement of a batch (per-sample weights) vs one image at a time.

Same images, same in-domain masks, same steps and learning rates; the batched run gives every image its own
tuned weights and feature, so its per-image final losses must equal the sequential ones. Prints a Markdown
table (images/s, speed-up, mean final loss, largest per-image loss difference) measured in one run.

    python experiments/benchmark_refine.py                       # 8 SynthFaces test images, official steps, CPU
    python experiments/benchmark_refine.py --device cuda --batch 8
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from datamodules.synthfaces_datamodule import SynthFacesDataModule, SynthFacesEvalDataset  # noqa: E402
from lightning_modules.perceptual import LPIPSLoss  # noqa: E402
from networks.encoder_checkpoints import load_e4e_checkpoint  # noqa: E402
from networks.encoders import resize_to_encoder  # noqa: E402
from networks.refine.hybrid import RefineConfig, hybrid_refine  # noqa: E402
from experiments.benchmark_generator import sync  # noqa: E402

WEIGHTS = ROOT / "experiments" / "weights" / "synthfaces"


def main(argv=None) -> dict:
    """CLI entry; returns {"batched": (seconds, losses), "sequential": (seconds, losses)}."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(ROOT / "data" / "synthfaces"))
    parser.add_argument("--encoder", default=str(WEIGHTS / "encoder.pt"))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--weight-steps", type=int, default=50)
    parser.add_argument("--feature-steps", type=int, default=100)
    parser.add_argument("--feature-resolution", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)

    loaded = load_e4e_checkpoint(args.encoder)
    G, encoder = loaded.generator.to(device).eval(), loaded.encoder.to(device).eval()
    SynthFacesDataModule.from_existing(args.data, G.size).prepare_data()  # checks the dataset is complete
    data = SynthFacesEvalDataset(args.data, G.size, "ood")
    items = [data[i] for i in range(args.batch)]
    x = torch.stack([it["image"] for it in items]).to(device)
    in_domain = 1 - torch.stack([it["ood_mask"] for it in items]).to(device)  # the exact masks: timing only
    with torch.no_grad():
        codes = encoder(resize_to_encoder(x, int(encoder.config["input_size"]))) + loaded.latent_avg.to(device)
    lpips = LPIPSLoss(allow_random_backbone=True).to(device)
    config = RefineConfig(weight_steps=args.weight_steps, feature_steps=args.feature_steps,
                          feature_resolution=args.feature_resolution)
    hybrid_refine(G, codes[:1], x[:1], in_domain[:1], lpips, RefineConfig(weight_steps=2, feature_steps=2,
                                                                           feature_resolution=args.feature_resolution))
    results = {}
    sync(device)
    start = time.perf_counter()
    state = hybrid_refine(G, codes, x, in_domain, lpips, config)
    sync(device)
    results["batched"] = (time.perf_counter() - start, state.losses[-1].cpu())
    start, losses = time.perf_counter(), []
    for i in range(args.batch):
        single = hybrid_refine(G, codes[i:i + 1], x[i:i + 1], in_domain[i:i + 1], lpips, config)
        losses.append(single.losses[-1, 0].cpu())
    sync(device)
    results["sequential"] = (time.perf_counter() - start, torch.stack(losses))

    seq_s, seq_loss = results["sequential"]
    bat_s, bat_loss = results["batched"]
    diff = float((bat_loss - seq_loss).abs().max())
    print(f"DHR refinement, {args.batch} SynthFaces images at {G.size} px, {args.weight_steps} weight + "
          f"{args.feature_steps} feature steps, {device.type} ({torch.get_num_threads()} threads)\n")
    print("| mode | seconds | images/s | speed-up | mean final loss | max per-image loss difference |")
    print("|---|---|---|---|---|---|")
    print(f"| one image at a time | {seq_s:.1f} | {args.batch / seq_s:.3f} | 1.00x | {float(seq_loss.mean()):.5f} | – |")
    print(f"| batch of {args.batch} | {bat_s:.1f} | {args.batch / bat_s:.3f} | {seq_s / bat_s:.2f}x | "
          f"{float(bat_loss.mean()):.5f} | {diff:.2e} |")
    return results


if __name__ == "__main__":
    main()
