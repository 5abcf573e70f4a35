"""Faults and bad input around `mode=invert` / run.py (issue 13): every case names what is wrong in one message,
nothing computed is lost or silently overwritten, SIGTERM stops at once, reruns respect the stored settings."""
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from experiments.utils import UserError
from experiments.utils.run_lock import LOCK_NAME
from callbacks.inversion_writer import InversionWriter
from networks.checkpoints import CheckpointError, atomic_target, safe_load, save_atomic
from tests.helpers.tiny_stage1 import export_tiny_stage1

pytestmark = pytest.mark.usefixtures("single_thread")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    return str(export_tiny_stage1(tmp_path_factory.mktemp("faults") / "encoder.pt").path)


def invert_overrides(encoder, photos, out, *extra):
    """A fast `mode=invert` command line on the tiny stage-1 file (e4e unless `extra` says otherwise)."""
    return ["+exp=dhr", "mode=invert", f"input={photos}", f"output={out}", "logger=csv", "trainer=cpu",
            "trainer.enable_progress_bar=false", "data.num_workers=0", "data.batch_size=2",
            f"model.encoder_checkpoint={encoder}", "model.align_mask_checkpoint=null", "chain.align_mask.enabled=false",
            "model.method=e4e",
            "model.edit.direction=null", "model.edits=[]", "model.lpips.allow_random_backbone=true",
            *extra]


def run_invert(compose_cfg, overrides, run_dir):
    from experiments.run import train

    return train(compose_cfg(overrides, run_dir=run_dir))


# ---------------------------------------------------------------------------------------------------- names
def test_two_files_with_one_name_are_refused_listing_the_clash(compose_cfg, make_images, encoder, tmp_path):
    make_images(tmp_path / "photos", ["face.png", "face.jpg", "sub/a.png", "sub/a.webp", "ok.png"], size=(64, 64))
    with pytest.raises(UserError, match=r"2 name\(s\) would share one output folder.*face.jpg and face.png.*"
                                        r"sub/a.png and sub/a.webp"):
        run_invert(compose_cfg, invert_overrides(encoder, tmp_path / "photos", tmp_path / "out"), tmp_path / "run")
    assert not (tmp_path / "out").exists()


def test_input_and_masks_paths_are_checked_first(compose_cfg, make_images, encoder, tmp_path):
    make_images(tmp_path / "photos", ["a.png"], size=(64, 64))
    (tmp_path / "empty").mkdir()
    cases = [(tmp_path / "photos" / "a.png", [], r"input=.*a.png is a file; input= takes a folder"),
             (tmp_path / "nowhere", [], r"input=.*nowhere: no such folder"),
             (tmp_path / "empty", [], r"contains no .* images \(set input="),
             (tmp_path / "photos", [f"masks={tmp_path / 'nonexistent'}"], r"masks=.*nonexistent: no such folder")]
    for photos, extra, message in cases:
        with pytest.raises(Exception, match=message):
            run_invert(compose_cfg, invert_overrides(encoder, photos, tmp_path / "out", *extra), tmp_path / "run")


def test_a_symlink_loop_lists_each_image_once(tmp_path, make_images):
    from datamodules.image_folder import list_images

    make_images(tmp_path / "photos", ["a.png", "sub/b.png"])
    os.symlink(".", tmp_path / "photos" / "self")
    os.symlink("..", tmp_path / "photos" / "sub" / "up")
    assert [p.name for p in list_images(tmp_path / "photos")] == ["a.png", "b.png"]


