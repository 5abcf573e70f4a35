"""Leave-one-family-out model selection on the SynthFaces test twins: a choice made without the family it is scored on.

Choosing between variants (a schedule, a stage-2 file, a threshold) by their mean on the test twins is model
selection on the test set. This script turns per-image result tables into an honest estimate: for each
corruption family F, the candidates are compared on the images of the *other* families only, the winner is
chosen by a rule fixed beforehand, and that winner's mean on F's images is reported. Every image is then scored by
a choice its family took no part in; the pooled row ("all, each family held out") is the held-out estimate of the
whole selection procedure, next to every candidate's own mean for reference.

Rule: the highest (``--minimize``: lowest) mean ``--metric`` over the selection images, among the candidates that
pass ``--floor KEY:RATIO`` (their mean KEY >= RATIO x the ``--reference`` table's mean KEY on the same images);
``--default`` (else the first candidate) when none passes.

    # DHR schedule: highest PSNR with smile edit success >= 0.9 x PTI's (the rule of calibrate_refine.py)
    python experiments/leave_one_family_out.py --metric psnr \\
        --candidate official=bench/dhr.csv --candidate 350:3e-4:350=bench350/dhr.csv \\
        --reference bench/pti.csv --floor edit_success:0.9 --default official
    # stage-2 files by mask IoU
    python experiments/leave_one_family_out.py --metric iou@0.5 --candidate patch_supervised=a/ood_blend.csv \\
        --candidate unsupervised=b/ood_blend.csv

Inputs are per-image CSVs with a ``name`` column (``benchmark.py``'s ``<method>.csv``, stage 2's
``metrics/test.csv``); families come from the SynthFaces ``ood/meta.json`` under ``--data``. Only images present in
every table are used. Prints (and with ``--out`` writes) a Markdown table.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

ROOT = Path(__file__).resolve().parents[1]

Table = Mapping[str, Mapping[str, float]]  # image name -> {metric: value}


@dataclass
class Floor:
    """A candidate is admissible when its mean ``key`` >= ``ratio`` x the reference table's mean ``key``."""

    key: str
    ratio: float
    reference: Table


@dataclass
class FamilyChoice:
    """The choice made without ``family``: the candidates' selection scores and floor values on the other families'
    images, the admissible ones, the chosen one, and every candidate's mean ``metric`` on ``family``'s images."""

    family: str
    n: int
    chosen: str
    selection: Dict[str, float]
    admissible: List[str]
    held_out: Dict[str, float]
    floor_values: Dict[str, float] = field(default_factory=dict)
    floor_limit: Optional[float] = None
    also: Dict[str, float] = field(default_factory=dict)  # the chosen candidate's held-out means of other columns

    @property
    def value(self) -> float:
        """The chosen candidate's mean metric on the held-out family."""
        return self.held_out[self.chosen]


def read_table(path: str | Path) -> Dict[str, Dict[str, float]]:
    """{name: {column: float}} from a per-image CSV with a ``name`` column (cells that are not numbers are NaN)."""
    path = Path(path)
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError as exc:
        raise SystemExit(f"{path}: cannot read the per-image table ({exc.strerror})")
    if not rows or "name" not in rows[0]:
        raise SystemExit(f"{path}: not a per-image table (needs a header with a 'name' column and one row per image)")

    def number(text: str) -> float:
        try:
            return float(text)
        except (TypeError, ValueError):
            return float("nan")

    return {r["name"]: {k: number(v) for k, v in r.items() if k != "name"} for r in rows}


def read_families(data: str | Path) -> Dict[str, str]:
    """{test-twin name: corruption family} from ``<data>/ood/meta.json`` (the SynthFaces test split)."""
    meta = Path(data) / "ood" / "meta.json"
    try:
        return {name: item["family"] for name, item in json.loads(meta.read_text()).items()}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SystemExit(f"{meta}: no SynthFaces test-twin families there ({exc}); pass --data <synthfaces root>")


def mean_of(table: Table, names: Sequence[str], key: str) -> float:
    """Mean of ``key`` over ``names`` (NaN cells skipped; NaN when none is finite)."""
    vals = [table[n][key] for n in names if key in table[n] and math.isfinite(table[n][key])]
    return sum(vals) / len(vals) if vals else float("nan")


def select_per_family(candidates: Mapping[str, Table], families: Mapping[str, str], metric: str,
                      maximize: bool = True, floor: Optional[Floor] = None,
                      default: Optional[str] = None, also: Sequence[str] = ()) -> List[FamilyChoice]:
    """One `FamilyChoice` per family found among the images every table (and the floor's reference) holds.

    Args:
        candidates: {candidate: per-image table}; at least two.
        families: {image name: family}; images without a family are ignored.
        metric: the column the rule ranks by; ``maximize`` False ranks by the lowest mean.
        floor: the admissibility condition (None: all admissible).
        default: the candidate chosen when none is admissible (None: the first).
        also: other columns to report for the chosen candidate on the held-out family (``FamilyChoice.also``).
    """
    if len(candidates) < 2:
        raise ValueError("select_per_family: give at least two candidates")
    default = default if default is not None else next(iter(candidates))
    if default not in candidates:
        raise ValueError(f"select_per_family: the default {default!r} is not a candidate ({', '.join(candidates)})")
    tables = list(candidates.values()) + ([floor.reference] if floor else [])
    names = sorted(n for n in families if all(n in t for t in tables))
    if not names:
        raise ValueError("select_per_family: no image is in every table and in the family list")
    for cand, table in candidates.items():
        if not any(metric in table[n] for n in names):
            raise ValueError(f"select_per_family: candidate {cand!r} has no column {metric!r}")
    order = sorted({families[n] for n in names})
    sign = 1.0 if maximize else -1.0
    choices = []
    for fam in order:
        held = [n for n in names if families[n] == fam]
        rest = [n for n in names if families[n] != fam]
        selection = {c: mean_of(t, rest, metric) for c, t in candidates.items()}
        floor_values, limit = {}, None
        admissible = [c for c in candidates if math.isfinite(selection[c])]
        if floor is not None:
            limit = floor.ratio * mean_of(floor.reference, rest, floor.key)
            floor_values = {c: mean_of(t, rest, floor.key) for c, t in candidates.items()}
            admissible = [c for c in admissible if floor_values[c] >= limit]
        chosen = max(admissible, key=lambda c: sign * selection[c]) if admissible else default
        choices.append(FamilyChoice(fam, len(held), chosen, selection, admissible,
                                    {c: mean_of(t, held, metric) for c, t in candidates.items()},
                                    floor_values, limit, {k: mean_of(candidates[chosen], held, k) for k in also}))
    return choices


