"""Benchmark report: every stage-3 method on the same SynthFaces OOD evaluation images.

Each method runs through ``+exp=dhr`` with ``model.method=<method>`` (the same module, data, metrics and edit),
on the first ``--n`` OOD-corrupted test twins. Writes to ``--out``:

- ``benchmark.md``: one row per method: PSNR / SSIM / MSE (whole, inside and outside the OOD mask), mask IoU,
  smile edit success, OOD PSNR under the edit, seconds per image; then, per corruption family (the six SynthFaces
  families, every one held out of training and calibration: ``HELD_OUT``), one table per metric of
  ``FAMILY_COLUMNS`` (rows = methods, columns = families);
- ``families.csv``: the per-family means (method, family, images, metrics);
- ``quality_vs_time.png``: PSNR (whole and inside the OOD mask) against seconds per image;
- ``iou_by_family.png``: mask IoU@0.5 per corruption family for the methods with a mask;
- ``by_family.png``: PSNR and mask IoU@0.5 per family per method (two panels);
- ``<method>.csv``: the per-image rows.

``--oracle`` (or the pseudo-method ``dhr_oracle`` in ``--methods``) adds the row "DHR with the ground-truth mask":
``model.method=dhr model.segmentation.source=ground_truth``, the test twins' true OOD mask as DHR's segmentation
(evaluation only), the ceiling of DHR's refinement for a perfect mask. The pseudo-method ``ood_blend_unsupervised``
is stage 2 alone with the hand-off trained without mask labels (``+exp=ood_blend_unsupervised``); ``ood_blend``
uses the patch-supervised one.

    python experiments/benchmark.py --n 32 --oracle --out experiments/assets/benchmark
    python experiments/benchmark.py --methods e4e,dhr -- model.refine.feature_steps=50   # extra config overrides
    python experiments/benchmark.py --wandb      # also one W&B run per method, all in one group (offline by default)

``--wandb``: each method is its own W&B run (``<out>/runs/<method>/wandb``) in one group (``--wandb-group``, default
``benchmark-<time>``), named and tagged by experiment, method, data and generator, with run.py's per-image table
(pictures included), ``test/*`` and ``test_mean/*`` summary keys, and the resolved config plus the hand-offs'
provenance in the run config (``experiments/utils/wandb_run.py``).
"""
from __future__ import annotations

import argparse
import csv
import math
import os
import sys
import time
from pathlib import Path
from typing import Dict, List, Mapping, Sequence

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import torch  # noqa: E402

from datamodules.synthfaces.corrupt import OOD_FAMILIES  # noqa: E402
from lightning_modules.metrics import method_comparison  # noqa: E402
from lightning_modules.stage3_module import METHODS, SUMMARY_COLUMNS  # noqa: E402

CONFIG_DIR = ROOT / "experiments" / "configs"
# pseudo-methods: {name: (model.method, extra overrides)}; the oracle is DHR with the ground-truth mask
ORACLE = "dhr_oracle"
UNSUPERVISED_STAGE2 = "ood_blend_unsupervised"
PSEUDO_METHODS = {
    ORACLE: ("dhr", ["model.segmentation.source=ground_truth"]),
    # stage 2 trained without mask labels (+exp=ood_blend_unsupervised); ood_blend is the patch-supervised file
    UNSUPERVISED_STAGE2: ("ood_blend", ["chain.align_mask.checkpoint=${paths.root_dir}/experiments/weights/"
                                        "synthfaces/align_mask_unsupervised.pt"]),
}
ROW_LABELS = {ORACLE: "dhr_oracle (DHR with the ground-truth mask)",
              UNSUPERVISED_STAGE2: "ood_blend_unsupervised (stage 2 without mask labels)"}
# the per-family tables: one per metric
FAMILY_COLUMNS = [("psnr", "PSNR"), ("psnr_in", "PSNR in OOD"), ("psnr_out", "PSNR out"),
                  ("iou@0.5", "mask IoU@0.5"), ("edit_success", "smile edit success")]