# ---------------------------------------------------------------------------------------------------- reruns
def test_rerun_with_other_settings_is_refused_then_redone_with_overwrite(compose_cfg, make_images, encoder, tmp_path):
    make_images(tmp_path / "photos", ["a.png", "b.png"], size=(64, 64))
    out = tmp_path / "out"
    base = invert_overrides(encoder, tmp_path / "photos", out)
    run_invert(compose_cfg, base, tmp_path / "run1")
    record = json.loads((out / "a" / "record.json").read_text())
    assert record["settings"]["model.method"] == "e4e" and record["status"] == "ok"
    stamp = (out / "a" / "record.json").stat().st_mtime_ns
    run_invert(compose_cfg, base, tmp_path / "run2")  # same settings: nothing is redone
    assert (out / "a" / "record.json").stat().st_mtime_ns == stamp
    other = [*base, "model.method=feature_only", "model.feature_only.steps=2"]
    with pytest.raises(UserError, match=r"holds 2 image\(s\) made with other settings.*model.method: e4e -> "
                                        r"feature_only.*overwrite=true"):
        run_invert(compose_cfg, other, tmp_path / "run3")
    assert (out / "a" / "record.json").stat().st_mtime_ns == stamp
    run_invert(compose_cfg, [*other, "overwrite=true"], tmp_path / "run4")
    for name in ("a", "b"):
        record = json.loads((out / name / "record.json").read_text())
        assert record["settings"]["model.method"] == "feature_only" and "refine_state.pt" in record["files"]


def test_failed_images_and_leftovers_are_redone_on_rerun(tmp_path):
    writer = InversionWriter(tmp_path, {"model.method": "dhr"})
    image = torch.zeros(3, 8, 8)
    writer.write("a", {"input": image}, {}, torch.zeros(2, 4), None)
    writer.write("b", {}, {}, torch.zeros(0), None, status="failed", reason="the loss diverged")
    (tmp_path / "c").mkdir()
    leftover = tmp_path / "c" / ".refine_state.pt.k2j3.tmp"  # a kill during a save
    leftover.write_bytes(b"")
    assert writer.is_done("a") and not writer.is_done("b") and not writer.is_done("c")
    assert not InversionWriter(tmp_path, {"model.method": "pti"}).is_done("a")
    writer.write("c", {"input": image}, {}, torch.zeros(2, 4), None)
    assert not leftover.exists() and writer.is_done("c")
    writer.write("b", {"input": image}, {}, torch.zeros(2, 4), None)  # the retry replaces the failed record
    assert writer.is_done("b") and json.loads((tmp_path / "b" / "record.json").read_text())["reason"] == ""
    manifest = json.loads(writer.write_manifest(skipped=["broken.png"]).read_text())
    assert manifest["ok"] == 3 and manifest["skipped"] == ["broken.png"]


def test_manifest_lists_unreadable_inputs(compose_cfg, make_images, encoder, tmp_path):
    make_images(tmp_path / "photos", ["a.png", "b.png"], size=(64, 64))
    (tmp_path / "photos" / "broken.png").write_bytes(b"not an image")
    out = tmp_path / "out"
    with pytest.warns(UserWarning, match="unreadable"):
        manifest = run_invert(compose_cfg, invert_overrides(encoder, tmp_path / "photos", out), tmp_path / "run")
    data = json.loads(manifest.read_text())
    assert data["ok"] == 2 and data["skipped"] == ["broken.png"]


def test_evaluate_refuses_to_replace_metrics_of_other_settings(compose_cfg, tmp_path):
    from experiments.utils.inputs import check_previous_metrics
    from omegaconf import OmegaConf

    cfg = compose_cfg(["+exp=dhr"], run_dir=tmp_path / "run")
    run_dir = tmp_path / "run"
    (run_dir / "metrics").mkdir(parents=True)
    (run_dir / "metrics" / "test.csv").write_text("name,psnr\n")
    OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
    check_previous_metrics(cfg, run_dir, overwrite=False)  # same settings: a rerun may replace them
    other = compose_cfg(["+exp=dhr", "model.method=pti"], run_dir=run_dir)
    with pytest.raises(UserError, match=r"metrics/ of an earlier evaluation.*model.method: dhr -> pti.*overwrite=true"):
        check_previous_metrics(other, run_dir, overwrite=False)
    check_previous_metrics(other, run_dir, overwrite=True)


