"""Stage 2: joint spatial alignment + invertibility-mask learning (the ICCV 2023 method, methods.md §2.7).

The generator and the stage-1 encoder come from the stage-1 hand-off (``encoder.pt``, e4e layout) and
stay frozen. ``networks.align_mask.AlignMaskNet`` warps the generator's features towards the encoder
taps and predicts, per level, the invertibility mask alpha (1 = not invertible: copy from the input);
the output blends ``mask * input + (1 - mask) * generated``. Losses, all against the input:

* pixel MSE (weight ``pixel``); perceptual (``perceptual``) and Gram style (``style``) terms: LPIPS + Gram on its
  backbone (``perceptual_kind: lpips``, ours; a random backbone only when opted in, then logged as "lpips-random")
  or the official VGG19 pre-ReLU L1 + Gram (``perceptual_kind: vgg19``, ``lightning_modules.vgg_perceptual``);
  ID (``identity``, only with ArcFace weights);
* adversarial: a StyleGAN2 discriminator trained from scratch, non-saturating (``adversarial``). The official G step
  scores D(output.detach()): the term is logged but sends no gradient (``adversarial_grad: false``); ours lets it
  train the module (``adversarial_grad: true``);
* mask binarisation ``mean(min(alpha, 1 - alpha))`` per level and on the fused mask (``binarization``);
* mask area hinge ``max(0, mean(alpha) - limit)`` per level and fused (``area``, ``area_limits``);
* optional, not in the official recipe: binary cross-entropy of the fused mask against the exact masks of the
  noise patches pasted on training images (``patch_supervision``; clean images are pulled to mask 0).

Without the area hinge the trivial solution is mask = 1 everywhere (output = input). Levels are
switched on progressively (``level_milestones``: the step at which each level starts; official: every 4k steps
after 2k). ``lr_schedule`` multiplies both learning rates by ``gamma`` every ``step`` steps (official 0.75 / 15k);
``train_randomize_noise`` draws fresh generator noise for every training forward (official). An EMA copy of
the trainable network is what validation, test and the hand-off use (the official ``params_ema``).
Hand-off: ``<run_dir>/align_mask.pt`` ``{"state_dict", "config", "meta"}``.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.utilities import rank_zero_info

from datamodules.ood_patches import paste_random_patches
from lightning_modules.edit_metrics import edit_scores, edited_codes, load_edit_scorer
from lightning_modules.gan_losses import d_logistic_loss, g_nonsaturating_loss
from lightning_modules.metrics import MetricTable, image_metrics, loader_size, mask_metrics, method_comparison
from lightning_modules.perceptual import LPIPSLoss
from lightning_modules.vgg_perceptual import VGGPerceptualLoss
from lightning_modules.plain import to_plain
from lightning_modules.stage1_handoff import ENCODER_RESIZES, FrozenStage1
from lightning_modules.steps import uncounted_step
from networks.align_mask import AlignMaskNet, default_levels, save_align_mask
from networks.checkpoints import CheckpointError, check_same_generator, load_generator, weights_fingerprint
from networks.stylegan2 import Discriminator

PRODUCED_BY = "stage2 AlignMaskModule"
SUMMARY_COLUMNS = [("psnr", "PSNR"), ("ssim", "SSIM"), ("mse", "MSE"), ("psnr_in", "PSNR in OOD"),
                   ("ssim_in", "SSIM in OOD"), ("psnr_out", "PSNR out"), ("ssim_out", "SSIM out"),
                   ("iou@0.5", "mask IoU@0.5"), ("precision@0.5", "precision@0.5"), ("recall@0.5", "recall@0.5"),
                   ("best_iou", "best IoU (swept)"), ("edit_success", "edit success"),
                   ("edit_ood_psnr", "OOD PSNR under edit")]
Tensor = torch.Tensor
PERCEPTUAL_KINDS = ("lpips", "vgg19")


def resolve_milestones(spec, n_levels: int) -> List[int]:
    """The step at which each of ``n_levels`` levels starts: ``spec`` = None (all at 0), a list (one per level), or
    {"start": s, "step": d} (official progressive schedule: 0, s, s + d, s + 2d, ...; official s = 2000, d = 4000)."""
    if spec is None:
        return [0] * n_levels
    if isinstance(spec, Mapping):
        if set(spec) != {"start", "step"}:
            raise ValueError(f"AlignMaskModule: model.level_milestones={dict(spec)} must be a list or {{start, step}}")
        return [0] + [int(spec["start"]) + int(spec["step"]) * k for k in range(n_levels - 1)]
    return [int(m) for m in spec]


# "separate": the official discriminator step runs its own forward of the module; "shared": one forward serves both
DISCRIMINATOR_FORWARDS = ("separate", "shared")

class AlignMaskModule(FrozenStage1, pl.LightningModule):
    """Trains the alignment + mask levels on top of a frozen stage-1 encoder and generator.

    Args:
        encoder_checkpoint: the stage-1 hand-off (e4e layout: encoder, generator, latent_avg).
        generator_checkpoint: optional generator file; when given it must hold the same generator as the
            encoder file (same config and weights), else a CheckpointError names both files.
        levels: resolutions of the levels (null = ``networks.align_mask.default_levels(G.size)``).
        warp_scale, cycles: ``AlignMaskNet`` settings (official: 0.08, 2).
        blur_padding, warp_grid, gate_interpolation: the resampling choices of ``AlignMaskNet`` (official "zeros",
            "linspace", "bicubic"; ours "replicate", "identity", "bilinear"), saved in the hand-off.
        alpha_init: starting alpha logit of every level (official 0, i.e. masks start at 0.5; a negative value
            starts below the area limits, so the area hinge does not dominate the first steps).
        error_cue: add the stage-1 reconstruction error |x - G(codes)| to the alpha logits through a learned
            3x3 conv (not in the official model; see ``networks.align_mask.AlignMaskNet``).
        level_milestones: step at which each level becomes active: a list (one per level, first 0), null (all at 0),
            or {start, step} (official {2000, 4000}: 0, 2k, 6k, 10k).
        lr, betas: Adam of the trainable network and of the discriminator (official 2e-5, (0, 0.99)).
        lr_schedule: null (constant) or {step, gamma}: both learning rates times gamma every ``step`` training steps
            (official {15000, 0.75}, BasicSR ``MultiStepLR``).
        train_randomize_noise: fresh generator noise in every training forward (official); false = the stored maps.
        inference_noise: generator noise at validation / test and in the hand-off (``AlignMaskNet``): "random"
            (official: outputs vary from run to run) or "stored" (ours: reproducible metrics).
        discriminator_forward: "separate" (official: the discriminator step scores its own forward of the module,
            with its own noise) or "shared" (ours: the one forward of the step serves both; half the synthesis cost).
        encoder_resize: how inputs reach the encoder's size: "bilinear" (official: plain ``F.interpolate``) or
            "antialiased" (ours, as stage 1: no aliasing when 1024 px inputs shrink to 256).
        pixel, perceptual, style, identity_weight, adversarial, binarization, area: loss weights (official 1, 1,
            50, 0.1, 0.5, 0.2 = 5 masks x 0.04, 5). With ``perceptual_kind: lpips`` the style (Gram) loss runs only
            with real LPIPS backbone weights: Gram matrices of a random backbone mean nothing.
        perceptual_kind: "lpips" (ours: LPIPS + Gram on its backbone) or "vgg19" (official: BasicSR's VGG19
            pre-ReLU L1 + Gram, ``vgg`` = ``VGGPerceptualLoss`` kwargs).
        adversarial_grad: false = the official G step (D scores the detached output: logged, no gradient);
            true = ours (the term trains the module).
        area_limits: per-level limits of the mean mask (keys: level resolution or "fused").
        lpips, identity, vgg: ``LPIPSLoss`` (also the evaluation metric) / ``IDLoss`` / ``VGGPerceptualLoss`` kwargs.
        ema_decay: EMA of the trainable network (official 0.5 ** (32 / 10000)).
        discriminator: ``networks.stylegan2.Discriminator`` kwargs besides ``size``.
        n_grid: images in the validation grid.
        train_patches: ``datamodules.ood_patches.paste_random_patches`` kwargs (``p``, ``max_patches``, ``area``)
            applied to training images; ``p: 0`` (default, the official recipe) turns it off. Needed on data whose
            training images hold no OOD content (SynthFaces), see that module.
        edit: evaluation edit ``{direction: InterFaceGAN file, strength, attribute, classifier: SynthFaces
            attribute classifier file}``; with a direction, test rows also score the edit (classifier success and
            change, OOD preservation) for stage two and for stage one alone. null / no direction = no edit.
        patch_supervision: weight of the BCE between the fused mask and the pasted patches' masks (needs
            ``train_patches.p > 0``; 0 = off, the official recipe). Without it, on a generator that misses part of
            every face the unsupervised losses also mark that part on every image (see README, stage 2).
    """

    def __init__(self, encoder_checkpoint: str, generator_checkpoint: Optional[str] = None,
                 levels: Optional[Sequence[int]] = None, warp_scale: float = 0.08, cycles: int = 2,
                 blur_padding: str = "zeros", alpha_init: float = 0.0, error_cue: bool = False,
                 level_milestones=None, lr: float = 2e-5, betas: Sequence[float] = (0.0, 0.99),
                 pixel: float = 1.0, perceptual: float = 1.0, style: float = 50.0, identity_weight: float = 0.0,
                 adversarial: float = 0.5, binarization: float = 0.2, area: float = 5.0,
                 area_limits: Optional[Mapping] = None, lpips: Optional[dict] = None, identity: Optional[dict] = None,
                 ema_decay: float = 0.99778, discriminator: Optional[dict] = None, n_grid: int = 8,
                 train_patches: Optional[dict] = None, edit: Optional[dict] = None, patch_supervision: float = 0.0,
                 warp_grid: str = "linspace", gate_interpolation: str = "bicubic", lr_schedule: Optional[dict] = None,
                 train_randomize_noise: bool = False, adversarial_grad: bool = True, perceptual_kind: str = "lpips",
                 vgg: Optional[dict] = None, inference_noise: str = "random", discriminator_forward: str = "separate",
                 encoder_resize: str = "bilinear"):
        super().__init__()
        self.save_hyperparameters()
        self.automatic_optimization = False
        if not encoder_checkpoint:
            raise ValueError("model.encoder_checkpoint is required: the stage-1 hand-off encoder.pt (or an official "
                             "e4e_ffhq_encode.pt)")
        self.load_stage1(encoder_checkpoint)
        for key, value, valid in (("discriminator_forward", discriminator_forward, DISCRIMINATOR_FORWARDS),
                                  ("encoder_resize", encoder_resize, ENCODER_RESIZES)):
            if value not in valid:
                raise ValueError(f"AlignMaskModule: model.{key}={value!r}; choose one of {', '.join(valid)}")
        self.encoder_resize = encoder_resize
        if generator_checkpoint:
            self._check_same_generator(Path(generator_checkpoint).expanduser())

        size = self.generator.size
        self.level_list = [int(r) for r in (levels or default_levels(size))]
        enc_size = int(self.encoder.config["input_size"])
        self.net = AlignMaskNet(dict(self.generator.channels), dict(self.encoder.feature_channels), self.level_list,
                                enc_size, warp_scale=warp_scale, cycles=cycles, blur_padding=blur_padding,
                                alpha_init=alpha_init, error_cue=error_cue, warp_grid=warp_grid,
                                gate_interpolation=gate_interpolation, inference_noise=inference_noise)
        self.net_ema = copy.deepcopy(self.net).requires_grad_(False)
        milestones = resolve_milestones(level_milestones, len(self.level_list))
        if len(milestones) != len(self.level_list) or milestones != sorted(milestones) or milestones[0] != 0:
            raise ValueError(f"AlignMaskModule: model.level_milestones={milestones} must give one ascending step per "
                             f"level {self.level_list}, starting at 0")
        self.milestones = [int(m) for m in milestones]
        limits = {str(k): float(v) for k, v in (area_limits or {}).items()}
        self.area_limits = {str(r): limits.get(str(r), 0.3 if i < 2 else 0.2) for i, r in enumerate(self.level_list)}
        self.area_limits["fused"] = limits.get("fused", 0.2)
        self.lpips = LPIPSLoss(**to_plain(lpips or {}))
        if perceptual_kind not in PERCEPTUAL_KINDS:
            raise ValueError(f"AlignMaskModule: model.perceptual_kind={perceptual_kind!r}; choose one of "
                             f"{', '.join(PERCEPTUAL_KINDS)}")
        self.vgg = VGGPerceptualLoss(**to_plain(vgg or {})) if perceptual_kind == "vgg19" else None
        if lr_schedule and (set(lr_schedule) != {"step", "gamma"} or int(lr_schedule["step"]) < 1):
            raise ValueError(f"AlignMaskModule: model.lr_schedule={dict(lr_schedule)} must be null or {{step >= 1, "
                             f"gamma}}")
        self.id_loss = None
        if identity_weight > 0:
            from lightning_modules.identity import IDLoss

            self.id_loss = IDLoss(**to_plain(identity or {}))
        d_kwargs = dict(to_plain(discriminator or {}))
        d_kwargs.setdefault("channel_multiplier", self.generator.config.get("channel_multiplier", 2))
        d_kwargs.setdefault("channel_max", self.generator.config.get("channel_max", 512))
        self.discriminator = Discriminator(size, **d_kwargs) if adversarial > 0 else None
        self.train_patches = dict(to_plain(train_patches or {}))
        self.train_patches.setdefault("p", 0.0)
        if patch_supervision > 0 and self.train_patches["p"] <= 0:
            raise ValueError("AlignMaskModule: model.patch_supervision > 0 needs pasted training patches "
                             "(model.train_patches.p > 0)")
        # a plain dict, not a submodule: the scorer stays out of checkpoints
        self.edit = load_edit_scorer(to_plain(edit or {}), self.generator.style_dim)
        self.val_table, self.test_table = MetricTable(), MetricTable()
        self.grid_batch: Optional[Dict[str, Tensor]] = None

    # ------------------------------------------------------------------ public API
    def active_levels(self, step: Optional[int] = None) -> List[int]:
        """Levels active after ``step`` training steps (default: the current global step)."""
        step = int(self.global_step if step is None else step)
        return [r for r, m in zip(self.level_list, self.milestones) if step >= m]

    def run(self, images: Tensor, codes: Optional[Tensor] = None, use_ema: bool = True, active_levels=None,
            encoded=None):
        """Invert ``images``: ``AlignMaskOutput`` (output, generated, mask, alphas, flows).

        ``codes`` (B, L, D) replaces the encoder's codes (e.g. an edited code: alignment and blending then
        run against the input, as the official editing does); the taps always come from ``images``.
        ``encoded``: ``self.encode(images)`` when the caller already has it.
        """
        enc_codes, taps = encoded if encoded is not None else self.encode(images)
        net = self.net_ema if use_ema else self.net
        return net(self.generator, enc_codes if codes is None else codes, taps, images,
                   active_levels=self.level_list if active_levels is None else active_levels, cue_codes=enc_codes)

    def export_handoff(self, run_dir) -> Path:
        """Write ``run_dir/align_mask.pt`` (EMA weights, config, meta naming the stage-1 file); returns its path."""
        meta = {"produced_by": PRODUCED_BY, "global_step": int(self.global_step),
                "encoder_checkpoint": self.encoder_checkpoint, "generator": dict(self.generator.config),
                "generator_sha1": weights_fingerprint(self.generator),
                "encoder": dict(self.encoder.config), "module": to_plain(dict(self.hparams))}
        return save_align_mask(Path(run_dir) / "align_mask.pt", self.net_ema, to_plain(meta))

    def summary_markdown(self) -> str:
        """Markdown table of the test means: stage one alone vs stage two (empty before ``trainer.test``)."""
        means = self.test_table.mean()
        if not means:
            return ""
        return method_comparison(means, {"stage 1 (encoder only)": "stage1_", "stage 2 (align + mask blend)": ""},
                                 SUMMARY_COLUMNS)

    # ------------------------------------------------------------------ Lightning hooks
    def configure_optimizers(self):
        betas = tuple(self.hparams.betas)
        opts = [torch.optim.Adam(self.net.parameters(), lr=self.hparams.lr, betas=betas)]
        if self.discriminator is not None:
            opts.append(torch.optim.Adam(self.discriminator.parameters(), lr=self.hparams.lr, betas=betas))
        schedule = self.hparams.lr_schedule
        if not schedule:
            return opts
        # stepped by training_step once per training step (manual optimisation)
        return opts, [torch.optim.lr_scheduler.StepLR(o, step_size=int(schedule["step"]), gamma=float(schedule["gamma"]))
                      for o in opts]

    def training_step(self, batch, batch_idx: int) -> None:
        self.generator.eval()
        self.encoder.eval()
        x = batch["image"]
        patch_mask = None
        if self.train_patches["p"] > 0:
            x, patch_mask = paste_random_patches(x, **self.train_patches)
        active = self.active_levels()
        opts = self.optimizers()
        opts = opts if isinstance(opts, list) else [opts]
        codes, taps = self.encode(x)
        def training_noise():
            return ([None] * self.generator.num_layers if self.hparams.train_randomize_noise
                    else self.generator.stored_noise())

        out = self.net(self.generator, codes, taps, x, active_levels=active, noise=training_noise())
        logs: Dict[str, Tensor] = {}
        if self.discriminator is not None:
            if self.hparams.discriminator_forward == "separate":  # official: D's step runs the module again
                with torch.no_grad():
                    fake = self.net(self.generator, codes, taps, x, active_levels=active, noise=training_noise()).output
            else:
                fake = out.output.detach()
            self.toggle_optimizer(opts[1])
            loss_d = d_logistic_loss(self.discriminator(x), self.discriminator(fake))
            opts[1].zero_grad(set_to_none=True)
            self.manual_backward(loss_d)
            uncounted_step(self, opts[1])
            self.untoggle_optimizer(opts[1])
            logs["train/loss_d"] = loss_d.detach()
        loss, parts = self._losses(x, out, patch_mask)
        opts[0].zero_grad(set_to_none=True)
        self.manual_backward(loss)
        opts[0].step()
        self._update_ema()
        self._step_schedulers()
        logs.update({f"train/{k}": v for k, v in parts.items()})
        logs["train/loss"] = loss.detach()
        logs["train/active_levels"] = torch.tensor(float(len(active)))
        self.log_dict(logs, on_step=True, on_epoch=False, batch_size=x.shape[0])

    def _step_schedulers(self) -> None:
        schedulers = self.lr_schedulers() if self.hparams.lr_schedule else None
        for sched in (schedulers if isinstance(schedulers, list) else [schedulers] if schedulers else []):
            sched.step()

    def on_validation_epoch_start(self) -> None:
        self.val_table = MetricTable()

    def validation_step(self, batch, batch_idx: int) -> Dict[str, Any]:
        """Score one batch; returns its names, metrics and pictures (``contracts.StepPictures``)."""
        return self._evaluate(batch, batch_idx, self.val_table)

    def on_validation_epoch_end(self) -> None:
        # every rank's rows (DDP): exact means, not a mean of per-rank means over a padded split
        self.val_table = self.val_table.gathered(loader_size(self.trainer.val_dataloaders))
        means = self.val_table.mean()
        if means:
            self.log_dict({f"val/{k}": float(v) for k, v in means.items()}, sync_dist=True)

    def on_test_epoch_start(self) -> None:
        self.test_table = MetricTable()

    def test_step(self, batch, batch_idx: int) -> Dict[str, Any]:
        """Score one batch with the edit; returns its names, metrics and pictures (``contracts.StepPictures``)."""
        return self._evaluate(batch, batch_idx, self.test_table, with_edit=True)

    def on_test_epoch_end(self) -> None:
        # every rank's rows (DDP), so test_table, the summary and the logged means equal one process's
        self.test_table = self.test_table.gathered(loader_size(self.trainer.test_dataloaders))
        self.log_dict({f"test/{k}": float(v) for k, v in self.test_table.mean().items()}, sync_dist=True)

    # ------------------------------------------------------------------ internals
    def _losses(self, x: Tensor, out, patch_mask: Optional[Tensor] = None):
        hp = self.hparams
        parts: Dict[str, Tensor] = {"pixel": F.mse_loss(out.output, x)}
        loss = hp.pixel * parts["pixel"]
        if self.vgg is not None and (hp.perceptual > 0 or hp.style > 0):
            name = self.vgg.metric_name
            parts[name], parts[f"{name}_style"] = self.vgg(out.output, x)
            loss = loss + hp.perceptual * parts[name] + hp.style * parts[f"{name}_style"]
        if self.vgg is None and hp.perceptual > 0:
            parts[self.lpips.metric_name] = self.lpips(out.output, x).mean()
            loss = loss + hp.perceptual * parts[self.lpips.metric_name]
        if self.vgg is None and hp.style > 0 and self.lpips.metric_name == "lpips":
            parts["style"] = self.lpips.style_distance(out.output, x).mean()
            loss = loss + hp.style * parts["style"]
        if self.id_loss is not None:
            parts[self.id_loss.metric_name] = self.id_loss(out.output, x).mean()
            loss = loss + hp.identity_weight * parts[self.id_loss.metric_name]
        if self.discriminator is not None and hp.adversarial_grad:
            parts["adv"] = g_nonsaturating_loss(self.discriminator(out.output))
            loss = loss + hp.adversarial * parts["adv"]
        elif self.discriminator is not None:  # official: D scores the detached output, a constant for the module
            with torch.no_grad():
                parts["adv"] = g_nonsaturating_loss(self.discriminator(out.output.detach()))
            loss = loss + hp.adversarial * parts["adv"]
        masks = {str(r): a for r, a in out.alphas.items()}
        if masks:
            masks["fused"] = out.mask
            parts["binarization"] = sum(torch.minimum(a, 1 - a).mean() for a in masks.values())
            parts["area"] = sum(F.relu(a.mean() - self.area_limits[k]) for k, a in masks.items())
            parts["mask_mean"] = out.mask.mean()
            loss = loss + hp.binarization * parts["binarization"] + hp.area * parts["area"]
        if hp.patch_supervision > 0 and patch_mask is not None:
            # the fused mask is a product of sigmoids: clamp before the log instead of using logits
            parts["patch_bce"] = F.binary_cross_entropy(out.mask.clamp(1e-4, 1 - 1e-4), patch_mask)
            loss = loss + hp.patch_supervision * parts["patch_bce"]
        return loss, {k: v.detach() for k, v in parts.items()}

    @torch.no_grad()
    def _update_ema(self) -> None:
        decay = self.hparams.ema_decay
        for p_ema, p in zip(self.net_ema.parameters(), self.net.parameters()):
            p_ema.lerp_(p.detach(), 1 - decay)
        for b_ema, b in zip(self.net_ema.buffers(), self.net.buffers()):
            b_ema.copy_(b)

    @torch.no_grad()
    def _evaluate(self, batch, batch_idx: int, table: MetricTable, with_edit: bool = False) -> Dict[str, Any]:
        """Per-image rows: stage two (no prefix) and stage one alone (``stage1_``) against the input, in / out
        of the ground-truth OOD mask when the batch has one, mask metrics, and the edit when configured."""
        x = batch["image"]
        gt = batch.get("ood_mask")
        target = batch.get("clean", x)
        encoded = self.encode(x)
        codes = encoded[0]
        out = self.run(x, encoded=encoded)
        stage1 = self.generator.synthesize(codes).image
        metrics: Dict[str, Tensor] = {}
        for prefix, image in (("", out.output), ("stage1_", stage1)):
            # reconstruction of the input, whole / in / out of the OOD area
            metrics.update({prefix + k: v for k, v in image_metrics(image, x, gt).items()})
            metrics.update({f"{prefix}clean_{k}": v for k, v in image_metrics(image, target, gt).items()
                            if k in ("psnr", "ssim", "psnr_out")})
            metrics[prefix + self.lpips.metric_name] = self.lpips(image, x)
        metrics["mask_mean"] = out.mask.mean(dim=(1, 2, 3))
        if gt is not None and gt.sum() > 0:
            metrics.update(mask_metrics(out.mask, gt))
        rows = {"input": x, "stage1": stage1, "generated": out.generated, "mask": out.mask, "output": out.output}
        if gt is not None:
            rows["ood_mask"] = gt
        if with_edit and self.edit is not None:
            new_codes = edited_codes(self.edit, codes)
            edited_stage1 = self.generator.synthesize(new_codes).image
            # alignment and blending against the input (official)
            edited = self.run(x, codes=new_codes, encoded=encoded).output
            for prefix, before, after in (("", out.output, edited), ("stage1_", stage1, edited_stage1)):
                metrics.update({prefix + k: v for k, v in edit_scores(self.edit, before, after, x, gt).items()})
            rows.update({"stage1_edit": edited_stage1, "edit": edited})
        names = list(batch["name"])
        table.add(names, metrics)
        if batch_idx == 0:
            n = self.hparams.n_grid
            self.grid_batch = {k: v[:n] for k, v in rows.items()}
        return {"names": names, "metrics": metrics, "pictures": rows}

    def _check_same_generator(self, path: Path) -> None:
        if not path.is_file():
            raise CheckpointError(f"model.generator_checkpoint={path}: no such file")
        other, _ = load_generator(path)
        check_same_generator(self.generator, other.config, weights_fingerprint(other),
                             theirs=f"model.generator_checkpoint={path}", made="saved",
                             ours=f"model.encoder_checkpoint={self.encoder_checkpoint}")
        rank_zero_info(f"AlignMaskModule: {path} matches the generator inside {self.encoder_checkpoint}")
