"""Write a SynthFaces dataset to disk in an FFHQ-like layout.

::

    out/
      synthfaces.json              config, format, part classes, factor and family lists, "complete"
      images/00000/00000.png ...   RGB, sub-folders of 1,000 (names zero-padded to >= 5 digits)
      parts/00000/00000.png ...    part maps as palette PNGs: pixel value = class index
      labels.json                  {"00000": {factor: value, ...}, ...} (floats rounded to 5 decimals)
      splits.json                  {"train": [...], "val": [...], "test": [...]} image indices
      ood/images/<sub>/<name>.png  one corrupted twin per test image (same name as the clean one)
      ood/masks/<sub>/<name>.png   its exact OOD mask (L mode, 0 / 255)
      ood/meta.json                {"<name>": {"family", "severity", "image", "mask", "clean"}}

Image i's factors come from chunk i // 1000, sampled with a generator seeded from (seed, chunk), so
the content never depends on the batch size or on which files already exist. Files are written to
a temporary name and renamed, so an interrupted run leaves only whole files; re-running completes
the missing ones, and re-running into a complete directory with the same config does nothing.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
from PIL import Image

from .corrupt import OOD_FAMILIES, corrupt_batch
from .factors import FACTORS, sample_factors
from .parts import PART_CLASSES, png_palette
from .render import check_size, render_factors

FORMAT = "synthfaces-v1"
CHUNK = 1000          # images per sub-folder and per factor-sampling generator
OOD_GROUP = 64        # test images of one family corrupted with one generator
META_FILE = "synthfaces.json"
DEFAULT_SEVERITIES = (0.25, 0.5, 0.75, 1.0)


def stream_seed(*key) -> int:
    """A 63-bit seed derived from ``key`` (stable across runs and platforms)."""
    digest = hashlib.sha256(repr(("synthfaces",) + tuple(key)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2 ** 63 - 1)


def chunk_factors(seed: int, chunk: int, count: int = CHUNK) -> Dict[str, torch.Tensor]:
    """Factors of images chunk * CHUNK ... chunk * CHUNK + count - 1 of a dataset with ``seed``."""
    if not 0 <= count <= CHUNK:
        raise ValueError(f"count must be in [0, {CHUNK}], got {count}")
    # sample_factors' prefix property: a short last chunk equals the start of a full one.
    return sample_factors(torch.Generator().manual_seed(stream_seed(seed, "faces", chunk)), count)


class _Layout:
    """File names of a dataset with ``n`` images."""

    def __init__(self, root: Path, n: int):
        self.root, self.width = root, max(5, len(str(max(n - 1, 0))))

    def name(self, i: int) -> str:
        return f"{i:0{self.width}d}"

    def rel(self, kind: str, i: int) -> str:
        """Relative path of image i for kind in images, parts, ood/images, ood/masks."""
        return f"{kind}/{(i // CHUNK) * CHUNK:0{self.width}d}/{self.name(i)}.png"


def _save_png(path: Path, array: np.ndarray, palette: bool = False) -> None:
    """Save an (H, W, 3) or (H, W) uint8 array as PNG via a temporary file and an atomic rename;
    ``palette``: store the 2-D array as palette indices (part maps)."""
    im = Image.fromarray(array)
    if palette:
        im.putpalette(png_palette())  # an "L" image becomes "P" with its values as indices
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    im.save(tmp, format="PNG", compress_level=4)
    os.replace(tmp, path)


def _existing(root: Path, rels: Sequence[str]) -> set:
    """The subset of relative paths ``rels`` that exist, listing each folder once."""
    folders: Dict[str, set] = {}
    out = set()
    for rel in rels:
        folder, _, fname = rel.rpartition("/")
        if folder not in folders:
            try:
                folders[folder] = {e.name for e in os.scandir(root / folder)}
            except FileNotFoundError:
                folders[folder] = set()
        if fname in folders[folder]:
            out.add(rel)
    return out


def _check_meta(root: Path, config: dict) -> bool:
    """Return True if ``root`` already holds the complete dataset of ``config``; raise if it holds
    something else; otherwise (new or partial dataset) write the meta file marked incomplete."""
    meta_path = root / META_FILE
    if meta_path.exists():
        try:
            meta = json.loads(meta_path.read_text())
            old = meta["config"]
        except (ValueError, KeyError) as exc:
            raise ValueError(f"{meta_path} is not a valid SynthFaces meta file ({exc}); use another --out") from exc
        diff = {k: (old.get(k), v) for k, v in config.items() if old.get(k) != v}
        if diff:
            raise ValueError(f"{root} holds a SynthFaces dataset with another config (see {meta_path}): "
                             + ", ".join(f"{k}: existing {a!r} vs requested {b!r}" for k, (a, b) in diff.items())
                             + "; use another --out or the same arguments")
        if meta.get("complete"):
            return True
    elif root.exists() and any(root.iterdir()):
        raise ValueError(f"{root} is not empty and has no {META_FILE}; refusing to write a dataset into it")
    _write_json(meta_path, _meta(config, complete=False))
    return False


def _meta(config: dict, complete: bool) -> dict:
    return {
        "format": FORMAT, "config": config, "complete": complete,
        "part_classes": list(PART_CLASSES), "ood_families": list(OOD_FAMILIES),
        "factors": [{"name": f.name, "kind": f.kind, "low": f.low, "high": f.high, "description": f.description,
                     **({"categories": list(f.categories)} if f.categories else {})} for f in FACTORS],
    }


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1 if path.name == META_FILE else None))
    os.replace(tmp, path)


def _label_rows(f: Dict[str, torch.Tensor]) -> List[dict]:
    cols = {k: (v.tolist() if v.dtype == torch.int64 else [round(x, 5) for x in v.tolist()]) for k, v in f.items()}
    return [dict(zip(cols, vals)) for vals in zip(*cols.values())]


def write_dataset(out: str | Path, n: int = 10000, size: int = 64, seed: int = 0, n_eval: int = 500,
                  n_val: Optional[int] = None, families: Sequence[str] = OOD_FAMILIES,
                  severities: Sequence[float] = DEFAULT_SEVERITIES, workers: Optional[int] = None,
                  batch: Optional[int] = None, verify: bool = False,
                  log: Callable[[str], None] = print) -> Path:
    """Render ``n`` faces (``size`` px, ``seed``) into ``out`` (layout in the module docstring).

    The last ``n_eval`` indices form the test split and each gets one corrupted twin: test image k
    (in index order) uses family ``families[k % F]`` and severity ``severities[(k // F) % S]``.
    ``n_val`` (default ``n_eval``) indices before them are the validation split. ``workers``
    threads encode PNGs; ``batch`` images are rendered at a time (default: ~4M pixels).
    ``verify``: even if the directory is marked complete, check every file and rewrite missing ones.
    Returns the dataset root.
    """
    check_size(size)
    n_val = n_eval if n_val is None else n_val
    if n <= 0 or n_eval < 0 or n_val < 0 or n_eval + n_val >= n:
        raise ValueError(f"need n > n_eval + n_val >= 0 (got n={n}, n_eval={n_eval}, n_val={n_val})")
    families = list(families)
    bad = [f for f in families if f not in OOD_FAMILIES]
    if bad or not families:
        raise ValueError(f"families must be a non-empty subset of {OOD_FAMILIES}, got {families}")
    severities = [float(s) for s in severities]
    if not severities or any(not 0 < s <= 1 for s in severities):
        raise ValueError(f"severities must be non-empty values in (0, 1], got {severities}")
    root = Path(out)
    config = {"n": n, "size": size, "seed": seed, "n_eval": n_eval, "n_val": n_val,
              "families": families, "severities": severities}
    if _check_meta(root, config) and not verify:
        log(f"[synthfaces] {root} is already complete; nothing to do")
        return root
    lay = _Layout(root, n)
    batch = batch or max(1, (4 << 20) // (size * size))
    workers = workers or min(4, os.cpu_count() or 1)
    t0 = time.perf_counter()
    factors: List[Dict[str, torch.Tensor]] = []
    with ThreadPoolExecutor(workers) as pool:
        pending: List[Future] = []
        for c in range((n + CHUNK - 1) // CHUNK):
            lo, hi = c * CHUNK, min(n, (c + 1) * CHUNK)
            f = chunk_factors(seed, c, hi - lo)
            factors.append(f)
            want = [(i, kind) for i in range(lo, hi) for kind in ("images", "parts")]
            have = _existing(root, [lay.rel(kind, i) for i, kind in want])
            todo = sorted({i for i, kind in want if lay.rel(kind, i) not in have})
            for b in range(0, len(todo), batch):
                idx = todo[b:b + batch]
                sel = torch.tensor(idx) - lo
                r = render_factors({k: v[sel] for k, v in f.items()}, size)
                imgs = r["images"].permute(0, 2, 3, 1).numpy()
                prts = r["parts"].to(torch.uint8).numpy()
                for j, i in enumerate(idx):
                    for kind, arr, pal in (("images", imgs[j], False), ("parts", prts[j], True)):
                        if lay.rel(kind, i) not in have:
                            pending.append(pool.submit(_save_png, root / lay.rel(kind, i), arr, pal))
                _drain(pending)
            log(f"[synthfaces] images {hi}/{n} ({len(todo)} rendered, {time.perf_counter() - t0:.1f} s)")
        _drain(pending, keep=0)
        ood_meta = _write_ood(root, lay, factors, config, pool, log)
    all_f = {k: torch.cat([f[k] for f in factors]) for k in factors[0]}
    _write_json(root / "labels.json", dict(zip((lay.name(i) for i in range(n)), _label_rows(all_f))))
    n_train = n - n_val - n_eval
    _write_json(root / "splits.json", {"train": list(range(n_train)), "val": list(range(n_train, n_train + n_val)),
                                       "test": list(range(n - n_eval, n))})
    _write_json(root / "ood" / "meta.json", ood_meta)
    _write_json(root / META_FILE, _meta(config, complete=True))
    log(f"[synthfaces] wrote {n} images to {root} in {time.perf_counter() - t0:.1f} s")
    return root


def _drain(pending: List[Future], keep: int = 2000) -> None:
    """Wait for queued writes until at most ``keep`` remain (bounds memory); re-raise errors."""
    while len(pending) > keep:
        pending.pop(0).result()


def _write_ood(root: Path, lay: _Layout, factors: List[Dict[str, torch.Tensor]], config: dict,
               pool: ThreadPoolExecutor, log: Callable[[str], None]) -> dict:
    """Write the corrupted twins and masks of the test split; return ood/meta.json's content."""
    n, fams, sevs = config["n"], config["families"], config["severities"]
    test = list(range(n - config["n_eval"], n))
    meta, pending = {}, []
    for fi, fam in enumerate(fams):
        members = [(k, i) for k, i in enumerate(test) if k % len(fams) == fi]
        for g in range(0, len(members), OOD_GROUP):
            group = members[g:g + OOD_GROUP]
            sev = [sevs[(k // len(fams)) % len(sevs)] for k, _ in group]
            for (k, i), s in zip(group, sev):
                meta[lay.name(i)] = {"family": fam, "severity": s, "image": lay.rel("ood/images", i),
                                     "mask": lay.rel("ood/masks", i), "clean": lay.rel("images", i)}
            rels = [lay.rel(kind, i) for _, i in group for kind in ("ood/images", "ood/masks")]
            have = _existing(root, rels)
            if len(have) == len(rels):
                continue
            f = {key: torch.stack([factors[i // CHUNK][key][i % CHUNK] for _, i in group]) for key in factors[0]}
            clean = render_factors(f, config["size"])
            gen = torch.Generator().manual_seed(stream_seed(config["seed"], "ood", fam, g // OOD_GROUP))
            bad, mask = corrupt_batch(clean["images"], clean["parts"], fam, torch.tensor(sev), gen)
            bad = bad.permute(0, 2, 3, 1).numpy()
            mask = (mask.to(torch.uint8) * 255).numpy()
            for j, (_, i) in enumerate(group):
                for kind, arr in (("ood/images", bad[j]), ("ood/masks", mask[j])):
                    if lay.rel(kind, i) not in have:
                        pending.append(pool.submit(_save_png, root / lay.rel(kind, i), arr))
    for fut in pending:
        fut.result()
    log(f"[synthfaces] ood twins for {len(test)} test images")
    return dict(sorted(meta.items()))