# ---------------------------------------------------------------------------------------------------- concurrency
def test_concurrent_atomic_writes_of_one_path_never_collide(tmp_path):
    target, errors = tmp_path / "record.json", []

    def write(tag):
        for i in range(150):
            try:
                with atomic_target(target) as tmp:
                    tmp.write_text(json.dumps({"tag": tag, "i": i}))
            except Exception as err:  # noqa: BLE001 - the test counts every failure
                errors.append(err)

    threads = [threading.Thread(target=write, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and json.loads(target.read_text())["i"] == 149
    assert [p.name for p in tmp_path.iterdir()] == ["record.json"]


def test_a_second_run_on_one_output_folder_is_refused(compose_cfg, make_images, encoder, tmp_path):
    make_images(tmp_path / "photos", ["a.png"], size=(64, 64))
    out = tmp_path / "out"
    out.mkdir()
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        import socket

        (out / LOCK_NAME).write_text(json.dumps({"host": socket.gethostname(), "pid": other.pid,
                                                 "started": "now"}))
        with pytest.raises(UserError, match=rf"Output folder {out} is in use by another run \(pid {other.pid}.*"
                                            r"another output="):
            run_invert(compose_cfg, invert_overrides(encoder, tmp_path / "photos", out), tmp_path / "run")
    finally:
        other.kill()
    assert not (out / "a").exists()


# ---------------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("value,message", [("abc", r"data.batch_size='abc': must be an integer >= 1"),
                                           ("0", r"data.batch_size=0: must be an integer >= 1")])
def test_bad_batch_size_is_named(compose_cfg, make_images, encoder, tmp_path, value, message):
    make_images(tmp_path / "photos", ["a.png"], size=(64, 64))
    overrides = invert_overrides(encoder, tmp_path / "photos", tmp_path / "out", f"data.batch_size={value}")
    with pytest.raises(UserError, match=message):
        run_invert(compose_cfg, overrides, tmp_path / "run")


def test_unwritable_output_is_refused_before_any_image(compose_cfg, make_images, encoder, tmp_path):
    make_images(tmp_path / "photos", ["a.png"], size=(64, 64))
    blocker = tmp_path / "file"
    blocker.write_text("a file where a folder should be")  # unwritable even for root, unlike chmod
    with pytest.raises(UserError, match=r"output=.*file/out is not writable"):
        run_invert(compose_cfg, invert_overrides(encoder, tmp_path / "photos", blocker / "out"), tmp_path / "run")


def test_bad_ckpt_paths_get_one_message(compose_cfg, tmp_path, encoder):
    from experiments.utils.inputs import check_ckpt_path

    text = tmp_path / "notes.txt"
    text.write_text("hello world\n")
    with pytest.raises(UserError, match=r"ckpt_path=.*notes.txt: .* is not a readable torch checkpoint") as err:
        check_ckpt_path(str(text))
    assert "run code" not in str(err.value)
    with pytest.raises(UserError, match=r"is not a Lightning checkpoint \(found: .*state_dict.*model.encoder_checkpoint"):
        check_ckpt_path(encoder)
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "x": Evil()}, evil)
    with pytest.raises(UserError, match=r"posix.system"):
        check_ckpt_path(str(evil))
    with pytest.raises(UserError, match="no such file"):
        check_ckpt_path(str(tmp_path / "missing.ckpt"))


class Evil:
    """Unpickling this runs ``os.system`` (never done here: weights_only refuses it)."""

    def __reduce__(self):
        return os.system, ("echo pwned",)


class Harmless:
    pass


def test_checkpoint_messages_say_what_the_file_is(tmp_path):
    (tmp_path / "text.pt").write_text("a: 1\n")
    torch.save({"x": Evil()}, tmp_path / "evil.pt")
    torch.save({"x": Harmless()}, tmp_path / "object.pt")
    with pytest.raises(CheckpointError, match=r"text.pt is not a readable torch checkpoint") as err:
        safe_load(tmp_path / "text.pt")
    assert "pickled" not in str(err.value)
    with pytest.raises(CheckpointError, match=r"pickled Python objects \(posix.system\).*Nothing here loads") as err:
        safe_load(tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match=r"objects \(.*Harmless\).*set model.checkpoint_trust=true"):
        safe_load(tmp_path / "object.pt", trust_key="model.checkpoint_trust")
    assert isinstance(safe_load(tmp_path / "object.pt", trust=True)["x"], Harmless)


