"""Entry point of every experiment: `python experiments/run.py +exp=<name> [group=option ...] [key=value ...]`.

Runs from the repository root without installing (the root is put on sys.path). `--help` lists the
experiments, config groups and main keys.

Flow: check the command line -> compose the config (Hydra) -> check the run directory -> seed ->
instantiate `data`, `model`, `callbacks`, `logger`, `trainer`, then by `mode`:
- `train` (default): `trainer.fit(model, datamodule, ckpt_path)` -> on rank zero `model.export_handoff(run_dir)`
  (e.g. `<run_dir>/generator.pt`) and its path printed -> with `evaluate=true`, `trainer.test` on the test split,
  per-image metrics in `<run_dir>/metrics/`;
- `evaluate`: only that `trainer.test` (stage 3; or a trained run re-tested from `resume=true` / `ckpt_path`);
- `invert`: `trainer.predict` over the images in `input=DIR`, per-image results under `output=DIR`.

Run directory (`paths.run_dir`): `outputs/<task_name>/<YYYY-mm-dd_HH-MM-SS-ffffff>` by default (the
SLURM job id instead of the time stamp under SLURM, so all ranks of one job agree). Choose it with
`paths.run_dir=PATH` (with torchrun outside SLURM, pass it explicitly). Under multirun each job gets
`<sweep dir>/<job number>`; run.py sets `paths.run_dir` to Hydra's actual output dir in every case. It receives `config.yaml` (resolved), `.hydra/` (unresolved config, overrides),
`run.log`, `checkpoints/`, `wandb/` and the stage's hand-off file.

Resume / overwrite (see experiments/utils/run_dir.py): if the run directory already holds an earlier
run's outputs (`checkpoints/`, `*.pt`), the run stops unless `resume=true` (continue from
`checkpoints/last.ckpt`, re-using the W&B run id) or `overwrite=true` (delete those outputs, start over).
`ckpt_path=PATH` starts fit() from any Lightning checkpoint.

W&B: offline unless `WANDB_MODE=online`; its files go to the run directory (`WANDB_DIR`), and the run
is finished at the end of every job (multirun safety). Runs are named and tagged by experiment, method, data and
generator, the jobs of one multirun form one W&B group, and the run config holds the hand-offs' provenance
(experiments/utils/wandb_run.py).
"""
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("PROJECT_ROOT", str(ROOT))
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
_USER_WANDB_DIR = os.environ.get("WANDB_DIR")  # a user's explicit choice wins over the per-run default

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from hydra.types import RunMode  # noqa: E402
from omegaconf import DictConfig, OmegaConf, open_dict  # noqa: E402

from experiments.utils import (  # noqa: E402
    UserError,
    apply_run_dir_plan,
    get_logger,
    hpc_checkpoints,
    instantiate_callbacks,
    instantiate_loggers,
    plan_run_dir,
    previous_wandb_id,
    report_user_errors,
)
from callbacks.handoff_artifact import log_handoff_artifact  # noqa: E402
from callbacks.inversion_writer import InversionWriter  # noqa: E402
from lightning_modules.contracts import KeepsTestTable, SummarisesTests, WritesInversions  # noqa: E402
from experiments.utils.chain import run_chain  # noqa: E402
from experiments.utils.cli import available_exps, check_command_line  # noqa: E402
from experiments.utils.distributed import RankFailureGuard  # noqa: E402
from experiments.utils.inputs import (check_ckpt_path, check_int, check_invert_input,  # noqa: E402
                                      check_previous_metrics, check_settings, check_writable)
from experiments.utils.run_lock import run_dir_lock  # noqa: E402
from experiments.utils.wandb_run import apply_wandb_identity, handoff_provenance  # noqa: E402

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
MODES = ("train", "evaluate", "invert")
log = get_logger(__name__)


def save_run_configs(cfg: DictConfig, run_dir: Path, command: list[str]) -> None:
    """Writes `config.yaml` (resolved) and `.hydra/{config,overrides}.yaml` (as composed; `command` = the
    overrides) into `run_dir`."""
    OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
    (run_dir / ".hydra").mkdir(exist_ok=True)
    OmegaConf.save(cfg, run_dir / ".hydra" / "config.yaml")
    OmegaConf.save(OmegaConf.create(list(command)), run_dir / ".hydra" / "overrides.yaml")


