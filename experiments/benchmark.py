"""Benchmark report: every stage-3 method on the same SynthFaces OOD evaluation images.

Each method runs through ``+exp=dhr`` with ``model.method=<method>`` (the same module, data, metrics and edit),
on the first ``--n`` OOD-corrupted test twins. Writes to ``--out``:

- ``benchmark.md``: one row per method: PSNR / SSIM / MSE (whole, inside and outside the OOD mask), mask IoU,
  smile edit success, OOD PSNR under the edit, seconds per image;
- ``quality_vs_time.png``: PSNR (whole and inside the OOD mask) against seconds per image;
- ``iou_by_family.png``: mask IoU@0.5 per corruption family for the methods with a mask;
- ``<method>.csv``: the per-image rows.

    python experiments/benchmark.py --n 32 --out experiments/assets/benchmark
    python experiments/benchmark.py --methods e4e,dhr -- model.refine.feature_steps=50   # extra config overrides
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Dict, List

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import torch  # noqa: E402

from lightning_modules.metrics import method_comparison  # noqa: E402
from lightning_modules.stage3_module import METHODS, SUMMARY_COLUMNS  # noqa: E402

CONFIG_DIR = ROOT / "experiments" / "configs"


def compose(overrides: List[str]):
    """The composed run.py config for ``overrides`` (``paths.run_dir`` pointed at a scratch folder)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        return hydra_compose("config", overrides=overrides)


def run_method(method: str, n: int, batch: int, out: Path, extra: List[str]):
    """Test ``method`` on the first ``n`` test images; returns (MetricTable, names -> family)."""
    import hydra
    import pytorch_lightning as pl

    cfg = compose(["+exp=dhr", f"model.method={method}", f"data.batch_size={batch}", "data.num_workers=0",
                   f"paths.run_dir={out / 'runs' / method}", *extra])
    pl.seed_everything(int(cfg.seed), verbose=False)
    datamodule = hydra.utils.instantiate(cfg.data)
    model = hydra.utils.instantiate(cfg.model)
    trainer = pl.Trainer(accelerator="cpu" if not torch.cuda.is_available() else "auto", devices=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         inference_mode=False, limit_test_batches=max(1, -(-n // batch)),
                         default_root_dir=str(out / "runs" / method))
    trainer.test(model, datamodule=datamodule, verbose=False)
    data = datamodule.test_dataloader().dataset
    families = {data[i]["name"]: data[i]["family"] for i in range(min(len(data), n))}
    return model.test_table, families


def plots(means: Dict[str, Dict[str, float]], tables, families, out: Path) -> List[Path]:
    """The two PNG figures; returns their paths."""
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
    args = parser.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    tables, families, means = {}, {}, {}
    for method in methods:
        table, fam = run_method(method, args.n, args.batch, out, extra)
        rows = [r for r in table.rows if r["name"] in fam][: args.n]
        table.rows = rows
        tables[method], means[method] = table, table.mean()
        families.update(fam)
        table.to_csv(out / f"{method}.csv")
        print(f"{method}: {len(rows)} images, " + ", ".join(f"{k} {means[method][k]:.4g}" for k, _ in SUMMARY_COLUMNS
                                                          if k in means[method]), flush=True)
    flat = {f"{m}/{k}": v for m, mm in means.items() for k, v in mm.items()}
    markdown = method_comparison(flat, {m: f"{m}/" for m in methods}, SUMMARY_COLUMNS)
    header = (f"Stage-3 methods on the first {args.n} OOD-corrupted SynthFaces test images "
              f"(`python experiments/benchmark.py --n {args.n}`; metrics against the input; "
              f"IoU of the predicted OOD mask at 0.5; smile edit at +3 scored by the attribute classifier).\n\n")
    (out / "benchmark.md").write_text(header + markdown + "\n")
    print("\n" + markdown)
    figures = plots(means, tables, families, out)
    print("\nWrote " + ", ".join(str(p) for p in [out / "benchmark.md", *figures]))
    return {"means": means, "markdown": markdown, "plots": figures}


if __name__ == "__main__":
    main()
