"""A picture of the per-image W&B table of an offline run, read back from the run's logged files (the README's figure).

Reads ``test/per_image`` from ``<run_dir>/wandb/offline-run-*/run-*.wandb`` (the table is a ``run_table`` artifact:
its JSON and thumbnails are the files the run logged; ``experiments/utils/wandb_offline.py`` decodes the run file) and
draws the rows that have pictures, lowest PSNR first: name and metrics, then ``input``, ``reconstruction``, ``mask``
(the logged mask layers over the input: prediction red, ground truth green, both yellow), ``edit`` and the other
picture columns (the output edits, ``smile_-3`` ...).

    python experiments/wandb_table_picture.py outputs/dhr/<run> --rows 5   # the README picture
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from experiments.utils.wandb_offline import logged_tables, run_file  # noqa: E402

PICTURES = ("input", "reconstruction", "mask", "edit")


def _array(files, path) -> np.ndarray:
    return np.asarray(Image.open(files[path]))


def mask_picture(files, cell) -> np.ndarray:
    """The input of a ``mask`` cell tinted by its layers: prediction red, ground truth green, both yellow."""
    image = _array(files, cell["path"]).astype(np.float32) / 255
    layers = {k: _array(files, v["path"]) > 0 for k, v in (cell.get("masks") or {}).items()}
    pred = layers.get("prediction", np.zeros(image.shape[:2], bool))
    gt = layers.get("ground_truth", np.zeros(image.shape[:2], bool))
    colour = np.stack([pred, gt, np.zeros_like(pred)], -1).astype(np.float32)
    tint = np.maximum(pred, gt)[..., None] * 0.55
    return image[..., :3] * (1 - tint) + tint * colour


def draw(run_dir, out, rows: int = 6, key: str = "test/per_image") -> Path:
    """Write the picture of the first ``rows`` rows with pictures (lowest PSNR first); returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    [wandb_dir] = sorted(Path(run_dir).glob("wandb/offline-run-*"))[-1:]
    tables = logged_tables(run_file(wandb_dir), key)
    if not tables:
        raise SystemExit(f"{wandb_dir}: no table {key!r} logged")
    table = tables[-1]
    columns = table["columns"]
    shown = [dict(zip(columns, r)) for r in table["data"] if dict(zip(columns, r)).get("input")]
    shown.sort(key=lambda r: r["psnr"] if r.get("psnr") is not None else -np.inf)
    shown = shown[:rows]
    pictures = [c for c in PICTURES if c in columns]  # then any other picture column (stage 3: the output edits)
    pictures += [c for c in columns if c not in pictures and any(isinstance(r.get(c), dict) for r in shown)]
    fig, axes = plt.subplots(len(shown), len(pictures) + 1, figsize=(1.9 * (len(pictures) + 1.1), 1.9 * len(shown)),
                             squeeze=False, gridspec_kw={"width_ratios": [1.1] + [1] * len(pictures)})
    for i, row in enumerate(shown):
        text = [row["name"]] + [f"{k} {row[k]:.3g}" for k in ("psnr", "psnr_in", "iou@0.5", "edit_success")
                                if row.get(k) is not None]
        axes[i, 0].text(0, 0.5, "\n".join(text), va="center", fontsize=8, family="monospace")
        for j, column in enumerate(pictures, 1):
            cell = row.get(column)
            if cell:
                files = table["files"]
                axes[i, j].imshow(mask_picture(files, cell) if column == "mask" else _array(files, cell["path"]))
            if i == 0:
                axes[i, j].set_title(column if column != "mask" else "mask (pred red, truth green)", fontsize=8)
    for ax in axes.flat:
        ax.axis("off")
    axes[0, 0].set_title("row (W&B test/per_image)", fontsize=8)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    with Image.open(out) as picture:  # 256 colours: a small file for the README
        small = picture.convert("RGB").quantize(256)
    small.save(out, optimize=True)
    return out


def main(argv=None) -> Path:
    """CLI entry; returns the written path."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="a run directory holding wandb/offline-run-*")
    parser.add_argument("--rows", type=int, default=6)
    parser.add_argument("--key", default="test/per_image")
    parser.add_argument("--out", default=str(ROOT / "experiments" / "assets" / "wandb_per_image_table.png"))
    args = parser.parse_args(argv)
    path = draw(args.run_dir, args.out, args.rows, args.key)
    print(f"Wrote {path}")
    return path


if __name__ == "__main__":
    main()