def finish_wandb() -> None:
    """Finishes the active W&B run, if any, so that the next multirun job starts its own."""
    wandb = sys.modules.get("wandb")  # never import wandb just to find out there is nothing to finish
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish()


def train(cfg: DictConfig) -> Path | None:
    """Runs one experiment from a composed config (with a `chain`: its earlier stages first); returns the hand-off
    file path (rank zero) or None."""
    from pytorch_lightning.utilities import rank_zero_only

    if HydraConfig.get().runtime.choices.get("exp") is None:
        raise UserError(f"No experiment given: add +exp=<name>. Available: {', '.join(available_exps(CONFIG_DIR))}.")
    # Hydra's output dir is the truth: it differs from paths.run_dir under multirun and in DDP child processes.
    run_dir = Path(HydraConfig.get().runtime.output_dir).resolve()
    command = list(HydraConfig.get().overrides.task)
    check_torchrun_run_dir(command)
    is_zero = rank_zero_only.rank == 0
    # the jobs of one multirun form one W&B group, named after the sweep dir (a chain's trained stages too)
    group = Path(HydraConfig.get().sweep.dir).name if HydraConfig.get().mode == RunMode.MULTIRUN else None

    def stage_in_group(stage_cfg: DictConfig, stage_dir: Path, overrides: list[str]) -> Path | None:
        apply_wandb_identity(stage_cfg, group=group)
        return run_stage(stage_cfg, stage_dir, overrides)

    with run_dir_lock(run_dir, enabled=is_zero):
        if cfg.get("chain"):
            records = run_chain(cfg, run_dir, command, CONFIG_DIR, stage_in_group if group else run_stage,
                                is_zero=is_zero)
            if is_zero:
                for rec in records:
                    log.info(f"Chain stage {rec.name}: {rec.source} {rec.path}")
        return stage_in_group(cfg, run_dir, command) if group else run_stage(cfg, run_dir, command)


def check_torchrun_run_dir(command: list[str]) -> None:
    """Under torchrun with several processes (outside SLURM), every process would pick its own time-stamped run
    directory: require an explicit `paths.run_dir`."""
    if "TORCHELASTIC_RUN_ID" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    if os.environ.get("SLURM_JOB_ID") or any(o.lstrip("+").startswith(("paths.run_dir=", "hydra.run.dir="))
                                              for o in command):
        return
    raise UserError("Under torchrun every process must write one run directory: pass paths.run_dir=DIR "
                    "(the same on every node).")