HELD_OUT = (
    "**Held-out families.** No SynthFaces corruption family (" + ", ".join(OOD_FAMILIES) + ") is used in any "
    "training or calibration step: stages 0-1 and the auxiliary networks train on clean training images, stage 2 "
    "trains on training images with generic pasted noise patches (`datamodules/ood_patches.py`), and the DSS "
    "thresholds are calibrated on training images with the same generic patches "
    "(`experiments/calibrate_segmentation.py`). Every family below is held out. (Caveat, model selection rather "
    "than training: some shipped design choices were compared on these test twins, e.g. the stage-2 "
    "`patch_supervision` weight and `error_cue`, see the README's stage-2 section; "
    "`experiments/leave_one_family_out.py` re-makes a choice with each family held out of it.)")


def compose(overrides: List[str]):
    """The composed run.py config for ``overrides`` (``paths.run_dir`` pointed at a scratch folder)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        return hydra_compose("config", overrides=overrides)


def run_method(method: str, n: int, batch: int, out: Path, extra: List[str], wandb_group: str | None = None):
    """Test ``method`` (a ``METHODS`` name or a ``PSEUDO_METHODS`` one) on the first ``n`` test images; returns
    (MetricTable, names -> family)."""
    import hydra
    import pytorch_lightning as pl

    model_method, own = PSEUDO_METHODS.get(method, (method, []))
    cfg = compose(["+exp=dhr", f"model.method={model_method}", f"data.batch_size={batch}", "data.num_workers=0",
                   f"paths.run_dir={out / 'runs' / method}", *extra, *own])
    pl.seed_everything(int(cfg.seed), verbose=False)
    datamodule = hydra.utils.instantiate(cfg.data)
    model = hydra.utils.instantiate(cfg.model)
    logger, callbacks = False, []
    if wandb_group:  # one W&B run per method (see the module docstring)
        from experiments.utils.wandb_run import benchmark_wandb

        logger, callbacks = benchmark_wandb(cfg, method, wandb_group, out / "runs" / method)
    trainer = pl.Trainer(accelerator="cpu" if not torch.cuda.is_available() else "auto", devices=1, logger=logger,
                         callbacks=callbacks,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         inference_mode=False, limit_test_batches=max(1, -(-n // batch)),
                         default_root_dir=str(out / "runs" / method))
    trainer.test(model, datamodule=datamodule, verbose=False)
    if logger:
        logger.experiment.finish()
    data = datamodule.test_dataloader().dataset
    families = {data[i]["name"]: data[i]["family"] for i in range(min(len(data), n))}
    return model.test_table, families


def family_means(tables: Mapping[str, object], families: Mapping[str, str],
                 columns: Sequence[str] = tuple(k for k, _ in FAMILY_COLUMNS)) -> Dict[str, Dict[str, Dict]]:
    """{method: {family: {"n": images, metric: NaN-ignoring mean}}} for every family of ``OOD_FAMILIES`` (a family
    without images has n 0 and no metrics) plus any other family label found (e.g. "clean")."""
    found = {families[r["name"]] for t in tables.values() for r in t.rows if r["name"] in families}
    order = list(OOD_FAMILIES) + sorted(found - set(OOD_FAMILIES))
    out: Dict[str, Dict[str, Dict[str, float]]] = {}
    for method, table in tables.items():
        out[method] = {}
        for fam in order:
            rows = [r for r in table.rows if families.get(r["name"]) == fam]
            cell: Dict[str, float] = {"n": len(rows)}
            for key in columns:
                vals = [float(r[key]) for r in rows if key in r and math.isfinite(float(r[key]))]
                if vals:
                    cell[key] = sum(vals) / len(vals)
            out[method][fam] = cell
    return out


def family_markdown(per_family: Mapping[str, Mapping[str, Mapping[str, float]]],
                    columns: Sequence = tuple(FAMILY_COLUMNS), digits: int = 4) -> str:
    """Per-family Markdown: the held-out statement, the images per family, then one table per metric of
    ``columns`` that some method has (rows = methods, columns = families, "–" where a family has no value)."""
    if not per_family:
        return ""
    fams = list(next(iter(per_family.values())))
    head = "| method | " + " | ".join(fams) + " |\n" + "|---" * (len(fams) + 1) + "|"
    first = next(iter(per_family.values()))
    parts = ["## Per corruption family", HELD_OUT,
             "Test images per family: " + ", ".join(f"{f} {int(first[f]['n'])}" for f in fams) + "."]
    for key, title in columns:
        if not any(key in cell for m in per_family.values() for cell in m.values()):
            continue
        lines = [f"### {title} per family", "", head]
        for method, cells in per_family.items():
            values = [f"{cells[f][key]:.{digits}g}" if key in cells[f] else "–" for f in fams]
            lines.append(f"| {ROW_LABELS.get(method, method)} | " + " | ".join(values) + " |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


def write_family_csv(per_family: Mapping[str, Mapping[str, Mapping[str, float]]], path: Path) -> Path:
    """``families.csv``: one row per (method, family): images and the ``FAMILY_COLUMNS`` means (empty = none)."""
    keys = [k for k, _ in FAMILY_COLUMNS]
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["method", "family", "images", *keys])
        for method, cells in per_family.items():
            for fam, cell in cells.items():
                writer.writerow([method, fam, int(cell["n"]), *[cell.get(k, "") for k in keys]])
    return path


def family_plot(per_family: Mapping[str, Mapping[str, Mapping[str, float]]], out: Path) -> Path:
    """``by_family.png``: PSNR (top) and mask IoU@0.5 (bottom, methods with a mask) per family, bars per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fams = [f for f in next(iter(per_family.values())) if any(m[f]["n"] for m in per_family.values())]
    colours = {m: f"C{i % 10}" for i, m in enumerate(per_family)}  # one colour per method in both panels
    fig, axes = plt.subplots(2, 1, figsize=(8, 7.5), sharex=True)
    handles = {}
    for ax, (key, label) in zip(axes, (("psnr", "PSNR dB (whole image)"), ("iou@0.5", "mask IoU@0.5"))):
        methods = [m for m, cells in per_family.items() if any(key in cells[f] for f in fams)]
        width = 0.8 / max(1, len(methods))
        for k, method in enumerate(methods):
            vals = [per_family[method][f].get(key, float("nan")) for f in fams]
            handles[method] = ax.bar([i + k * width for i in range(len(fams))], vals, width=width,
                                     color=colours[method])
        ax.set_ylabel(label)
        ax.grid(axis="y", alpha=0.3)
        if not methods:
            ax.text(0.5, 0.5, "no method with a mask", ha="center", va="center", transform=ax.transAxes)
        ax.set_xticks([i + width * (max(1, len(methods)) - 1) / 2 for i in range(len(fams))], fams, rotation=20)
    axes[0].set_title("Per corruption family (every family held out of training and calibration)")
    order = [m for m in per_family if m in handles]
    fig.legend([handles[m] for m in order], [ROW_LABELS.get(m, m) for m in order], loc="lower center", ncol=3,
               fontsize=8)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    path = out / "by_family.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plots(means: Dict[str, Dict[str, float]], tables, families, out: Path) -> List[Path]:
    """The PNG figures (quality vs time, IoU per family, PSNR and IoU per family); returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for method, m in means.items():
        ax.scatter(m["seconds"], m["psnr"], marker="o", s=50, label=f"{method} (whole)")
        if "psnr_in" in m:
            ax.scatter(m["seconds"], m["psnr_in"], marker="x", s=50, color=ax.collections[-1].get_facecolor()[0])
        ax.annotate(method, (m["seconds"], m["psnr"]), textcoords="offset points", xytext=(5, 3), fontsize=8)
    ax.set_xscale("symlog", linthresh=0.01)
    ax.set_xlabel("seconds per image (log)")
    ax.set_ylabel("PSNR dB  (o whole image, x inside the OOD mask)")
    ax.set_title("Quality vs time, SynthFaces OOD test images")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    paths.append(out / "quality_vs_time.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    with_mask = [m for m, t in tables.items() if "iou@0.5" in t.columns()]
    if with_mask:
        fams = sorted({families[r["name"]] for t in tables.values() for r in t.rows if r["name"] in families})
        fig, ax = plt.subplots(figsize=(6.5, 4))
        width = 0.8 / len(with_mask)
        for k, method in enumerate(with_mask):
            vals = []
            for fam in fams:
                rows = [r["iou@0.5"] for r in tables[method].rows if families.get(r["name"]) == fam]
                vals.append(sum(rows) / len(rows) if rows else float("nan"))
            ax.bar([i + k * width for i in range(len(fams))], vals, width=width, label=method)
        ax.set_xticks([i + width * (len(with_mask) - 1) / 2 for i in range(len(fams))], fams, rotation=20)
        ax.set_ylabel("mask IoU@0.5")
        ax.set_title("OOD mask IoU per corruption family")
        ax.legend()
        ax.grid(axis="y", alpha=0.3)
        fig.tight_layout()
        paths.append(out / "iou_by_family.png")
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    paths.append(family_plot(family_means(tables, families), out))
    return paths


def main(argv=None) -> dict:
    """CLI entry; returns {"means": {method: means}, "markdown": table, "plots": [paths]}."""
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--n", type=int, default=32, help="test images (the first n OOD twins)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--out", default=str(ROOT / "outputs" / "benchmark"))
    parser.add_argument("--wandb", action="store_true", help="also log one W&B run per method, in one group")
    parser.add_argument("--wandb-group", default=None, help="the W&B group (default benchmark-<time>)")
    parser.add_argument("--oracle", action="store_true",
                        help=f"add the row {ORACLE}: DHR with the ground-truth OOD mask as its segmentation")
    args = parser.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if args.oracle and ORACLE not in methods:
        methods.append(ORACLE)
    unknown = sorted(set(methods) - set(METHODS) - set(PSEUDO_METHODS))
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {', '.join([*METHODS, *PSEUDO_METHODS])}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    group = (args.wandb_group or time.strftime("benchmark-%Y-%m-%d_%H-%M-%S")) if args.wandb else None
    os.environ.setdefault("WANDB_MODE", "offline")
    tables, families, means = {}, {}, {}
    for method in methods:
        table, fam = run_method(method, args.n, args.batch, out, extra, wandb_group=group)
        rows = [r for r in table.rows if r["name"] in fam][: args.n]
        table.rows = rows
        tables[method], means[method] = table, table.mean()
        families.update(fam)
        table.to_csv(out / f"{method}.csv")
        print(f"{method}: {len(rows)} images, " + ", ".join(f"{k} {means[method][k]:.4g}" for k, _ in SUMMARY_COLUMNS
                                                          if k in means[method]), flush=True)
    flat = {f"{m}/{k}": v for m, mm in means.items() for k, v in mm.items()}
    markdown = method_comparison(flat, {ROW_LABELS.get(m, m): f"{m}/" for m in methods}, SUMMARY_COLUMNS)
    oracle = " --oracle" if ORACLE in methods else ""
    header = (f"Stage-3 methods on the first {args.n} OOD-corrupted SynthFaces test images "
              f"(`python experiments/benchmark.py --n {args.n}{oracle}`; metrics against the input; "
              f"IoU of the predicted OOD mask at 0.5; smile edit at +3 scored by the attribute classifier).\n\n")
    per_family = family_means(tables, families)
    by_family = family_markdown(per_family)
    (out / "benchmark.md").write_text(header + markdown + "\n\n" + by_family)
    family_csv = write_family_csv(per_family, out / "families.csv")
    print("\n" + markdown + "\n\n" + by_family)
    figures = plots(means, tables, families, out)
    print("\nWrote " + ", ".join(str(p) for p in [out / "benchmark.md", family_csv, *figures]))
    return {"means": means, "markdown": markdown, "families": per_family, "family_markdown": by_family,
            "plots": figures}


if __name__ == "__main__":
    main()
