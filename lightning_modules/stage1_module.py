"""Stage 1: train an e4e (or pSp) encoder that maps images to W+ codes of a frozen StyleGAN2 generator.

The recipe follows e4e's training coach (omertov/encoder4editing, ``training/coach.py``):

* codes = encoder(x) + latent_avg (``start_from_latent_avg``), decoded by the frozen generator;
* loss = l2 * MSE + lpips * LPIPS + id * (1 - cos ArcFace) + delta_norm * sum_i ||w_i - w_0||_2
  + w_discriminator * softplus(-D(w_i)) over the rows being trained;
* progressive training: stage k uses the deltas of styles 1..k (stage 0 = a single W); stage 1 starts
  at ``progressive_start`` and each further stage ``progressive_step_every`` steps later;
* a latent-code discriminator (``networks.latent_discriminator``) on first rows of encoded codes vs
  mapping-network samples, non-saturating loss, lazy R1 every ``d_reg_every`` steps.

Differences from e4e, on purpose: Adam instead of Ranger (no extra dependency; same lr), no W pool
(its effect is small and it complicates exact resume), the loss is computed at the generator's size
(e4e pools 1024 px outputs to 256 px; with a 256 px generator they are the same). pSp is the same
module with ``encoder.kind=psp`` (no deltas, no latent discriminator by default).

Hand-off: ``<run_dir>/encoder.pt`` in e4e's layout (``state_dict`` with ``encoder.``/``decoder.`` keys,
``opts``, ``latent_avg``), readable by ``networks.encoder_checkpoints.load_e4e_checkpoint`` and by the
official e4e tooling for the official architecture.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Dict, Optional

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.utilities import rank_zero_info

from lightning_modules.gan_losses import d_logistic_loss, g_nonsaturating_loss, r1_penalty
from lightning_modules.metrics import MetricTable, image_metrics, loader_size
from lightning_modules.perceptual import LPIPSLoss
from lightning_modules.plain import to_plain
from lightning_modules.steps import uncounted_step
from networks.checkpoints import CheckpointError, weights_fingerprint, load_generator
from networks.encoder_checkpoints import export_e4e_checkpoint, load_e4e_checkpoint
from networks.encoders import build_encoder, resize_to_encoder
from networks.latent_discriminator import LatentCodesDiscriminator

PRODUCED_BY = "stage1 EncoderModule"
Tensor = torch.Tensor


def progressive_stage_at(step: int, n_styles: int, start: Optional[int], every: int) -> int:
    """e4e's progressive schedule: the stage (deltas 1..stage in use) after ``step`` training steps.

    ``start=None`` disables progressive training (all ``n_styles - 1`` deltas from step 0).
    Stage 0 until ``start``; stage 1 at ``start``; stage k at ``start + (k - 1) * every``.
    """
    if start is None:
        return n_styles - 1
    if step < start:
        return 0
    return min(n_styles - 1, 1 + (step - start) // max(1, every))


class EncoderModule(pl.LightningModule):
    """Trains ``encoder`` (e4e / pSp) against a frozen generator loaded from ``generator_checkpoint``.

    Args:
        generator_checkpoint: rosinality-layout generator file (a stage-0 ``generator.pt`` or
            ``stylegan2-ffhq-config-f.pt``); its ``latent_avg`` is the codes' starting point.
        encoder: ``networks.encoders.build_encoder`` kwargs: ``kind`` ("e4e" | "psp"), ``num_layers``,
            ``mode``, ``input_size``, ``width``, ``units``; ``n_styles`` / ``style_dim`` come from the generator.
        lr: Adam learning rate of the encoder.
        l2_lambda, lpips_lambda, id_lambda, delta_norm_lambda, w_discriminator_lambda: loss weights (0 = off).
        lpips: ``LPIPSLoss`` kwargs (``net``, ``backbone_weights``, ``allow_random_backbone``).
        identity: ``IDLoss`` kwargs (``weights``, ``allow_random``); built only when ``id_lambda > 0``.
        w_discriminator_lr, r1_gamma, d_reg_every, discriminator_layers: latent discriminator settings.
        progressive_start, progressive_step_every: e4e's schedule (steps); ``progressive_start=null``
            trains all deltas from the start.
        start_from_latent_avg: add the generator's average latent to the encoder output (e4e/pSp default).
        train_randomize_noise: random noise maps in training (e4e does); false = the stored maps used at evaluation.
        allow_resize: images whose size differs from the generator's (or the encoder input from
            ``encoder.input_size``) are resized with a warning; false: a clear error naming the config key.
        init_checkpoint: an e4e-layout file (official ``e4e_ffhq_encode.pt`` or an ``encoder.pt``) whose
            encoder weights start training; its generator must equal ``generator_checkpoint``'s architecture.
        checkpoint_trust: allow files that need arbitrary unpickling (trusted sources only).
        n_grid: images in the reconstruction grid (``callbacks.ReconstructionGrid``).

    Batches: images (B, 3, S, S) in [-1, 1] with S = generator size (tensors, tuples or dicts with "image").
    """

    def __init__(self, generator_checkpoint: str, encoder: dict, lr: float = 1e-4, l2_lambda: float = 1.0,
                 lpips_lambda: float = 0.8, id_lambda: float = 0.0, delta_norm_lambda: float = 2e-4,
                 w_discriminator_lambda: float = 0.1, lpips: Optional[dict] = None, identity: Optional[dict] = None,
                 w_discriminator_lr: float = 2e-5, r1_gamma: float = 10.0, d_reg_every: int = 16,
                 discriminator_layers: int = 4, progressive_start: Optional[int] = 0,
                 progressive_step_every: int = 100, start_from_latent_avg: bool = True,
                 train_randomize_noise: bool = False, allow_resize: bool = True,
                 init_checkpoint: Optional[str] = None, checkpoint_trust: bool = False, n_grid: int = 8):
        super().__init__()
        self.save_hyperparameters()
        self.automatic_optimization = False
        encoder = dict(to_plain(encoder))
        for name, value in (("l2_lambda", l2_lambda), ("lpips_lambda", lpips_lambda), ("id_lambda", id_lambda),
                            ("delta_norm_lambda", delta_norm_lambda),
                            ("w_discriminator_lambda", w_discriminator_lambda), ("lr", lr)):
            if value < 0:
                raise ValueError(f"EncoderModule: model.{name} must be >= 0, got {value}")

        self.generator_checkpoint = str(generator_checkpoint)
        gen_path = Path(self.generator_checkpoint).expanduser()
        if not gen_path.is_file():
            raise CheckpointError(f"model.generator_checkpoint={gen_path}: no such file (a rosinality-layout "
                                  f"generator file, e.g. a stage-0 generator.pt)")
        self.generator, latent_avg = load_generator(gen_path, trust=checkpoint_trust,
                                                            trust_key="model.checkpoint_trust")
        self.generator.requires_grad_(False).eval()
        n_styles, style_dim = self.generator.n_latent, self.generator.style_dim
        self.register_buffer("latent_avg", latent_avg.reshape(1, -1).float().repeat(n_styles, 1))

        kind = encoder.pop("kind", "e4e")
        encoder.update(n_styles=n_styles, style_dim=style_dim)
        self.encoder = build_encoder(kind, **encoder)
        self.kind = kind
        if init_checkpoint:
            self._load_init_encoder(Path(init_checkpoint).expanduser(), checkpoint_trust)

        self.lpips = LPIPSLoss(**to_plain(lpips or {}))
        self.id_loss = None
        if id_lambda > 0:
            from lightning_modules.identity import IDLoss

            self.id_loss = IDLoss(**to_plain(identity or {}))
        self.w_discriminator = None
        if w_discriminator_lambda > 0 and kind == "e4e":
            self.w_discriminator = LatentCodesDiscriminator(style_dim, discriminator_layers)
        self.progressive = kind == "e4e" and progressive_start is not None
        self.stage = 0  # training stage of the progressive schedule (the encoder itself defaults to all deltas)
        self._val_table = MetricTable()
        self.test_table = MetricTable()
        self.grid_batch: Optional[Dict[str, Tensor]] = None
        self._warned_resize = False

    # ------------------------------------------------------------------ public API
    def encode(self, images: Tensor) -> Tensor:
        """Images (B, 3, S, S) in [-1, 1] -> W+ codes (B, n_styles, style_dim), latent_avg included."""
        x = resize_to_encoder(images, self.encoder.config["input_size"], allow_resize=self.hparams.allow_resize)
        codes = self.encoder(x)
        if self.hparams.start_from_latent_avg:
            codes = codes + self.latent_avg.unsqueeze(0)
        return codes

    def decode(self, codes: Tensor, randomize_noise: bool = False) -> Tensor:
        """W+ codes (B, n_styles, style_dim) -> images (B, 3, S, S) (stored noise unless ``randomize_noise``)."""
        return self.generator([codes], input_is_latent=True, randomize_noise=randomize_noise)[0]

    def forward(self, images: Tensor) -> Tensor:
        """Reconstruct images (B, 3, S, S) -> (B, 3, S, S) through encoder and generator."""
        return self.decode(self.encode(images))

    def export_handoff(self, run_dir) -> Path:
        """Write ``run_dir/encoder.pt`` (e4e layout: state_dict, opts, latent_avg); returns its path."""
        opts = {
            "encoder_type": "Encoder4Editing" if self.kind == "e4e" else "GradualStyleEncoder",
            "stylegan_size": int(self.generator.size), "output_size": int(self.generator.size),
            "start_from_latent_avg": bool(self.hparams.start_from_latent_avg),
            "encoder_config": to_plain(dict(self.encoder.config)),
            "generator_config": to_plain(dict(self.generator.config)),
            "produced_by": PRODUCED_BY, "global_step": int(self.global_step),
            "generator_checkpoint": self.generator_checkpoint,
            "generator_sha1": weights_fingerprint(self.generator),
            "module": to_plain({k: v for k, v in self.hparams.items() if k not in ("encoder",)}),
        }
        return export_e4e_checkpoint(Path(run_dir) / "encoder.pt", self.encoder, self.generator,
                                     self.latent_avg, opts=opts)

    # ------------------------------------------------------------------ Lightning hooks
    def configure_optimizers(self):
        """Adam for the encoder; Adam (betas 0.9/0.999, e4e's w_discriminator_lr) for the latent discriminator."""
        opts = [torch.optim.Adam(self.encoder.parameters(), lr=self.hparams.lr)]
        if self.w_discriminator is not None:
            opts.append(torch.optim.Adam(self.w_discriminator.parameters(), lr=self.hparams.w_discriminator_lr))
        return opts

    def training_step(self, batch, batch_idx: int) -> None:
        """One e4e step: [latent discriminator step with lazy R1], then the encoder step."""
        self.generator.eval()  # frozen and always in inference mode (Lightning calls train() on the whole module)
        stage = self._scheduled_stage()
        if stage != self.stage:
            rank_zero_info(f"EncoderModule: progressive stage {self.stage} -> {stage} at step {self.global_step}")
        self.stage = stage
        if hasattr(self.encoder, "set_progressive_stage"):
            self.encoder.set_progressive_stage(stage)
        x = self._check_images(batch["image"])
        optimizers = self.optimizers()
        optimizers = optimizers if isinstance(optimizers, list) else [optimizers]
        logs: Dict[str, Tensor] = {}
        codes = self.encode(x)  # one encoder pass serves both steps (the discriminator sees it detached)
        if self.w_discriminator is not None:
            logs.update(self._discriminator_step(codes[:, 0].detach(), optimizers[1]))

        y_hat = self.decode(codes, randomize_noise=self.hparams.train_randomize_noise)
        loss, parts = self._encoder_loss(x, y_hat, codes)
        optimizers[0].zero_grad(set_to_none=True)
        self.manual_backward(loss)
        optimizers[0].step()
        logs.update({f"train/{k}": v for k, v in parts.items()})
        logs["train/loss"] = loss.detach()
        logs["train/progressive_stage"] = torch.tensor(float(self.stage))
        self.log_dict(logs, on_step=True, on_epoch=False, batch_size=x.shape[0])

    def validation_step(self, batch, batch_idx: int) -> Dict[str, Any]:
        """Score one batch; returns its names, metrics and pictures (``contracts.StepPictures``)."""
        x = self._check_images(batch["image"])
        y_hat = self(x)
        metrics = self._metrics(y_hat, x)
        names = list(batch["name"])
        self._val_table.add(names, metrics)
        if batch_idx == 0:
            n = self.hparams.n_grid
            self.grid_batch = {"input": x[:n].detach(), "reconstruction": y_hat[:n].detach()}
        return {"names": names, "metrics": metrics, "pictures": {"input": x, "reconstruction": y_hat}}

    def on_validation_epoch_start(self) -> None:
        self._val_table = MetricTable()

    def on_validation_epoch_end(self) -> None:
        # every rank's rows (DDP): exact means, not a mean of per-rank means over a padded split
        self._val_table = self._val_table.gathered(loader_size(self.trainer.val_dataloaders))
        means = self._val_table.mean()
        if means:
            self.log_dict({f"val/{k}": float(v) for k, v in means.items()}, sync_dist=True)

    def test_step(self, batch, batch_idx: int) -> Dict[str, Any]:
        """Per-image metrics of the reconstruction against the input (whole image, and inside / outside the
        ``ood_mask`` of SynthFaces evaluation batches), plus ``clean_*`` against the clean twin when present. Returns the
        batch's names, metrics and pictures (``contracts.StepPictures``)."""
        x = self._check_images(batch["image"])
        mask = batch.get("ood_mask")
        y_hat = self(x)
        metrics = self._metrics(y_hat, x, mask)
        if "clean" in batch:
            metrics.update({f"clean_{k}": v for k, v in image_metrics(y_hat, batch["clean"], mask).items()
                            if k in ("psnr", "ssim", "psnr_out")})
        names = list(batch["name"])
        self.test_table.add(names, metrics)
        pictures = {"input": x, "reconstruction": y_hat, **({"ood_mask": mask} if mask is not None else {})}
        return {"names": names, "metrics": metrics, "pictures": pictures}

    def on_test_epoch_start(self) -> None:
        self.test_table = MetricTable()

    def on_test_epoch_end(self) -> None:
        # every rank's rows (DDP), so test_table and the logged means equal one process's
        self.test_table = self.test_table.gathered(loader_size(self.trainer.test_dataloaders))
        self.log_dict({f"test/{k}": float(v) for k, v in self.test_table.mean().items()}, sync_dist=True)

    # ------------------------------------------------------------------ internals
    def _metrics(self, y_hat: Tensor, target: Tensor, mask: Optional[Tensor] = None) -> Dict[str, Tensor]:
        metrics = image_metrics(y_hat, target, mask)
        metrics[self.lpips.metric_name] = self.lpips(y_hat, target)
        return metrics

    def _encoder_loss(self, x: Tensor, y_hat: Tensor, codes: Tensor):
        hp = self.hparams
        parts: Dict[str, Tensor] = {}
        loss = x.new_zeros(())
        if hp.l2_lambda > 0:
            parts["l2"] = F.mse_loss(y_hat, x)
            loss = loss + hp.l2_lambda * parts["l2"]
        if hp.lpips_lambda > 0:
            parts[self.lpips.metric_name] = self.lpips(y_hat, x).mean()
            loss = loss + hp.lpips_lambda * parts[self.lpips.metric_name]
        if self.id_loss is not None:
            parts[self.id_loss.metric_name] = self.id_loss(y_hat, x).mean()
            loss = loss + hp.id_lambda * parts[self.id_loss.metric_name]
        if self.kind == "e4e" and hp.delta_norm_lambda > 0 and self.stage > 0:
            deltas = codes[:, 1:self.stage + 1] - codes[:, :1]
            parts["delta_norm"] = deltas.norm(p=2, dim=2).mean(dim=0).sum()
            loss = loss + hp.delta_norm_lambda * parts["delta_norm"]
        if self.w_discriminator is not None:
            rows = codes[:, :self.stage + 1]
            parts["w_adv"] = g_nonsaturating_loss(self.w_discriminator(rows.reshape(-1, rows.shape[-1])))
            loss = loss + hp.w_discriminator_lambda * parts["w_adv"]
        return loss, {k: v.detach() for k, v in parts.items()}

    def _discriminator_step(self, fake_w: Tensor, opt_d) -> Dict[str, Tensor]:
        """fake_w (B, D): the first rows of the encoded codes (e4e discriminates the shared W), detached."""
        disc = self.w_discriminator
        with torch.no_grad():
            z = torch.randn(fake_w.shape[0], self.generator.style_dim, device=fake_w.device)
            real_w = self.generator.get_latent(z)
        self.toggle_optimizer(opt_d)
        loss_d = d_logistic_loss(disc(real_w), disc(fake_w))
        opt_d.zero_grad(set_to_none=True)
        self.manual_backward(loss_d)
        uncounted_step(self, opt_d)
        logs = {"train/w_disc": loss_d.detach()}
        if self.hparams.r1_gamma > 0 and int(self.global_step) % self.hparams.d_reg_every == 0:
            real_in = real_w.detach().requires_grad_(True)
            pred = disc(real_in)
            r1 = r1_penalty(pred, real_in)
            opt_d.zero_grad(set_to_none=True)
            self.manual_backward(r1 * (self.hparams.r1_gamma / 2 * self.hparams.d_reg_every) + 0 * pred[0, 0])
            uncounted_step(self, opt_d)
            logs["train/w_r1"] = r1.detach()
        self.untoggle_optimizer(opt_d)
        return logs

    def _scheduled_stage(self) -> int:
        if self.kind != "e4e":
            return self.generator.n_latent - 1
        start = self.hparams.progressive_start if self.progressive else None
        return progressive_stage_at(int(self.global_step), self.generator.n_latent, start,
                                    self.hparams.progressive_step_every)

    def _use_all_deltas(self) -> None:
        """Evaluation always uses every delta (e4e's Inference stage), whatever the training stage."""
        if hasattr(self.encoder, "set_progressive_stage"):
            self.encoder.set_progressive_stage(self.generator.n_latent - 1)

    def on_validation_start(self) -> None:
        self._use_all_deltas()

    def on_test_start(self) -> None:
        self._use_all_deltas()

    def on_predict_start(self) -> None:
        self._use_all_deltas()

    def on_fit_end(self) -> None:
        self._use_all_deltas()  # after training the module (and its hand-off) is an inference encoder

    def _check_images(self, x: Tensor) -> Tensor:
        size = self.generator.size
        if not (torch.is_tensor(x) and x.ndim == 4 and x.shape[1] == 3 and x.is_floating_point()):
            desc = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
            raise ValueError(f"EncoderModule: batches must be float images (B, 3, {size}, {size}) in [-1, 1]; "
                             f"the datamodule gave {desc}")
        if x.shape[-1] != size or x.shape[-2] != size:
            if not self.hparams.allow_resize:
                raise ValueError(f"EncoderModule: images are {tuple(x.shape[-2:])} but the generator "
                                 f"(model.generator_checkpoint={self.generator_checkpoint}) makes {size}x{size}; "
                                 f"set data.resolution={size} (or model.allow_resize=true to resize them)")
            if not self._warned_resize:
                warnings.warn(f"EncoderModule: resizing {tuple(x.shape[-2:])} images to the generator's {size}x{size} "
                              f"(set data.resolution={size} to avoid this; model.allow_resize=false makes it an error)",
                              stacklevel=2)
                self._warned_resize = True
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        return x

    def _load_init_encoder(self, path: Path, trust: bool) -> None:
        where = f"model.init_checkpoint={path}"
        if not path.is_file():
            raise CheckpointError(f"{where}: no such file (an e4e-layout file: official e4e_ffhq_encode.pt or a "
                                  f"stage-1 encoder.pt)")
        try:
            loaded = load_e4e_checkpoint(path, trust=trust, trust_key="model.checkpoint_trust")
        except CheckpointError as err:
            raise CheckpointError(f"model.init_checkpoint: {err}") from None
        if dict(loaded.generator.config) != dict(self.generator.config):
            raise CheckpointError(f"{where}: its generator {dict(loaded.generator.config)} differs from "
                                  f"model.generator_checkpoint={self.generator_checkpoint} "
                                  f"({dict(self.generator.config)})")
        if type(loaded.encoder) is not type(self.encoder) or \
                dict(loaded.encoder.config) != dict(self.encoder.config):
            raise CheckpointError(f"{where}: its encoder {type(loaded.encoder).__name__}{dict(loaded.encoder.config)} "
                                  f"differs from model.encoder {type(self.encoder).__name__}{dict(self.encoder.config)}")
        self.encoder.load_state_dict(loaded.encoder.state_dict())
        rank_zero_info(f"EncoderModule: encoder initialised from {path}")
