"""Fit an InterFaceGAN direction for a SynthFaces attribute and measure how well it edits.

Samples ``--n`` codes w = mapping(z) (seeded z) from a generator file, renders them with the stored
noise, scores every image with the shipped SynthFaces attribute classifier (a continuous head, e.g.
``smile`` in [0, 1]), fits a linear boundary between the top and bottom ``--quantile`` of scores
(``networks.editing.fit_interfacegan_direction``) and saves its unit normal as a (1, style_dim)
``.pt`` tensor (InterFaceGAN / e4e layout). Then it edits ``--eval-samples`` fresh W+ codes (all rows)
by +/- ``--eval-strength`` and reports the classifier's mean attribute change; the numbers are also
written next to the direction as ``<out>.json``.

Usage: ``python experiments/fit_direction.py GENERATOR.pt --attribute smile [--n 2000] [--out smile.pt]``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from networks.checkpoints import load_generator  # noqa: E402
from networks.editing import FIT_METHODS, apply_interfacegan, fit_interfacegan_direction, save_direction  # noqa: E402
from networks.synthfaces_nets import load_attribute_classifier  # noqa: E402

DEFAULT_CLASSIFIER = Path(__file__).resolve().parent / "weights" / "synthfaces" / "attribute_classifier.pt"


@torch.no_grad()
def sample_and_score(G, classifier, attribute: str, n: int, seed: int, batch: int = 100):
    """Draw n codes w (n, D) from seeded z and score their images: returns (w, scores (n,))."""
    z = torch.randn(n, G.style_dim, generator=torch.Generator().manual_seed(seed))
    ws, scores = [], []
    for chunk in z.split(batch):
        w = G.get_latent(chunk)
        image = G([w], input_is_latent=True)[0].clamp(-1, 1)
        ws.append(w)
        scores.append(classifier.predict(image)[attribute].float())
    return torch.cat(ws), torch.cat(scores)


@torch.no_grad()
def edit_success(G, classifier, attribute: str, direction, w, strength: float, min_change: float = 0.1) -> dict:
    """Edit W+ codes built from ``w`` (B, D) (all rows) by +/- ``strength`` and score the change.

    Returns {"before", "plus_change", "minus_change", "plus_success", "minus_success"}: mean attribute
    before editing, mean change for +strength and -strength, and the fraction of images whose
    attribute moved by at least ``min_change`` in the intended sign.
    """
    codes = w.unsqueeze(1).repeat(1, G.n_latent, 1)
    before = classifier.predict(G.synthesize(codes).image.clamp(-1, 1))[attribute].float()
    out = {"before": before.mean().item()}
    for name, s in (("plus", strength), ("minus", -strength)):
        edited = G.synthesize(apply_interfacegan(codes, direction, s)).image.clamp(-1, 1)
        change = classifier.predict(edited)[attribute].float() - before
        out[f"{name}_change"] = change.mean().item()
        out[f"{name}_success"] = ((change if s > 0 else -change) >= min_change).float().mean().item()
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("generator", type=Path, help="generator file (rosinality layout, e.g. generator.pt)")
    parser.add_argument("--attribute", default="smile", help="continuous SynthFaces label to edit (default smile)")
    parser.add_argument("--classifier", type=Path, default=DEFAULT_CLASSIFIER, help="attribute_classifier.pt")
    parser.add_argument("--n", type=int, default=2000, help="number of sampled codes to fit on")
    parser.add_argument("--quantile", type=float, default=0.3, help="top/bottom fraction used as the two classes")
    parser.add_argument("--method", choices=FIT_METHODS, default="linear_svm")
    parser.add_argument("--seed", type=int, default=0, help="z seed of the fitting samples (evaluation uses seed+1)")
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--eval-samples", type=int, default=64)
    parser.add_argument("--eval-strength", type=float, default=3.0)
    parser.add_argument("--out", type=Path, default=None,
                        help="output .pt (default: <generator dir>/directions/<attribute>.pt)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    G, _ = load_generator(args.generator)
    classifier = load_attribute_classifier(args.classifier)
    heads = {h.name: h for h in classifier.heads}
    continuous = [h.name for h in classifier.heads if h.kind == "regression"]
    if args.attribute not in heads or heads[args.attribute].kind != "regression":
        parser.error(f"--attribute {args.attribute!r} is not a continuous label of {args.classifier}; "
                     f"choose one of: {', '.join(continuous)}")
    out = args.out or args.generator.resolve().parent / "directions" / f"{args.attribute}.pt"

    w, scores = sample_and_score(G, classifier, args.attribute, args.n, args.seed, args.batch)
    direction = fit_interfacegan_direction(w, scores, method=args.method, quantile=args.quantile, seed=args.seed)
    proj = (w @ direction.T).squeeze(1)
    corr = torch.corrcoef(torch.stack([proj, scores]))[0, 1].item()
    eval_w = sample_and_score(G, classifier, args.attribute, args.eval_samples, args.seed + 1, args.batch)[0]
    report = {"attribute": args.attribute, "generator": str(args.generator), "n": args.n, "method": args.method,
              "quantile": args.quantile, "seed": args.seed, "score_mean": scores.mean().item(),
              "score_std": scores.std().item(), "projection_score_corr": corr,
              "projection_std": proj.std().item(),
              "eval_samples": args.eval_samples, "eval_strength": args.eval_strength,
              **edit_success(G, classifier, args.attribute, direction, eval_w, args.eval_strength)}
    save_direction(out, direction)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2))
    print(f"direction ({tuple(direction.shape)}) -> {out}")
    print(f"corr(<w, d>, {args.attribute}) on the {args.n} fitting samples: {corr:.3f}; "
          f"std of <w, d>: {report['projection_std']:.3f}")
    print(f"edit of {args.eval_samples} W+ codes, strength +/-{args.eval_strength:g}: mean {args.attribute} "
          f"{report['before']:.3f}, change {report['plus_change']:+.3f} / {report['minus_change']:+.3f}, "
          f"success (|change| >= 0.1 in the intended sign) "
          f"{report['plus_success']:.2f} / {report['minus_success']:.2f}")
    return report


if __name__ == "__main__":
    main()