def test_stage3_checkpoint_errors_do_not_offer_a_missing_trust_option(tmp_path):
    from lightning_modules.stage3_module import RefineModule

    torch.save({"x": Harmless()}, tmp_path / "object.pt")
    with pytest.raises(CheckpointError) as err:
        RefineModule(encoder_checkpoint=str(tmp_path / "object.pt"), method="e4e",
                     lpips=dict(allow_random_backbone=True))
    assert "checkpoint_trust" not in str(err.value) and "Harmless" in str(err.value)


def test_full_disk_during_torch_save_is_an_oserror_naming_the_file(tmp_path, monkeypatch):
    def full(obj, f, *args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:858] . PytorchStreamWriter failed writing file "
                           "data/0: file write failed")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(OSError, match=r"could not write .*state.pt: .*PytorchStreamWriter failed writing"):
        save_atomic({"a": torch.zeros(1)}, tmp_path / "state.pt")
    assert list(tmp_path.iterdir()) == []


def test_a_corrupt_ground_truth_mask_skips_only_that_images_metrics(compose_cfg, make_images, encoder, tmp_path):
    make_images(tmp_path / "photos", ["a.png", "b.png"], size=(64, 64))
    masks = tmp_path / "masks"
    masks.mkdir()
    Image.fromarray(np.full((64, 64), 255, np.uint8)).save(masks / "a.png")
    (masks / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    out = tmp_path / "out"
    with pytest.warns(UserWarning, match=r"cannot read the ground-truth mask .*b.png"):
        run_invert(compose_cfg, invert_overrides(encoder, tmp_path / "photos", out, f"masks={masks}"),
                   tmp_path / "run")
    assert (out / "a" / "metrics.json").is_file() and not (out / "b" / "metrics.json").exists()
    assert json.loads((out / "b" / "record.json").read_text())["status"] == "ok"


# ---------------------------------------------------------------------------------------------------- SIGTERM
def test_sigterm_mid_batch_stops_keeps_finished_images_and_the_rerun_completes(make_images, encoder, tmp_path):
    """A real `python experiments/run.py ... mode=invert` process gets SIGTERM while it refines an image (150
    feature steps: about 6 s per image at one thread, 13 s on a loaded machine)."""
    make_images(tmp_path / "photos", [f"img{i}.png" for i in range(3)], size=(64, 64))
    out = tmp_path / "out"
    args = [sys.executable, str(ROOT / "experiments" / "run.py"),
            *invert_overrides(encoder, tmp_path / "photos", out, "data.batch_size=1", "model.method=feature_only",
                              "model.feature_only.steps=150", "model.refine.feature_resolution=16"),
            f"paths.run_dir={tmp_path / 'run'}"]
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled")
    proc = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 240
        while not list(out.rglob("record.json")) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        time.sleep(1.0)  # now inside the next image's refinement
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=30)
        stopped_after = time.monotonic() - sent
    finally:
        proc.kill()
    done = sorted(p.parent.name for p in out.rglob("record.json"))
    assert proc.returncode == 143, output[-3000:]
    assert stopped_after < 30 and 1 <= len(done) < 3
    assert "Stopped by SIGTERM" in output and "Continue with:" in output and f"Kept: {len(done)} finished" in output
    stamps = {name: (out / name / "record.json").stat().st_mtime_ns for name in done}
    rerun = subprocess.run([*args[:-1], f"paths.run_dir={tmp_path / 'run2'}"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert sorted(p.parent.name for p in out.rglob("record.json")) == [f"img{i}" for i in range(3)]
    assert all((out / n / "record.json").stat().st_mtime_ns == s for n, s in stamps.items())
    assert not list(out.rglob("*.tmp"))


def test_sigterm_stops_trainer_test_at_once(tmp_path):
    """`trainer.test` inside the run guard: SIGTERM during batch 0 ends the run with status 143 before batch 1."""
    import pytorch_lightning as pl
    from torch.utils.data import DataLoader

    from experiments.utils.distributed import RankFailureGuard

    class Slow(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.seen = []

        def test_step(self, batch, batch_idx):
            self.seen.append(batch_idx)
            if batch_idx == 0:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)  # interrupted at once by the guard's handler

    module = Slow()
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    start = time.monotonic()
    with pytest.raises(SystemExit) as exit_info:
        with RankFailureGuard(tmp_path, ["+exp=dhr"], mode="evaluate"):
            trainer.test(module, DataLoader(torch.zeros(4, 1), batch_size=1), verbose=False)
    assert exit_info.value.code == 143 and module.seen == [0] and time.monotonic() - start < 5
    assert signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None) or callable(signal.getsignal(signal.SIGTERM))


# ---------------------------------------------------------------------------------------------------- divergence
def test_a_diverging_refinement_is_failed_with_its_reason(compose_cfg, make_images, encoder, tmp_path):
    """`model.refine.feature_lr=1e9` used to write 5 dB results with loss 1e18 as `ok`."""
    make_images(tmp_path / "photos", ["a.png"], size=(64, 64))
    out = tmp_path / "out"
    run_invert(compose_cfg, invert_overrides(encoder, tmp_path / "photos", out, "model.method=feature_only",
                                             "model.feature_only.steps=20", "model.feature_only.lr=1e9"),
               tmp_path / "run")
    record = json.loads((out / "a" / "record.json").read_text())
    assert record["status"] == "failed" and "diverged" in record["reason"] and "divergence_factor" in record["reason"]
    assert not (out / "a" / "reconstruction.png").exists()


def test_divergence_check_leaves_converging_images_alone_and_can_be_off():
    from networks.refine.hybrid import RefineConfig, hybrid_refine
    from networks.stylegan2 import Generator

    torch.manual_seed(0)
    G = Generator(32, style_dim=16, n_mlp=1, channel_multiplier=1, channel_max=16)
    codes = G.mean_latent(64).reshape(1, 1, -1).repeat(2, G.n_latent, 1)
    images = torch.rand(2, 3, 32, 32) * 2 - 1

    def mse(x, y, mask=None):
        return (x - y).pow(2).flatten(1).mean(1)

    mask = torch.ones(2, 1, 32, 32)
    mask[:, :, 16:] = 0
    fine = hybrid_refine(G, codes, images, mask, mse, RefineConfig(weight_steps=3, feature_steps=5,
                                                                   feature_resolution=8, perceptual=0.0))
    assert not fine.failed.any() and not fine.diverged.any()
    wild = dict(weight_steps=0, feature_steps=5, feature_lr=1e9, feature_resolution=8, perceptual=0.0)
    assert hybrid_refine(G, codes, images, mask, mse, RefineConfig(**wild)).diverged.all()
    off = hybrid_refine(G, codes, images, mask, mse, RefineConfig(**wild, divergence_factor=None))
    assert not off.diverged.any()
    with pytest.raises(ValueError, match="divergence_factor"):
        RefineConfig(divergence_factor=0.5)


@pytest.mark.parametrize("override,message", [("model.segmentation.coarse.steps=-3", r"coarse.steps=-3; must be an "
                                                                                        r"integer >= 1"),
                                              ("model.segmentation.coarse.lr=0", r"coarse.lr=0; must be a number > 0")])
def test_bad_segmentation_numbers_fail_before_any_image(compose_cfg, make_images, encoder, tmp_path, override,
                                                        message):
    from experiments.utils.errors import describe_user_error

    make_images(tmp_path / "photos", ["a.png"], size=(64, 64))
    with pytest.raises(Exception) as err:
        run_invert(compose_cfg, invert_overrides(encoder, tmp_path / "photos", tmp_path / "out", "model.method=dhr",
                                                 override), tmp_path / "run")
    assert describe_user_error(err.value) is not None
    assert re.search(message, describe_user_error(err.value))
    assert not (tmp_path / "out").exists()
