"""Stage-one baselines on held-out clean SynthFaces: the trained encoder vs the optimisation embedding.

    python experiments/evaluate_stage1.py --encoder outputs/e4e/<run>/encoder.pt
    python experiments/evaluate_stage1.py --encoder E.pt --n 500 --projection-n 32 --projection-steps 300 \
        --direction experiments/weights/synthfaces/directions/smile.pt --out report.md

Prints a Markdown table (PSNR / SSIM / MSE / LPIPS as labelled, images/s) and the smile-edit success
of each method's codes (SynthFaces attribute classifier: share of images whose smile rises by >= 0.1
for +strength), and writes per-image rows as CSV next to ``--out`` when given. The generator is the one
stored in the encoder file (its ``decoder.*`` keys).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from datamodules.synthfaces_datamodule import SynthFacesDataModule, SynthFacesEvalDataset  # noqa: E402
from lightning_modules.edit_metrics import attribute_change  # noqa: E402
from lightning_modules.metrics import MetricTable, image_metrics  # noqa: E402
from lightning_modules.perceptual import LPIPSLoss  # noqa: E402
from networks.refine.projection import project  # noqa: E402
from networks.editing import apply_interfacegan, load_direction  # noqa: E402
from networks.encoder_checkpoints import load_e4e_checkpoint  # noqa: E402
from networks.encoders import resize_to_encoder  # noqa: E402
from networks.synthfaces_nets import load_attribute_classifier  # noqa: E402

WEIGHTS = ROOT / "experiments" / "weights" / "synthfaces"


def load_clean_images(root: Path, resolution: int, n: int, split: str = "test"):
    """First ``n`` clean images of ``split`` ("test", or "val": the validation images of ``splits.json``, for choices
    that must not look at the test images) as (n, 3, R, R) in [-1, 1], and their names."""
    if split == "val":
        data = SynthFacesDataModule.from_existing(root, resolution)
        data.setup_fit()
        dataset = data.val_set
    else:
        dataset = SynthFacesEvalDataset(root, resolution, variant="clean")
    items = [dataset[i] for i in range(min(n, len(dataset)))]
    return torch.stack([it["image"] for it in items]), [it["name"] for it in items]


def encode_all(loaded, images: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """W+ codes (N, L, D) of the encoder (latent_avg added), their reconstructions (N, 3, S, S) with the
    stored noise, and the images/s of encode + decode."""
    codes, recons, start = [], [], time.perf_counter()
    with torch.no_grad():
        for chunk in images.split(batch):
            x = resize_to_encoder(chunk, loaded.encoder.config["input_size"])
            c = loaded.encoder(x) + loaded.latent_avg.unsqueeze(0)
            codes.append(c)
            recons.append(loaded.generator([c], input_is_latent=True)[0])
    return torch.cat(codes), torch.cat(recons), images.shape[0] / (time.perf_counter() - start)


def decode(generator, codes: torch.Tensor, batch: int, noises=None) -> torch.Tensor:
    """Images (N, 3, S, S) of W+ codes with the stored noise, or with per-image ``noises`` (each (N, 1, r, r))."""
    out = []
    with torch.no_grad():
        for lo in range(0, codes.shape[0], batch):
            noise = None if noises is None else [n[lo:lo + batch] for n in noises]
            out.append(generator([codes[lo:lo + batch]], input_is_latent=True, noise=noise)[0])
    return torch.cat(out)


def main(argv=None) -> dict:
    """CLI entry; returns {"rows": {method: means}, "edit": {method: success stats}}."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--encoder", required=True, help="encoder.pt (e4e layout) from +exp=e4e / +exp=psp")
    parser.add_argument("--data", default=str(ROOT / "data" / "synthfaces"), help="SynthFaces dataset directory")
    parser.add_argument("--split", choices=("test", "val"), default="test",
                        help="clean images to score: the test split, or the validation split (for model choices)")
    parser.add_argument("--n", type=int, default=500, help="test images for the encoder")
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--projection-n", type=int, default=32, help="test images for the optimisation (0 = skip)")
    parser.add_argument("--projection-steps", type=int, default=300)
    parser.add_argument("--projection-space", default="w+", choices=("w", "w+"))
    parser.add_argument("--lpips-weights", default=None, help="torchvision AlexNet state dict (else lpips-random)")
    parser.add_argument("--classifier", default=str(WEIGHTS / "attribute_classifier.pt"))
    parser.add_argument("--direction", default=str(WEIGHTS / "directions" / "smile.pt"),
                        help="InterFaceGAN smile direction (1, D); '' skips the edit")
    parser.add_argument("--strength", type=float, default=3.0)
    parser.add_argument("--out", default=None, help="write the Markdown report here (+ .csv with per-image rows)")
    args = parser.parse_args(argv)

    loaded = load_e4e_checkpoint(args.encoder)
    loaded.encoder.eval()
    generator = loaded.generator.eval().requires_grad_(False)
    lpips = LPIPSLoss(backbone_weights=args.lpips_weights, allow_random_backbone=args.lpips_weights is None)
    images, names = load_clean_images(Path(args.data), generator.size, args.n, args.split)

    results, tables, codes_of = {}, {}, {}
    codes, recon, speed = encode_all(loaded, images, args.batch)
    # (name, targets, image names, codes, reconstructions, noise maps or None = stored, images/s)
    methods = [(loaded.opts.get("encoder_type", "encoder"), images, names, codes, recon, None, speed)]
    if args.projection_n > 0:
        subset = images[:args.projection_n]
        start = time.perf_counter()
        result = project(generator, subset, perceptual=lpips, latent_avg=loaded.latent_avg[0],
                         space=args.projection_space, steps=args.projection_steps)
        p_speed = subset.shape[0] / (time.perf_counter() - start)
        noises = [n.detach() for n in result.noises]  # the projector optimises noise: its codes go with it
        methods.append((f"optimisation ({args.projection_space}, {args.projection_steps} steps)", subset,
                        names[:args.projection_n], result.codes.detach(), result.images.detach(), noises, p_speed))

    for method, target, method_names, method_codes, recon, noises, method_speed in methods:
        table = MetricTable()
        for lo in range(0, target.shape[0], args.batch):
            t, r = target[lo:lo + args.batch], recon[lo:lo + args.batch]
            with torch.no_grad():
                metrics = image_metrics(r, t)
                metrics[lpips.metric_name] = lpips(r, t)
            table.add(method_names[lo:lo + args.batch], metrics)
        tables[method], codes_of[method] = table, (method_codes, recon, noises)
        results[method] = dict(table.mean(), images_per_s=method_speed, n=target.shape[0])

    edits = {}
    if args.direction:
        classifier = load_attribute_classifier(args.classifier)
        direction = load_direction(args.direction)
        for method, (method_codes, recon, noises) in codes_of.items():
            edited = decode(generator, apply_interfacegan(method_codes, direction, args.strength), args.batch, noises)
            score = attribute_change(classifier, recon, edited, "smile", direction=args.strength)
            edits[method] = {"success": float(score["success"].mean()), "mean_change": float(score["change"].mean())}

    lines = [f"Stage one on {images.shape[0]} held-out clean SynthFaces {args.split} images ({args.encoder}; "
             f"torch threads {torch.get_num_threads()})", "",
             f"| method | n | PSNR dB | SSIM | MSE | {lpips.metric_name} | images/s | smile edit success "
             f"(+{args.strength:g}) | mean smile change |", "|---|---|---|---|---|---|---|---|---|"]
    for method, row in results.items():
        edit = edits.get(method, {})
        lines.append(f"| {method} | {row['n']} | {row['psnr']:.2f} | {row['ssim']:.4f} | {row['mse']:.5f} | "
                     f"{row[lpips.metric_name]:.4f} | {row['images_per_s']:.2f} | "
                     f"{edit.get('success', float('nan')):.2f} | {edit.get('mean_change', float('nan')):+.3f} |")
    report = "\n".join(lines)
    print(report)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(report + "\n")
        for method, table in tables.items():
            safe = "".join(ch if ch.isalnum() else "_" for ch in method).strip("_")
            table.to_csv(out.with_name(f"{out.stem}_{safe}.csv"))
        out.with_suffix(".json").write_text(json.dumps({"rows": results, "edit": edits}, indent=2))
    return {"rows": results, "edit": edits}


if __name__ == "__main__":
    main()
