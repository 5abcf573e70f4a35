"""Rehearsal of the real-face recipe at 1024 px: every file in its official layout (seeded random weights), then the
documented commands, cut to 1-2 steps, and a check of every output.

What it builds (``<work>/weights``, ``<work>/data``):

* ``stylegan2-ffhq-config-f.pt``: rosinality's layout (``g_ema``, ``g``, ``d``, ``latent_avg``; no ``meta``: the
  architecture is inferred from the shapes), config-f at 1024 px;
* ``e4e_ffhq_encode.pt``: e4e's layout (``state_dict`` with ``encoder.*`` / ``decoder.*``, the ``opts`` dict of an
  official run without this project's ``encoder_config`` / ``generator_config``, ``latent_avg`` (18, 512),
  ``discriminator_state_dict``); its decoder is the generator above;
* ``net_g_410000.pth``: an OOD-GAN-inversion stage-2 checkpoint in the official key layout (``params`` /
  ``params_ema`` with ``feats_conv.*``, ``modulation.*`` and the generator's style layers), levels 32..256 fed by
  IR-SE-50 taps f3..f0;
* ``79999_iter.pth`` (face-parsing.PyTorch BiSeNet state dict), ``model_ir_se50.pth`` (TreB1eN IR-SE-50),
  ``alexnet-owt-7be5be79.pth`` / ``vgg16-397923af.pth`` / ``vgg19-dcbb9e9d.pth`` (torchvision state dicts, classifier
  included), InterFaceGAN directions ``smile.pt`` (e4e's (1, 512) tensor) and ``age.npy`` (InterFaceGAN's array);
* ``data/celebahq``: ``CelebA-HQ-img/<idx>.jpg`` (1024 px, scikit-image's photos), ``image_list.txt`` (CelebA-HQ
  mapping, official columns) and ``list_eval_partition.txt`` (CelebA partitions): 1 test, 3 train, 1 val image;
  ``data/ffhq/images1024x1024/00000/0000N.png``; ``data/photos/astronaut.png`` (scikit-image's astronaut, 512 px).

What it runs (each command is read from the documentation it rehearses, so the docs cannot drift from what works;
``/w/`` and ``/data/...`` become the built folders, ``trainer=gpu`` becomes ``trainer=cpu``, and the step counts are
cut by appended overrides):

1. ``python -m networks.convert_ood_official net_g_410000.pth align_mask.pt`` (README, stage 2);
2. ``+exp=ood_blend_official`` (its config header): 2 training steps at 1024 px, batch 1 (the official batch 2
   takes about 16 GiB of host memory on a CPU), the official levels 32..256 (the official schedule cut to
   ``model.level_milestones={start:1,step:0}``: level 32 at step 0, all four at step 1), VGG19 + Gram, IR-SE-50 ID
   loss; the generator file given as ``model.generator_checkpoint`` (checked against the e4e decoder);
3. ``+exp=dhr data=celebahq generator=ffhq1024 ...`` (the real-face command of ``exp/dhr.yaml``'s header) on the
   CelebA-HQ test split via the official split files, 1 coarse + 1 weight + 2 feature steps, the edit grid cut to
   1 image x 3 strengths;
4. the same with ``mode=invert input=photos/ align=true`` on the astronaut (FFHQ alignment with dlib; without dlib
   ``align=false``, said in the report).

Checks: every hand-off, metric row (finite values, one per test image), picture (size), per-image inversion file and
the offline W&B run's entries (history keys, per-image table, summary means, config). Wall time and peak memory of
each command are printed. ``tests/test_rehearse_real.py`` (slow) runs it.

    python experiments/rehearse_real.py                       # in a temporary folder, removed at the end
    python experiments/rehearse_real.py --work /tmp/rehearsal --keep
"""
from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import math
import os
import re
import resource
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

SIZE = 1024
STYLE_DIM = 512
N_LATENT = 18
OFFICIAL_LEVELS = (32, 64, 128, 256)
TORCHVISION_FILES = {"alexnet": "alexnet-owt-7be5be79.pth", "vgg16": "vgg16-397923af.pth",
                     "vgg19": "vgg19-dcbb9e9d.pth"}
# CelebA-HQ index -> (CelebA file, partition): 0 train, 1 val, 2 test (CelebA's test files are 182638..202599)
# one test image: DHR at 1024 px is the rehearsal's longest command (about 4 min per image on 2 cores)
CELEBAHQ = {0: ("119614.jpg", 0), 1: ("182659.jpg", 2), 2: ("013387.jpg", 0), 3: ("150001.jpg", 0),
            4: ("165432.jpg", 1)}