def run_stage(cfg: DictConfig, run_dir: Path, command: list[str]) -> Path | None:
    """Runs one stage in `run_dir` (train / evaluate / invert by `cfg.mode`); returns the hand-off path (rank zero,
    mode=train) or None. `command`: the overrides that composed `cfg` (saved in `.hydra/overrides.yaml`)."""
    import pytorch_lightning as pl
    from pytorch_lightning.utilities import rank_zero_only

    finish_wandb()  # a chain's earlier stage had its own W&B run
    with open_dict(cfg):
        cfg.paths.run_dir = str(run_dir)
    apply_wandb_identity(cfg)  # W&B run name and tags: experiment, method, data, generator
    OmegaConf.to_container(cfg, resolve=True)  # fail now on ??? values / bad interpolations, not mid-run
    is_zero = rank_zero_only.rank == 0

    plan = plan_run_dir(run_dir, resume=cfg.resume, overwrite=cfg.overwrite)
    check_ckpt_path(cfg.get("ckpt_path"))
    ckpt_path = cfg.get("ckpt_path") or plan.ckpt_path
    check_int(cfg, "data.batch_size", 1)
    check_int(cfg, "data.num_workers", 0)
    if plan.ckpt_path and OmegaConf.select(cfg, "logger.wandb") is not None and cfg.logger.wandb.get("id") is None:
        cfg.logger.wandb.id = previous_wandb_id(run_dir)  # continue the same W&B run
    if not _USER_WANDB_DIR:
        os.environ["WANDB_DIR"] = str(run_dir)

    if cfg.get("seed") is not None:
        pl.seed_everything(cfg.seed, workers=True)
    mode = cfg.get("mode") or "train"
    if mode not in MODES:
        raise UserError(f"mode={mode} is not a mode; choose one of {', '.join(MODES)}.")
    # Build everything before touching the run directory: a bad setting fails without side effects.
    datamodule = invert_datamodule(cfg) if mode == "invert" else hydra.utils.instantiate(cfg.data)
    model = hydra.utils.instantiate(cfg.model)
    if mode == "invert" and not isinstance(model, WritesInversions):
        raise UserError(f"mode=invert runs a stage-3 experiment (+exp=dhr, pti, feature_only, ...); "
                        f"{type(model).__name__} does not write inversions.")
    callbacks = instantiate_callbacks(cfg.get("callbacks"))
    writer = None
    if mode == "invert":  # the per-image writer: a callback; the module only returns results (WritesInversions)
        writer = InversionWriter(str(cfg.output), model.result_settings())
        callbacks.append(writer)
    loggers = instantiate_loggers(cfg.get("logger"))
    trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    with_wandb = any(type(lg).__name__ == "WandbLogger" for lg in loggers)
    if mode == "evaluate":
        check_previous_metrics(cfg, run_dir, overwrite=bool(cfg.overwrite))
    if mode == "invert":
        check_enough_images(cfg.input, trainer.world_size)
        check_writable(writer.out_dir, "output")
        redo = check_settings(writer, redo=bool(cfg.overwrite))
        if redo and is_zero:
            log.warning(f"overwrite=true: {len(redo)} image(s) made with other settings are done again")

    log.info(f"Run directory: {run_dir}")
    if is_zero:
        for path in apply_run_dir_plan(plan):
            log.warning(f"overwrite=true: deleted {path}")
        save_run_configs(cfg, run_dir, command)
        for logger in loggers:
            logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
            if type(logger).__name__ == "WandbLogger":  # where each loaded hand-off came from, and what made it
                logger.log_hyperparams({"handoff_provenance": handoff_provenance(cfg, run_dir)})
        if with_wandb:
            log_used_handoffs(cfg)
    if ckpt_path:
        log.info(f"Starting from checkpoint {ckpt_path}")

    if mode == "evaluate":  # stage 3 (nothing to train), or a trained stage re-tested from its checkpoint
        evaluate(trainer, model, datamodule, run_dir, ckpt_path=str(ckpt_path) if ckpt_path else None)
        return None
    if mode == "invert":
        own_lock = is_zero and writer.out_dir.resolve() != run_dir  # the run directory is locked already
        with run_dir_lock(writer.out_dir, enabled=own_lock, what="Output folder", key="output"):
            return invert(trainer, model, datamodule, writer)
    # a crash or Ctrl-C leaves fit() by an exception / SystemExit; main()'s RankFailureGuard prints how to continue
    trainer.fit(model, datamodule=datamodule, ckpt_path=str(ckpt_path) if ckpt_path else None)
    path = None
    if trainer.is_global_zero:
        path = Path(model.export_handoff(run_dir))
        print(f"Hand-off written: {path}")
        # Finished: SLURM requeue checkpoints are stale now, and under SLURM Lightning's trainer.test(ckpt_path=None)
        # would load the newest one instead of testing the trained weights.
        for stale in hpc_checkpoints(run_dir):
            stale.unlink()
        if with_wandb:
            log_handoff_artifact(path)  # online only (see callbacks/handoff_artifact.py)
    trainer.strategy.barrier("handoff")  # the other ranks may load the hand-off next (a chain's next stage)
    if cfg.get("evaluate"):  # every rank takes part in trainer.test
        evaluate(trainer, model, datamodule, run_dir)
    return path


HANDOFF_KEYS = (("model.generator_checkpoint", "generator"), ("model.encoder_checkpoint", "encoder"),
                ("model.align_mask_checkpoint", "align_mask"))


def log_used_handoffs(cfg: DictConfig) -> None:
    """Logs the hand-off files this stage loads as W&B input artifacts (online runs only), so W&B's lineage graph
    links the stages of a chain."""
    for key, kind in HANDOFF_KEYS:
        value = OmegaConf.select(cfg, key)
        if value and Path(str(value)).expanduser().is_file():
            log_handoff_artifact(value, kind, used=True)


