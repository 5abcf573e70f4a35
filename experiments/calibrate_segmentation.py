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
    python experiments/calibrate_segmentation.py --n 64 --lpips synthfaces   # error maps from lpips-synthfaces
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
from lightning_modules.perceptual import LPIPSLoss  # noqa: E402
from lightning_modules.stage3_build import check_segmentation  # noqa: E402
from networks.encoder_checkpoints import load_e4e_checkpoint  # noqa: E402
from networks.refine.segmentation import upsampled_error  # noqa: E402
from networks.refine.segmenter import DomainSegmenter, SegmentationConfig, load_parser  # noqa: E402

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
    parser.add_argument("--lpips", default="random-alex", choices=("random-alex", "synthfaces"),
                        help="the error-map net: the +exp=dhr one (random AlexNet) or lpips-synthfaces")
    parser.add_argument("--classifier", default=str(WEIGHTS / "attribute_classifier.pt"),
                        help="the attribute classifier behind --lpips synthfaces")
    args = parser.parse_args(argv)

    seg = check_segmentation(SegmentationConfig(**{**SYNTHFACES_DSS, "parser": args.parser, "thresholds": OFFICIAL,
                                                   "superpixels": {"n_segments": args.n_segments},
                                                   "coarse": {**SYNTHFACES_DSS["coarse"], "steps": args.steps}}))
    stage1 = load_e4e_checkpoint(Path(args.encoder).expanduser())
    generator = stage1.generator.eval().requires_grad_(False)
    # SYNTHFACES_DSS shares the refinement's net (model.lpips): random AlexNet, or the domain distance
    lpips = (LPIPSLoss(net="synthfaces", backbone_weights=args.classifier) if args.lpips == "synthfaces"
             else LPIPSLoss(allow_random_backbone=True))
    parser, class_ids = load_parser(seg.parser_kind, seg.parser, seg.classes, set(OFFICIAL))
    segmenter = DomainSegmenter(generator, stage1.latent_avg.float(), seg, perceptual=lpips, parser=parser,
                                class_ids=class_ids)
    dm = SynthFacesDataModule.from_existing(args.data, generator.size, batch_size=args.n, num_workers=0, flip=False)
    dm.prepare_data()
    dm.setup("fit")
    torch.manual_seed(0)  # the shuffled training order
    images = next(iter(dm.train_dataloader()))["image"][: args.n]
    images, truth = paste_random_patches(images, p=1.0, generator=torch.Generator().manual_seed(0))
    maps = segmenter.error_maps(images)  # computed once; every scale only re-thresholds
    labels, probs = segmenter.regions(images)
    error = upsampled_error(maps, images.shape[-2:])
    rows = []
    for scale in (float(s) for s in args.scales.split(",")):
        thresholds = {k: v * scale / 0.6 for k, v in OFFICIAL.items()}
        in_domain = segmenter.error_in_domain(maps, labels, probs, thresholds, OFFICIAL_DEFAULT * scale / 0.6)
        m = mask_metrics(1 - in_domain, truth, thresholds=(0.5,))
        rows.append((scale, float(m["iou@0.5"].mean()), float(m["precision@0.5"].mean()),
                     float(m["recall@0.5"].mean())))
    best = max(rows, key=lambda r: r[1])[0]
    print(f"Error map (lpips {lpips.metric_name}): median {float(error.median()):.4f}, "
          f"inside patches {float((error * truth).sum() / truth.sum()):.4f}, "
          f"outside {float((error * (1 - truth)).sum() / (1 - truth).sum()):.4f}\n")
    print("| default threshold (others x 7/6, parts x 8/6) | IoU | precision | recall |\n|---|---|---|---|")
    for scale, iou, prec, rec in rows:
        print(f"| {scale:g}{' (best)' if scale == best else ''} | {iou:.3f} | {prec:.3f} | {rec:.3f} |")
    return {"rows": rows, "best": best}


if __name__ == "__main__":
    main()
