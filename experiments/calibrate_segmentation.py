"""Choose DHR's per-class error thresholds for a new domain without touching the test set.

The official thresholds (face 0.7, facial parts 0.8, everything else 0.6) belong to a 5-layer VGG LPIPS error
map of 1024 px FFHQ faces. Another backbone, resolution or domain changes the error scale, so this script keeps
the official *ratios* and searches one scale factor: on training images with generic pasted patches
(``datamodules.ood_patches``, never the evaluation corruptions) it computes the coarse-projection error maps,
SLIC superpixels and parser classes once, with the DSS settings of ``+exp=dhr`` (``SYNTHFACES_DSS``: the shared
random-Alex net, loss at the image size, ``upsampled_sum`` scoring), then reports the mask IoU / precision / recall
of the error-superpixel mask (1 - in-domain, parser OOD classes left out) against the patch masks for every scale,
and the best one.

    python experiments/calibrate_segmentation.py --n 64            # SynthFaces, shipped weights
Prints a Markdown table; the chosen thresholds go into the experiment config (model.segmentation.thresholds).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from datamodules.ood_patches import paste_random_patches  # noqa: E402
from datamodules.synthfaces_datamodule import SynthFacesDataModule  # noqa: E402
from lightning_modules.metrics import mask_metrics  # noqa: E402
from lightning_modules.stage3_module import RefineModule  # noqa: E402
from networks.domain_segmentation import region_error, region_score_mask, superpixels, upsampled_error  # noqa: E402

WEIGHTS = ROOT / "experiments" / "weights" / "synthfaces"
OFFICIAL = {"skin": 0.7, **{c: 0.8 for c in ("eye", "brow", "nose", "lips", "mouth", "ear")}}
OFFICIAL_DEFAULT = 0.6
# the DSS departures of experiments/configs/exp/dhr.yaml (64 px SynthFaces); the reasons are given there
SYNTHFACES_DSS = {"coarse": {"resolution": None}, "lpips": None, "error_scoring": "upsampled_sum"}


def main(argv=None) -> dict:
    """CLI entry; returns {"rows": [(scale, iou, precision, recall)], "best": scale}."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(ROOT / "data" / "synthfaces"))
    parser.add_argument("--encoder", default=str(WEIGHTS / "encoder.pt"))
    parser.add_argument("--parser", default=str(WEIGHTS / "face_parser.pt"))
    parser.add_argument("--n", type=int, default=64, help="training images (with pasted patches)")
    parser.add_argument("--steps", type=int, default=40, help="coarse W projection steps (official 40)")
    parser.add_argument("--n-segments", type=int, default=100)
    parser.add_argument("--scales", default="0.02,0.04,0.06,0.08,0.1,0.12,0.15,0.2")
    args = parser.parse_args(argv)

    module = RefineModule(args.encoder, method="dhr", lpips={"allow_random_backbone": True},
                          segmentation={**SYNTHFACES_DSS, "parser": args.parser, "thresholds": OFFICIAL,
                                        "coarse": {**SYNTHFACES_DSS["coarse"], "steps": args.steps}})
    dm = SynthFacesDataModule.from_existing(args.data, module.generator.size, batch_size=args.n, num_workers=0,
                                            flip=False)
    dm.prepare_data()
    dm.setup("fit")
    torch.manual_seed(0)  # the shuffled training order
    images = next(iter(dm.train_dataloader()))[: args.n]
    images, truth = paste_random_patches(images, p=1.0, generator=torch.Generator().manual_seed(0))
    seg = module.segmentation
    maps = module.coarse_error_maps(images)
    with torch.no_grad():
        error = upsampled_error(maps, images.shape[-2:])
        labels = superpixels(images, n_segments=args.n_segments, slic_input=seg["slic_input"])
        probs = torch.softmax(module.parser(images), 1)
    scores = region_error(maps, labels, seg["error_scoring"])
    rows = []
    for scale in (float(s) for s in args.scales.split(",")):
        thresholds = {module.class_ids[k]: v * scale / 0.6 for k, v in OFFICIAL.items()}
        in_domain = region_score_mask(scores, labels, probs, thresholds, OFFICIAL_DEFAULT * scale / 0.6)
        m = mask_metrics(1 - in_domain, truth, thresholds=(0.5,))
        rows.append((scale, float(m["iou@0.5"].mean()), float(m["precision@0.5"].mean()), float(m["recall@0.5"].mean())))
    best = max(rows, key=lambda r: r[1])[0]
    print(f"Error map (lpips {module.lpips.metric_name}): median {float(error.median()):.4f}, "
          f"inside patches {float((error * truth).sum() / truth.sum()):.4f}, "
          f"outside {float((error * (1 - truth)).sum() / (1 - truth).sum()):.4f}\n")
    print("| default threshold (others x 7/6, parts x 8/6) | IoU | precision | recall |\n|---|---|---|---|")
    for scale, iou, prec, rec in rows:
        print(f"| {scale:g}{' (best)' if scale == best else ''} | {iou:.3f} | {prec:.3f} | {rec:.3f} |")
    return {"rows": rows, "best": best}


if __name__ == "__main__":
    main()