def invert_datamodule(cfg: DictConfig):
    """`mode=invert`: a FolderDataModule over `input` (every PNG / JPEG / WebP image; FFHQ-aligned first with
    `align=true`), at the generator's size; with `masks=DIR` its batches carry the ground-truth `ood_mask`."""
    check_invert_input(cfg)
    spec = OmegaConf.load(CONFIG_DIR / "data" / "folder.yaml")
    spec.root, spec.align, spec.resolution = str(Path(cfg.input).expanduser()), bool(cfg.get("align")), cfg.generator.size
    spec.masks = str(Path(str(cfg.masks)).expanduser()) if cfg.get("masks") else None
    spec.batch_size, spec.num_workers = cfg.data.batch_size, min(int(cfg.data.get("num_workers", 0)), 2)
    return hydra.utils.instantiate(spec)


def check_enough_images(input_dir: str, processes: int) -> None:
    """Lightning's predict sampler needs at least one image per process: say so instead of its AssertionError."""
    from datamodules.image_folder import list_images

    count = len(list_images(Path(input_dir).expanduser(), config_key="input"))
    if count < processes:
        raise UserError(f"input={input_dir} holds {count} image(s) for {processes} processes: use fewer processes "
                        f"(e.g. trainer=cpu) for fewer images than processes.")


def invert(trainer, model, datamodule, writer) -> Path:
    """`trainer.predict` with the `InversionWriter` callback `writer` writes every unfinished image's folder; rank zero
    prints the manifest's counts."""
    trainer.predict(model, datamodule=datamodule, return_predictions=False)
    out = writer.out_dir
    if trainer.is_global_zero:
        manifest = writer.write_manifest(skipped=unreadable_inputs(datamodule))
        records = writer.records()
        failed = [r for r in records if r["status"] != "ok"]
        print(f"Inverted {len(records) - len(failed)} image(s) into {out} (manifest: {manifest})")
        for r in failed:
            print(f"  failed: {r['name']}: {r['reason']}")
    return out / "manifest.json"


def unreadable_inputs(datamodule) -> list[str]:
    """The input files ``mode=invert`` skipped (unreadable; listed in the manifest), relative to the input folder."""
    from datamodules.image_folder import list_images

    root = datamodule.image_folder
    read = set(datamodule.full_dataset().files)
    return [p.relative_to(root).as_posix() for p in list_images(root, config_key="input") if p not in read]


def evaluate(trainer, model, datamodule, run_dir: Path, ckpt_path: str | None = None) -> None:
    """`trainer.test` on the datamodule's test split (weights from `ckpt_path` when given); per-image rows of
    `model.test_table` (when the stage keeps one) go to `<run_dir>/metrics/test.csv` and `test.json`, the means
    are printed, and `model.summary_markdown()` (when the stage has one) goes to `metrics/summary.md`."""
    trainer.test(model, datamodule=datamodule, verbose=False, ckpt_path=ckpt_path)
    table = model.test_table if isinstance(model, KeepsTestTable) else None
    if not trainer.is_global_zero or table is None or not table.rows:
        return
    table.to_csv(run_dir / "metrics" / "test.csv")
    table.to_json(run_dir / "metrics" / "test.json")
    means = ", ".join(f"{k} {v:.4g}" for k, v in table.mean().items())
    print(f"Test ({len(table.rows)} images): {means}\nPer-image metrics: {run_dir / 'metrics' / 'test.csv'}")
    summary = model.summary_markdown() if isinstance(model, SummarisesTests) else ""
    if summary:
        (run_dir / "metrics" / "summary.md").write_text(summary + "\n")
        print(summary)


@hydra.main(version_base="1.3", config_path="configs", config_name="config")
def main(cfg: DictConfig) -> None:
    """Hydra task: `train(cfg)` with user errors printed briefly, a DDP process that dies reported with what is kept
    and the command that continues (experiments/utils/distributed.py), and W&B always finished."""
    script = Path(__file__).resolve()
    if script.is_relative_to(Path.cwd()):
        script = script.relative_to(Path.cwd())
    guard = RankFailureGuard(Path(HydraConfig.get().runtime.output_dir).resolve(), HydraConfig.get().overrides.task,
                             mode=cfg.get("mode") or "train", inversion_dir=lambda: cfg.get("output"),
                             script=str(script))
    try:
        with guard, report_user_errors():
            train(cfg)
    finally:
        finish_wandb()


if __name__ == "__main__":
    if message := check_command_line(sys.argv[1:], CONFIG_DIR):
        print(f"Error: {message}", file=sys.stderr)
        sys.exit(1)
    main()