# the steps a rehearsal keeps (appended to the documented commands)
DHR_CUTS = ["model.segmentation.coarse.steps=1", "model.refine.weight_steps=1", "model.refine.feature_steps=2"]
# the edit grid of test batch 0: 1 image, strengths -3 / 0 / +3 (default 4 images x 5 strengths: 60 renders at 1024 px)
GRID_CUTS = ["callbacks.edit_grid.n_images=1", "callbacks.edit_grid.n_columns=2"]


class RehearsalError(RuntimeError):
    """A documented command failed or one of its outputs is missing or wrong (the message says which)."""


# ------------------------------------------------------------------------------------------------ weights
def _seeded(seed: int, build: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build()


def official_ood_state(align_net, generator) -> Dict[str, torch.Tensor]:
    """The official OOD-GAN-inversion ``params_ema`` layout of an ``AlignMaskNet`` (the inverse of
    ``networks.convert_ood_official``'s key map), plus the keys the official save filter keeps that the converter
    drops: ``modulation.{i}.weight``, ``modulation.{i}.noiseInj.weight`` and the generator's ``*.modulation.*``
    style layers (``generator.`` prefix)."""
    state: Dict[str, torch.Tensor] = {}
    renames = ((re.compile(r"^levels\.(\d+)\.proj\.(weight|bias)$"), "feats_conv.{i}.{1}"),
               (re.compile(r"^levels\.(\d+)\.align\.body\.(\d+)\.res\.(.+)$"),
                "modulation.{i}.alignment.body.body.{1}.res_layer.{2}"),
               (re.compile(r"^levels\.(\d+)\.align\.body\.(\d+)\.shortcut\.(.+)$"),
                "modulation.{i}.alignment.body.body.{1}.shortcut_layer.{2}"),
               (re.compile(r"^levels\.(\d+)\.align\.blur\.kernel$"), "modulation.{i}.alignment.blur.kernel"))
    for key, value in align_net.state_dict().items():
        for pattern, template in renames:
            m = pattern.match(key)
            if m:
                index = 8 - int(math.log2(int(m.group(1))))  # official level index: 256 -> 0 ... 32 -> 3
                state[template.format(*m.groups(), i=index)] = value.clone()
                break
        else:
            raise RehearsalError(f"official_ood_state: no official name for {key}")
    for r in align_net.level_list:
        index = 8 - int(math.log2(r))
        state[f"modulation.{index}.weight"] = torch.zeros(1)
        state[f"modulation.{index}.noiseInj.weight"] = torch.zeros(1)
    for key, value in generator.state_dict().items():
        if ".modulation." in key:
            state[f"generator.{key}"] = value.clone()
    return state


def build_weights(folder: Path, seed: int = 0, log: Callable[[str], None] = print) -> Dict[str, Path]:
    """Write every weight file of the real-face recipe, in its official layout, with seeded random weights.

    Args:
        folder: output folder (created).
        seed: seeds every network (network k uses seed + k).
        log: progress printer.
    Returns:
        {name: path}: generator, e4e, ood_official, bisenet, arcface, alexnet, vgg16, vgg19, smile, age.
    """
    import torchvision

    from networks.align_mask import AlignMaskNet
    from networks.encoders import IRSEArcFace, build_encoder
    from networks.face_parsers import BiSeNet
    from networks.latent_discriminator import LatentCodesDiscriminator
    from networks.stylegan2 import Discriminator, Generator

    folder.mkdir(parents=True, exist_ok=True)
    paths: Dict[str, Path] = {}
    start = time.perf_counter()

    g = _seeded(seed, lambda: Generator(SIZE, STYLE_DIM, 8, channel_multiplier=2)).eval()
    d = _seeded(seed + 1, lambda: Discriminator(SIZE, channel_multiplier=2))
    latent_avg = g.mean_latent(4096, seed=seed).reshape(-1)
    g_state = {k: v.clone() for k, v in g.state_dict().items()}
    paths["generator"] = folder / "stylegan2-ffhq-config-f.pt"  # rosinality's convert_weight.py layout, no meta
    torch.save({"g_ema": g_state, "g": {k: v.clone() for k, v in g_state.items()}, "d": d.state_dict(),
                "latent_avg": latent_avg}, paths["generator"])
    del d

    encoder = _seeded(seed + 2, lambda: build_encoder("e4e", num_layers=50, mode="ir_se", n_styles=N_LATENT,
                                                      style_dim=STYLE_DIM, input_size=256))
    state = {f"encoder.{k}": v for k, v in encoder.state_dict().items()}
    state.update({f"decoder.{k}": v for k, v in g_state.items()})
    opts = {  # what e4e's Coach saves: vars(opts) of scripts/train.py (no encoder_config / generator_config)
        "exp_dir": "experiments/ffhq_encode", "dataset_type": "ffhq_encode", "encoder_type": "Encoder4Editing",
        "input_nc": 3, "label_nc": 0, "batch_size": 8, "test_batch_size": 4, "workers": 8, "test_workers": 4,
        "learning_rate": 0.0001, "optim_name": "ranger", "train_decoder": False, "start_from_latent_avg": True,
        "lpips_type": "alex", "lpips_lambda": 0.8, "id_lambda": 0.1, "l2_lambda": 1.0,
        "stylegan_weights": "pretrained_models/stylegan2-ffhq-config-f.pt", "stylegan_size": SIZE,
        "checkpoint_path": None, "max_steps": 300000, "w_discriminator_lambda": 0.1,
        "w_discriminator_lr": 2e-05, "r1": 10, "d_reg_every": 16, "use_w_pool": True, "w_pool_size": 50,
        "delta_norm": 2, "delta_norm_lambda": 0.0002, "progressive_steps": [0] + list(range(20000, 360000, 2000)),
        "progressive_start": 20000, "progressive_step_every": 2000, "save_training_data": False,
        "sub_exp_dir": None, "keep_optimizer": False, "resume_training_from_ckpt": None, "update_param_list": None,
        "device": "cuda:0"}
    disc = _seeded(seed + 3, lambda: LatentCodesDiscriminator(STYLE_DIM, 4))
    paths["e4e"] = folder / "e4e_ffhq_encode.pt"
    torch.save({"state_dict": state, "opts": opts, "latent_avg": latent_avg.reshape(1, -1).repeat(N_LATENT, 1),
                "discriminator_state_dict": disc.state_dict()}, paths["e4e"])

    # stage 2, official layout: levels 32..256 on the IR-SE-50 taps (256 <- f0 ... 32 <- f3), no conv biases
    net = _seeded(seed + 4, lambda: AlignMaskNet(
        generator_channels={r: g.channels[r] for r in OFFICIAL_LEVELS},
        tap_channels={f"f{i}": encoder.feature_channels[f"f{i}"] for i in range(4)},
        levels=list(OFFICIAL_LEVELS), encoder_input_size=256, bias=False))
    official = official_ood_state(net, g)
    paths["ood_official"] = folder / "net_g_410000.pth"
    torch.save({"params": official, "params_ema": {k: v.clone() for k, v in official.items()}},
               paths["ood_official"])
    del encoder, net, official, state

    paths["bisenet"] = folder / "79999_iter.pth"
    torch.save(_seeded(seed + 5, lambda: BiSeNet(n_classes=19)).state_dict(), paths["bisenet"])
    paths["arcface"] = folder / "model_ir_se50.pth"
    torch.save(_seeded(seed + 6, lambda: IRSEArcFace(112, 50, "ir_se")).state_dict(), paths["arcface"])
    for k, (name, file) in enumerate(TORCHVISION_FILES.items()):
        paths[name] = folder / file
        model = _seeded(seed + 7 + k, lambda: getattr(torchvision.models, name)(weights=None))
        torch.save(model.state_dict(), paths[name])
        del model

    gen = torch.Generator().manual_seed(seed + 10)
    paths["smile"] = folder / "smile.pt"  # e4e / HFGI's editings/interfacegan_directions/*.pt: a (1, 512) tensor
    torch.save(torch.randn(1, STYLE_DIM, generator=gen) / math.sqrt(STYLE_DIM), paths["smile"])
    paths["age"] = folder / "age.npy"  # InterFaceGAN's boundary files: a (1, 512) float array
    np.save(paths["age"], (torch.randn(1, STYLE_DIM, generator=gen) / math.sqrt(STYLE_DIM)).numpy())
    size = sum(p.stat().st_size for p in paths.values()) / 2 ** 30
    log(f"  weights: {len(paths)} files, {size:.2f} GiB in {folder} ({time.perf_counter() - start:.0f} s)")
    return paths


# ------------------------------------------------------------------------------------------------ data
def _photos() -> List[np.ndarray]:
    from skimage import data

    return [data.astronaut(), data.chelsea(), data.coffee(), data.rocket(), data.immunohistochemistry()]


def _square(image: np.ndarray, size: int) -> Image.Image:
    h, w = image.shape[:2]
    s = min(h, w)
    crop = image[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
    return Image.fromarray(crop).convert("RGB").resize((size, size), Image.BICUBIC)


def build_data(folder: Path) -> Dict[str, Path]:
    """CelebA-HQ (images + the official mapping and partition files), an FFHQ folder and a photo folder.

    Returns {celebahq, celebahq_images, mapping, partition, ffhq, photos, test_names}; ``test_names`` is a JSON file
    listing the CelebA-HQ test images' result names.
    """
    from skimage import data

    photos = _photos()
    celeba = folder / "celebahq"
    images = celeba / "CelebA-HQ-img"
    images.mkdir(parents=True, exist_ok=True)
    lines = ["idx         orig_idx    orig_file   proc_md5                          final_md5"]
    partition = []
    for idx, (orig, part) in CELEBAHQ.items():
        _square(photos[idx % len(photos)], SIZE).save(images / f"{idx}.jpg", quality=95)
        lines.append(f"{idx:<11} {int(orig[:-4]) - 1:<11} {orig:<11} {'0' * 32}  {'f' * 32}")
        partition.append(f"{orig} {part}")
    (celeba / "image_list.txt").write_text("\n".join(lines) + "\n")
    # CelebA's partition file lists every CelebA image; a few unrelated ones as well
    partition += ["000001.jpg 0", "162771.jpg 1", "202599.jpg 2"]
    (celeba / "list_eval_partition.txt").write_text("\n".join(partition) + "\n")
    ffhq = folder / "ffhq" / "images1024x1024" / "00000"
    ffhq.mkdir(parents=True, exist_ok=True)
    for i, photo in enumerate(photos[:4]):
        _square(photo, SIZE).save(ffhq / f"{i:05d}.png")
    photo_dir = folder / "photos"
    photo_dir.mkdir(parents=True, exist_ok=True)
    Image.fromarray(data.astronaut()).save(photo_dir / "astronaut.png")
    test = [str(i) for i, (_, part) in CELEBAHQ.items() if part == 2]
    return {"celebahq": celeba, "celebahq_images": images, "mapping": celeba / "image_list.txt",
            "partition": celeba / "list_eval_partition.txt", "ffhq": folder / "ffhq", "photos": photo_dir,
            "test_names": test}


# ------------------------------------------------------------------------------------------------ commands
def documented_command(path: Path, marker: str) -> List[str]:
    """The ``python experiments/run.py ...`` command of a config header (``#   python ...`` lines joined at their
    trailing backslashes) that contains ``marker``, as an argument list without ``python experiments/run.py``."""
    lines = [line[1:].strip() for line in path.read_text().splitlines() if line.startswith("#")]
    commands, current = [], ""
    for line in lines:
        if current or line.startswith("python experiments/run.py"):
            current += " " + line.rstrip("\\").strip()
            if not line.endswith("\\"):
                commands.append(current.strip())
                current = ""
    found = [c for c in commands if marker in c]
    if not found:
        raise RehearsalError(f"{path}: no documented 'python experiments/run.py' command with {marker!r}")
    words = shlex.split(found[0].split("  #")[0])
    return words[2:]


def localise(words: Sequence[str], weights: Mapping[str, Path], roots: Mapping[str, Path]) -> List[str]:
    """Point a documented command at the rehearsal's files: ``/w/<file>`` -> the built file of that name (an
    unknown file is an error), ``/data/<name>`` -> ``roots[name]``, ``trainer=gpu`` -> ``trainer=cpu``."""
    by_name = {p.name: p for p in weights.values()}

    def weight(m):
        name = m.group(1)
        if name not in by_name:
            raise RehearsalError(f"the documented command names /w/{name}, which the rehearsal does not build")
        return str(by_name[name])

    out = []
    for word in words:
        word = re.sub(r"/w/([\w.\-]+)", weight, word)
        word = re.sub(r"/data/(\w+)", lambda m: str(roots[m.group(1)]), word)
        out.append("trainer=cpu" if word == "trainer=gpu" else word)
    return out


@dataclass
class Step:
    """One command of the rehearsal and what it produced."""

    name: str
    argv: List[str]
    log: Path
    seconds: float = 0.0
    peak_rss_gib: float = 0.0
    checks: List[str] = field(default_factory=list)


def run_step(step: Step, env: Mapping[str, str], echo: Callable[[str], None]) -> Step:
    """Run one command (cwd = the repository), its output to ``step.log``; RehearsalError with the log's tail when it
    fails. Peak memory is the largest RSS of this script's children so far (getrusage)."""
    echo(f"[{step.name}] {' '.join(shlex.quote(a) for a in step.argv)}")
    start = time.perf_counter()
    with step.log.open("w") as out:
        proc = subprocess.run(step.argv, cwd=ROOT, env=dict(env), stdout=out, stderr=subprocess.STDOUT)
    step.seconds = time.perf_counter() - start
    step.peak_rss_gib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2 ** 20
    if proc.returncode != 0:
        tail = "\n".join(step.log.read_text(errors="replace").splitlines()[-40:])
        raise RehearsalError(f"[{step.name}] exited with {proc.returncode} after {step.seconds:.0f} s; log "
                             f"{step.log}:\n{tail}")
    echo(f"[{step.name}] done in {step.seconds:.0f} s (peak RSS of the commands so far {step.peak_rss_gib:.1f} GiB)")
    return step


# ------------------------------------------------------------------------------------------------ checks
def expect(condition: bool, message: str) -> None:
    """RehearsalError(message) unless ``condition``."""
    if not condition:
        raise RehearsalError(message)


def check_png(path: Path, size: Optional[tuple] = None) -> None:
    """``path`` is a readable PNG (of ``size`` (w, h) when given)."""
    expect(path.is_file(), f"missing picture {path}")
    with Image.open(path) as im:
        im.load()
        expect(size is None or im.size == tuple(size), f"{path} is {im.size}, expected {size}")


def wandb_run(run_dir: Path) -> Dict[str, object]:
    """The offline W&B run of ``run_dir``: {"dir", "history" (rows), "summary", "config"} read from its run file
    (``experiments/utils/wandb_offline.py``)."""
    from experiments.utils.wandb_offline import config, history, run_file, summary

    found = sorted(run_dir.glob("wandb/offline-run-*"))
    expect(len(found) == 1, f"{run_dir}: expected one offline W&B run, found {[p.name for p in found]}")
    path = run_file(found[0])
    return {"dir": found[0], "history": history(path), "summary": summary(path), "config": config(path)}


def check_convert(out: Path) -> List[str]:
    """The converted official stage-2 file: official maths, levels 32..256 on taps f3..f0, 1024 px channels."""
    from networks.align_mask import OFFICIAL_MATHS, load_align_mask

    net, meta = load_align_mask(out)
    expect(net.level_list == list(OFFICIAL_LEVELS), f"{out}: levels {net.level_list}")
    expect({r: net.taps[r] for r in OFFICIAL_LEVELS} == {32: "f3", 64: "f2", 128: "f1", 256: "f0"},
           f"{out}: taps {net.taps}")
    expect({k: net.config[k] for k in OFFICIAL_MATHS} == OFFICIAL_MATHS, f"{out}: not the official maths")
    n = sum(p.numel() for p in net.parameters())
    expect(n == 43_974_144, f"{out}: {n} parameters, the official model has 43,974,144")
    return [f"align_mask.pt: levels 32..256 on taps f3..f0, {n:,} parameters, official maths"]


def check_stage2(run_dir: Path, weights: Mapping[str, Path]) -> List[str]:
    """``+exp=ood_blend_official``: the hand-off (levels, taps, producer, generator fingerprint), checkpoints, the
    mask pictures and the W&B entries of 2 training steps."""
    from networks.align_mask import load_align_mask
    from networks.checkpoints import load_generator, weights_fingerprint

    handoff = run_dir / "align_mask.pt"
    expect(handoff.is_file(), f"{handoff} was not written")
    net, meta = load_align_mask(handoff)
    expect(net.level_list == list(OFFICIAL_LEVELS), f"{handoff}: levels {net.level_list}")
    expect(meta.get("global_step") == 2, f"{handoff}: global_step {meta.get('global_step')}, expected 2")
    g, _ = load_generator(weights["generator"])
    expect(meta.get("generator_sha1") == weights_fingerprint(g), f"{handoff}: generator fingerprint differs from "
           f"{weights['generator'].name}")
    expect((run_dir / "checkpoints" / "last.ckpt").is_file(), f"{run_dir}: no checkpoints/last.ckpt")
    run = wandb_run(run_dir)
    keys = {k for row in run["history"] for k in row}
    # the official recipe's terms with the real-file networks (a random stand-in would log vgg-random / id-random)
    for key in ("train/loss", "train/loss_d", "train/pixel", "train/vgg", "train/vgg_style", "train/id",
                "train/adv", "train/binarization", "train/area", "train/active_levels"):
        expect(key in keys, f"W&B run {run['dir']}: no {key} logged (keys: {sorted(keys)})")
    losses = [row["train/loss"] for row in run["history"] if "train/loss" in row]
    expect(len(losses) == 2 and all(math.isfinite(v) for v in losses), f"W&B train/loss rows: {losses}")
    levels = [row["train/active_levels"] for row in run["history"] if "train/active_levels" in row]
    expect(levels == [1, 4], f"W&B train/active_levels {levels}: expected level 32 at step 0, all four at step 1")
    expect(run["config"].get("model", {}).get("perceptual_kind") == "vgg19", "W&B config: perceptual_kind")
    return [f"align_mask.pt at step 2, levels 32..256, generator fingerprint = {weights['generator'].name}",
            f"W&B: train/loss {', '.join(f'{v:.4g}' for v in losses)} and its terms at both steps"]


def check_dhr(run_dir: Path, test_names: Sequence[str]) -> List[str]:
    """``+exp=dhr`` on CelebA-HQ: chain.json, one finite metric row per test image, summary, pictures at 1024 px
    (shrunk tiles in the grids), and the W&B dashboard entries."""
    chain = json.loads((run_dir / "chain.json").read_text())
    sources = {s["name"]: s["source"] for s in chain["stages"]}
    expect(sources == {"encoder": "configured", "align_mask": "configured"}, f"chain.json stages: {sources}")
    with (run_dir / "metrics" / "test.csv").open() as f:
        rows = list(csv.DictReader(f))
    expect(sorted(r["name"] for r in rows) == sorted(test_names),
           f"metrics/test.csv names {[r['name'] for r in rows]}, expected the CelebA-HQ test split {test_names}")
    for row in rows:
        for key in ("psnr", "ssim", "mse", "lpips", "mask_mean", "seconds"):
            expect(key in row and math.isfinite(float(row[key])), f"metrics/test.csv {row['name']}: {key}="
                   f"{row.get(key)}")
        expect(float(row["failed"]) == 0, f"metrics/test.csv: {row['name']} failed")
    expect((run_dir / "metrics" / "summary.md").read_text().count("|") > 10, "metrics/summary.md is empty")
    expect(json.loads((run_dir / "metrics" / "test.json").read_text()), "metrics/test.json is empty")
    for folder in ("masks", "reconstructions"):
        pngs = sorted((run_dir / folder).glob("*.png"))
        expect(pngs, f"{run_dir / folder}: no picture")
        for png in pngs:
            check_png(png)
    grid = run_dir / "edits" / "test_edit_grid_smile.png"
    check_png(grid)
    run = wandb_run(run_dir)
    logged = {k[:-len("/_type")]: row for row in run["history"] for k in row if k.endswith("/_type")}
    for key in ("test/reconstructions", "test/masks", "test/edit_grid/smile", "test/per_image"):
        expect(key in logged, f"W&B run {run['dir']}: {key} not logged (media: {sorted(logged)})")
    caption = logged["test/edit_grid/smile"]["test/edit_grid/smile/captions"][0]
    expect("e4e (stage 1) / ood_blend (stage 2) / dhr (stage 3)" in caption, f"edit grid caption: {caption}")
    table_row = logged["test/per_image"]
    table = json.loads((run["dir"] / "files" / table_row["test/per_image/path"]).read_text())
    expect(len(table["data"]) == len(test_names), f"W&B test/per_image: {len(table['data'])} rows")
    psnr = [float(r["psnr"]) for r in rows]
    mean = run["summary"].get("test_mean/psnr")
    expect(mean is not None and abs(mean - float(np.mean(psnr))) < 1e-3 * max(1.0, abs(mean)),
           f"W&B summary test_mean/psnr {mean} vs metrics/test.csv mean {np.mean(psnr)}")
    cfg = run["config"]
    expect(cfg["generator"]["size"] == SIZE and cfg["data"]["_target_"].endswith("CelebAHQDataModule"),
           "W&B config: generator / data")
    return [f"metrics/test.csv: {len(rows)} row{'' if len(rows) == 1 else 's'} (CelebA-HQ test split {', '.join(test_names)}), PSNR "
            f"{', '.join(f'{v:.2f}' for v in psnr)}; summary.md, test.json; masks/, reconstructions/, edit grid",
            "W&B: reconstructions, masks, edit grid (e4e / ood_blend / dhr rows), per-image table, "
            "test_mean/* = the CSV means, config"]


def check_invert(output: Path, name: str, aligned: bool) -> List[str]:
    """``mode=invert``: the manifest and every per-image file (1024 px pictures, W+ code (18, 512), refine state
    with the bf16 weight delta, edits at each strength)."""
    manifest = json.loads((output / "manifest.json").read_text())
    records = manifest.get("records") or manifest.get("images") or []
    statuses = {r["name"]: r["status"] for r in records}
    expect(statuses == {name: "ok"}, f"{output}/manifest.json: {statuses}")
    folder = output / name
    for png in ("input.png", "reconstruction.png", "ood_mask.png"):
        check_png(folder / png, (SIZE, SIZE))
    edits = sorted(p.name for p in (folder / "edits").glob("*.png"))
    expect(edits == ["smile_+3.png", "smile_-3.png"], f"{folder}/edits: {edits} (expected the smile edit at -3, +3)")
    for png in edits:
        check_png(folder / "edits" / png, (SIZE, SIZE))
    latent = torch.load(folder / "latent.pt", weights_only=True)
    expect(tuple(latent.shape) == (N_LATENT, STYLE_DIM), f"latent.pt shape {tuple(latent.shape)}")
    state = torch.load(folder / "refine_state.pt", weights_only=True)
    delta = state.get("weights_delta") or {}
    expect(delta and all(v.dtype == torch.bfloat16 for v in delta.values()), "refine_state.pt: no bf16 weight delta")
    expect(tuple(state["feature"].shape) == (256, 128, 128), f"refine_state.pt: f* {tuple(state['feature'].shape)}, "
           f"expected the 128 px block's output (256, 128, 128)")
    record = json.loads((folder / "record.json").read_text())
    expect(record.get("status") == "ok", f"record.json status {record.get('status')}")
    what = "aligned with dlib (FFHQ crop)" if aligned else "not aligned (align=false)"
    return [f"inversions/{name}: input / reconstruction / ood_mask at 1024 px, edits {', '.join(edits)}, latent.pt "
            f"(18, 512), refine_state.pt (bf16 weight delta, f* 256x128x128), record.json; {what}"]


# ------------------------------------------------------------------------------------------------ main
def dlib_available() -> bool:
    """dlib and its 68-point landmark model (``pip install "invertlab[align]"``) are importable."""
    return all(importlib.util.find_spec(m) is not None for m in ("dlib", "face_recognition_models"))


def rehearse(work: Path, seed: int = 0, echo: Callable[[str], None] = print) -> List[Step]:
    """Build the files and run the documented commands in ``work``; returns the steps (RehearsalError on a failure).
    """
    work.mkdir(parents=True, exist_ok=True)
    (work / "logs").mkdir(exist_ok=True)
    echo(f"Building the real-face recipe's files in {work} (seeded random weights, official layouts)")
    weights = build_weights(work / "weights", seed, echo)
    data = build_data(work / "data")
    echo(f"  data: CelebA-HQ {data['celebahq']} (image_list.txt, list_eval_partition.txt, test split "
         f"{', '.join(data['test_names'])}), FFHQ {data['ffhq']}, photos {data['photos']}")
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true", NO_ALBUMENTATIONS_UPDATE="1",
               WANDB_DATA_DIR=str(work / "wandb_data"), WANDB_CACHE_DIR=str(work / "wandb_cache"),
               WANDB_CONFIG_DIR=str(work / "wandb_config"), PYTHONUNBUFFERED="1")
    env.pop("WANDB_DIR", None)
    run = [sys.executable, "experiments/run.py"]
    configs = ROOT / "experiments" / "configs" / "exp"
    roots = {"celebahq": data["celebahq_images"], "ffhq": data["ffhq"]}
    steps: List[Step] = []

    # 1. the converter CLI (README, stage 2)
    converted = work / "align_mask_official.pt"
    step = run_step(Step("convert", [sys.executable, "-m", "networks.convert_ood_official",
                                     str(weights["ood_official"]), str(converted)], work / "logs" / "convert.log"),
                    env, echo)
    step.checks = check_convert(converted)
    steps.append(step)

    # 2. stage 2, official recipe, 2 steps at 1024 px
    stage2_dir = work / "runs" / "ood_blend_official"
    argv = localise(documented_command(configs / "ood_blend_official.yaml", "+exp=ood_blend_official"), weights, roots)
    # batch 1: the official batch 2 needs about 16 GiB of host memory for a CPU training step at 1024 px (measured)
    argv += [f"model.generator_checkpoint={weights['generator']}", "trainer=cpu", "trainer.max_steps=2",
             "data.batch_size=1",
             "model.level_milestones={start:1,step:0}", "trainer.log_every_n_steps=1", "data.val_count=1",
             "data.expected_count=null", "data.num_workers=0", "trainer.enable_progress_bar=false",
             f"paths.run_dir={stage2_dir}"]
    step = run_step(Step("stage2", run + argv, work / "logs" / "stage2.log"), env, echo)
    step.checks = check_stage2(stage2_dir, weights)
    steps.append(step)

    # 3. DHR on the CelebA-HQ test split (the real-face command of exp/dhr.yaml)
    dhr_words = localise(documented_command(configs / "dhr.yaml", "data=celebahq"), weights, roots)
    dhr_dir = work / "runs" / "dhr"
    argv = dhr_words + [f"data.mapping_file={data['mapping']}", f"data.partition_file={data['partition']}",
                        *DHR_CUTS, *GRID_CUTS, "data.num_workers=0", "trainer.enable_progress_bar=false",
                        f"paths.run_dir={dhr_dir}"]
    step = run_step(Step("dhr", run + argv, work / "logs" / "dhr.log"), env, echo)
    step.checks = check_dhr(dhr_dir, data["test_names"])
    steps.append(step)

    # 4. mode=invert align=true on the astronaut photo
    aligned = dlib_available()
    if not aligned:
        echo("  note: dlib is not installed (pip install \"invertlab[align]\"): mode=invert runs with align=false")
    invert_dir = work / "runs" / "invert"
    argv = dhr_words + ["mode=invert", f"input={data['photos']}", f"align={str(aligned).lower()}", *DHR_CUTS,
                        "data.num_workers=0", "trainer.enable_progress_bar=false", f"paths.run_dir={invert_dir}"]
    step = run_step(Step("invert", run + argv, work / "logs" / "invert.log"), env, echo)
    step.checks = check_invert(invert_dir / "inversions", "astronaut", aligned)
    steps.append(step)
    return steps


def report(steps: Sequence[Step], work: Path, total: float) -> str:
    """The rehearsal's summary: per command, its time, peak memory and what was checked."""
    lines = [f"Rehearsal of the real-face recipe at {SIZE} px: {len(steps)} commands passed in {total:.0f} s "
             f"(files in {work})"]
    for s in steps:
        lines.append(f"- {s.name}: {s.seconds:.0f} s (peak RSS of the commands so far {s.peak_rss_gib:.1f} GiB), log "
                     f"{s.log}")
        lines += [f"    {c}" for c in s.checks]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """CLI: ``python experiments/rehearse_real.py [--work DIR] [--keep] [--seed N]``; 0 when every check passes."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=None, help="folder for the files and runs (default: a new "
                        "temporary folder, removed at the end unless --keep)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    parser.add_argument("--seed", type=int, default=0, help="seed of every network's random weights")
    args = parser.parse_args(argv)
    temporary = args.work is None
    work = Path(tempfile.mkdtemp(prefix="rehearse_real_")) if temporary else args.work.resolve()
    if not temporary and work.exists() and any(work.iterdir()):
        print(f"error: --work {work} is not empty; choose a new folder", file=sys.stderr)
        return 2
    start = time.perf_counter()
    try:
        steps = rehearse(work, args.seed)
    except RehearsalError as err:
        print(f"REHEARSAL FAILED: {err}\n(files kept in {work})", file=sys.stderr)
        return 1
    print(report(steps, work, time.perf_counter() - start))
    if temporary and not args.keep:
        shutil.rmtree(work, ignore_errors=True)
        print(f"(removed {work}; pass --keep or --work DIR to keep the files)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