def pooled(choices: Sequence[FamilyChoice], candidate: Optional[str] = None, key: Optional[str] = None) -> float:
    """Image-weighted mean over the families of the chosen candidate's held-out means (``candidate``: that one's;
    ``key``: that ``also`` column of the choice instead of the metric)."""
    total = sum(c.n for c in choices)
    if key is not None:
        return sum(c.n * c.also[key] for c in choices) / total
    return sum(c.n * c.held_out[candidate or c.chosen] for c in choices) / total


def markdown(choices: Sequence[FamilyChoice], metric: str, floor: Optional[Floor] = None, maximize: bool = True,
             digits: int = 4) -> str:
    """The table: one row per held-out family (chosen, its held-out mean, each candidate's), then the pooled row."""
    cands, also = list(choices[0].held_out), list(choices[0].also)
    rule = f"{'highest' if maximize else 'lowest'} mean {metric}"
    if floor is not None:
        rule += f" among candidates with mean {floor.key} >= {floor.ratio:g} x the reference's"
    head = (f"Leave-one-family-out selection by {rule}, chosen on the other families' images.\n\n"
            f"| held-out family | images | chosen (on the other families) | {metric} of the choice | "
            + "".join(f"{k} of the choice | " for k in also)
            + " | ".join(f"{metric}: {c}" for c in cands) + " |\n" + "|---" * (4 + len(also) + len(cands)) + "|")
    lines = [head]
    for c in choices:
        note = "" if c.chosen in c.admissible else " (none admissible: default)"
        lines.append(f"| {c.family} | {c.n} | {c.chosen}{note} | {c.value:.{digits}g} | "
                     + "".join(f"{c.also[k]:.{digits}g} | " for k in also)
                     + " | ".join(f"{c.held_out[k]:.{digits}g}" for k in cands) + " |")
    lines.append(f"| **all, each family held out** | {sum(c.n for c in choices)} | – | **{pooled(choices):.{digits}g}** | "
                 + "".join(f"**{pooled(choices, key=k):.{digits}g}** | " for k in also)
                 + " | ".join(f"{pooled(choices, k):.{digits}g}" for k in cands) + " |")
    return "\n".join(lines)


def parse_pair(text: str, what: str) -> Tuple[str, str]:
    """``NAME=VALUE`` -> (NAME, VALUE); SystemExit naming the argument otherwise."""
    name, sep, value = text.partition("=")
    if not sep or not name or not value:
        raise SystemExit(f"{what} {text!r}: expected NAME=PATH")
    return name, value


def main(argv=None) -> List[FamilyChoice]:
    """CLI entry; returns the per-family choices."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--candidate", action="append", default=[], metavar="NAME=CSV", required=True,
                        help="a candidate's per-image table (at least two)")
    parser.add_argument("--metric", required=True, help="the column the rule ranks by, e.g. psnr or iou@0.5")
    parser.add_argument("--minimize", action="store_true", help="rank by the lowest mean instead")
    parser.add_argument("--reference", default=None, help="per-image CSV the --floor is relative to (e.g. PTI's)")
    parser.add_argument("--floor", default=None, metavar="KEY:RATIO", help="admissible: mean KEY >= RATIO x reference's")
    parser.add_argument("--default", default=None, help="the candidate chosen when none is admissible (first)")
    parser.add_argument("--also", action="append", default=[], metavar="KEY",
                        help="also report the choice's held-out mean of this column (repeatable)")
    parser.add_argument("--data", default=str(ROOT / "data" / "synthfaces"), help="SynthFaces root (ood/meta.json)")
    parser.add_argument("--out", default=None, help="also write the Markdown table here")
    args = parser.parse_args(argv)
    candidates = dict(parse_pair(c, "--candidate") for c in args.candidate)
    if len(candidates) < 2:
        parser.error("give at least two --candidate NAME=CSV")
    if (args.floor is None) != (args.reference is None):
        parser.error("--floor and --reference go together")
    floor = None
    if args.floor:
        key, _, ratio = args.floor.rpartition(":")
        try:
            floor = Floor(key, float(ratio), read_table(args.reference))
        except ValueError:
            parser.error(f"--floor {args.floor!r}: expected KEY:RATIO, e.g. edit_success:0.9")
    tables = {name: read_table(path) for name, path in candidates.items()}
    try:
        choices = select_per_family(tables, read_families(args.data), args.metric, not args.minimize, floor,
                                    args.default, args.also)
    except ValueError as exc:
        raise SystemExit(str(exc))
    text = markdown(choices, args.metric, floor, not args.minimize)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return choices


if __name__ == "__main__":
    main()
