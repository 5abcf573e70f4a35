"""Choose DHR's refinement schedule for a new domain on training images, never on the test corruptions.

The official schedule (weights 50 steps at 1.5e-3, f* 100 steps at 9e-2) belongs to 1024 px FFHQ faces and a
well-trained generator. On another domain the in-domain weight modulation may need another budget to reach PTI's
in-domain fidelity. This script measures candidate schedules where the truth is known: training images with generic
pasted patches (``datamodules.ood_patches``: random ellipses / rectangles of colour noise, no evaluation family),
refined by DHR with the *patch masks* as the segmentation, so that the schedule is judged alone (not the DSS). For
each schedule it reports PSNR overall / inside / outside the patches and the smile edit's success on the same
images, next to PTI and feature-only, and picks:

    the highest PSNR among the schedules whose edit success is at least ``--edit-ratio`` (0.9) x PTI's.

    python experiments/calibrate_refine.py --n 16          # SynthFaces, shipped weights
    python experiments/calibrate_refine.py --n 16 --schedules 50:1.5e-3:100,350:3e-4:350
A schedule is ``weight_steps:weight_lr:feature_steps`` (f* keeps DHR's feature_lr and feature_resolution). Prints
a Markdown table and returns the rows; the chosen schedule goes into the experiment config (``model.refine``).
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from datamodules.ood_patches import paste_random_patches  # noqa: E402
from datamodules.synthfaces_datamodule import SynthFacesDataModule  # noqa: E402
from lightning_modules.edit_metrics import edit_scores, edited_codes, load_edit_scorer  # noqa: E402
from lightning_modules.metrics import image_metrics  # noqa: E402
from lightning_modules.perceptual import LPIPSLoss  # noqa: E402
from networks.encoder_checkpoints import load_e4e_checkpoint  # noqa: E402
from networks.encoders import resize_to_encoder  # noqa: E402
from networks.refine.hybrid import RefineConfig, decode, hybrid_refine  # noqa: E402
from networks.refine.methods import PTI, FeatureOnly  # noqa: E402

WEIGHTS = ROOT / "experiments" / "weights" / "synthfaces"
OFFICIAL = "50:1.5e-3:100"
DEFAULT_SCHEDULES = "50:1.5e-3:100,100:1.5e-3:100,200:1e-3:200,350:3e-4:350,350:1e-3:350"


def parse_schedule(text: str) -> Dict[str, float]:
    """``"weight_steps:weight_lr:feature_steps"`` -> {"weight_steps", "weight_lr", "feature_steps"}; ValueError
    naming ``--schedules`` otherwise."""
    parts = text.split(":")
    try:
        if len(parts) != 3:
            raise ValueError
        steps, lr, feature_steps = int(parts[0]), float(parts[1]), int(parts[2])
        if steps < 0 or feature_steps < 0 or lr <= 0:
            raise ValueError
    except ValueError:
        raise ValueError(f"--schedules: {text!r} is not weight_steps:weight_lr:feature_steps with steps >= 0 and "
                         f"lr > 0 (e.g. 50:1.5e-3:100)") from None
    return {"weight_steps": steps, "weight_lr": lr, "feature_steps": feature_steps}


def choose(rows: List[dict], edit_ratio: float) -> Optional[dict]:
    """The row of the highest PSNR among the DHR rows whose edit success is >= edit_ratio x PTI's; None when no
    schedule edits well enough (then keep the official one)."""
    pti = next(r for r in rows if r["method"] == "pti")
    ok = [r for r in rows if r["method"] == "dhr" and r["edit_success"] >= edit_ratio * pti["edit_success"]]
    return max(ok, key=lambda r: r["psnr"]) if ok else None


def _row(method, schedule, images, truth, output, render, codes, scorer, seconds) -> dict:
    m = image_metrics(output, images, truth)
    row = {"method": method, "schedule": schedule, "psnr": float(m["psnr"].mean()),
           "psnr_in_ood": float(m["psnr_in"].nanmean()), "psnr_out_ood": float(m["psnr_out"].nanmean()),
           "seconds_per_image": seconds / images.shape[0]}
    if scorer is not None:
        with torch.no_grad():
            edited = render(edited_codes(scorer, codes))
        row["edit_success"] = float(edit_scores(scorer, output, edited, images, truth)["edit_success"].float().mean())
    return row


def main(argv=None) -> dict:
    """CLI entry; returns {"rows": [...], "best": row}."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(ROOT / "data" / "synthfaces"))
    parser.add_argument("--encoder", default=str(WEIGHTS / "encoder.pt"))
    parser.add_argument("--direction", default=str(WEIGHTS / "directions" / "smile.pt"))
    parser.add_argument("--classifier", default=str(WEIGHTS / "attribute_classifier.pt"))
    parser.add_argument("--n", type=int, default=16, help="training images (with pasted patches)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--feature-resolution", type=int, default=16, help="f* side (the +exp=dhr value)")
    parser.add_argument("--schedules", default=DEFAULT_SCHEDULES)
    parser.add_argument("--edit-ratio", type=float, default=0.9)
    parser.add_argument("--pti-steps", type=int, default=350, help="PTI's weight steps (official 350 at 3e-4)")
    parser.add_argument("--feature-only-steps", type=int, default=100, help="feature-only f* steps (DHR's 100)")
    args = parser.parse_args(argv)
    schedules = [s.strip() for s in args.schedules.split(",") if s.strip()]
    parsed = {s: parse_schedule(s) for s in schedules}

    stage1 = load_e4e_checkpoint(Path(args.encoder).expanduser())
    generator = stage1.generator.eval().requires_grad_(False)
    encoder = stage1.encoder.eval().requires_grad_(False)
    lpips = LPIPSLoss(allow_random_backbone=True)  # the +exp=dhr refinement net (model.lpips)
    scorer = load_edit_scorer({"direction": args.direction, "classifier": args.classifier, "strength": 3.0,
                               "attribute": "smile"}, generator.style_dim)
    dm = SynthFacesDataModule.from_existing(args.data, generator.size, batch_size=args.n, num_workers=0, flip=False)
    dm.prepare_data()
    dm.setup("fit")
    torch.manual_seed(0)  # the shuffled training order (as calibrate_segmentation.py)
    images = next(iter(dm.train_dataloader()))["image"][: args.n]
    images, truth = paste_random_patches(images, p=1.0, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        deltas, _ = encoder.forward_features(resize_to_encoder(images, int(encoder.config["input_size"])))
        codes = deltas + stage1.latent_avg.float().unsqueeze(0)

    base = RefineConfig(feature_resolution=args.feature_resolution)
    # (method, schedule, RefineConfig, in-domain mask from the patch masks): DHR in domain outside the patches,
    # PTI everywhere, feature-only nowhere
    runs = {f"dhr {s}": ("dhr", s, replace(base, **parsed[s]), lambda t: 1 - t) for s in schedules}
    runs["pti"] = ("pti", f"{args.pti_steps}:3e-4:0", PTI.refine_config(base, steps=args.pti_steps), torch.ones_like)
    runs["feature_only"] = ("feature_only", f"0:-:{args.feature_only_steps}",
                            FeatureOnly.refine_config(base, steps=args.feature_only_steps), torch.zeros_like)
    rows = []
    for label, (method, schedule, cfg, in_domain_of) in runs.items():
        outputs, states, start = [], [], time.perf_counter()
        for i in range(0, images.shape[0], args.batch):
            x, t, c = images[i:i + args.batch], truth[i:i + args.batch], codes[i:i + args.batch]
            state = hybrid_refine(generator, c, x, in_domain_of(t), lpips, cfg)
            with torch.no_grad():
                outputs.append(decode(generator, state, c))
            states.append((state, c))
        seconds = time.perf_counter() - start
        output = torch.cat(outputs)

        def render(edited, states=states):
            parts, j = [], 0
            for state, c in states:
                parts.append(decode(generator, state, edited[j:j + c.shape[0]]))
                j += c.shape[0]
            return torch.cat(parts)

        rows.append(_row(method, schedule, images, truth, output, render, codes, scorer, seconds))
        print(f"{label}: PSNR {rows[-1]['psnr']:.2f}, edit success {rows[-1].get('edit_success', float('nan')):.2f} "
              f"({rows[-1]['seconds_per_image']:.1f} s/image)", flush=True)
    best = choose(rows, args.edit_ratio)
    verdict = (f"best: DHR {best['schedule']} (the highest PSNR with edit success >= {args.edit_ratio} x PTI's)"
               if best else f"no schedule reaches edit success >= {args.edit_ratio} x PTI's: keep the official "
                            f"{OFFICIAL}")
    print(f"\n{args.n} training images with generic patches, the patch masks as DHR's segmentation; {verdict}\n")
    print("| method | weight steps:lr:feature steps | PSNR | PSNR in patches | PSNR outside | smile edit success "
          "| s / image |\n|---|---|---|---|---|---|---|")
    for r in rows:
        mark = " (chosen)" if r is best else ""
        print(f"| {r['method']}{mark} | {r['schedule']} | {r['psnr']:.2f} | {r['psnr_in_ood']:.2f} | "
              f"{r['psnr_out_ood']:.2f} | {r.get('edit_success', float('nan')):.2f} | {r['seconds_per_image']:.1f} |")
    return {"rows": rows, "best": best}


if __name__ == "__main__":
    main()
