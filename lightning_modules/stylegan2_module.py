"""Stage 0: StyleGAN2 generator training (non-saturating loss, lazy R1, optional path length, EMA).

Follows rosinality/stylegan2-pytorch ``train.py``: per iteration one discriminator step, a lazy R1
step every ``r1_every`` iterations, one generator step, a lazy path-length step every ``pl_every``
iterations (when ``pl_weight > 0``), then the EMA update of ``g_ema``. Adam learning rates and betas
of lazily regularised networks are corrected by ``every / (every + 1)`` as in the paper (Appendix B).

Notes for trainers:

* ``trainer.global_step`` counts *iterations* (one per batch): only the generator's main step goes
  through Lightning's step counter, so ``max_steps`` and ``every_n_train_steps`` mean iterations.
* All randomness of an iteration (z, style mixing, noise maps, path-length noise) is drawn from a
  generator seeded by (run seed, iteration, rank), so resuming from ``last.ckpt`` continues exactly
  as an uninterrupted run would (given the same data order).
* DDP: both networks are trained in one ``training_step`` with different parameter subsets per
  backward, so use ``strategy="ddp_find_unused_parameters_true"``.
* Mixed precision (``"16-mixed"`` / ``"bf16-mixed"``): the adversarial passes run under autocast,
  the R1 and path-length passes in float32 (their input gradients under-/overflow in fp16).
* Fine-tuning: ``init_checkpoint`` loads a rosinality-layout generator file (``g_ema``, optional ``g``
  and ``d``) at construction, so a bad file fails before anything is written. When ``fit`` resumes
  from a Lightning checkpoint, Lightning restores that checkpoint afterwards and its state wins.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info

from lightning_modules.gan_losses import d_logistic_loss, g_nonsaturating_loss, path_length_penalty, r1_penalty
from lightning_modules.steps import uncounted_step
from networks.checkpoints import (CheckpointError, describe_mismatch, export_generator, infer_generator_config,
                                  safe_load)
from networks.stylegan2 import Discriminator, Generator

PRODUCED_BY = "stage0 StyleGAN2Module"


def _as_kwargs(value: Any, key: str) -> Dict[str, Any]:
    """Plain dict from a dict / OmegaConf node (so hparams and checkpoints hold no OmegaConf objects)."""
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(value, DictConfig):
            value = OmegaConf.to_container(value, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf is a dependency, but the module does not need it
        pass
    if not isinstance(value, Mapping):
        raise TypeError(f"StyleGAN2Module: `{key}` (config model.{key}) must be a dict of "
                        f"{key.capitalize()} constructor kwargs, got {type(value).__name__}")
    return {str(k): (list(v) if isinstance(v, tuple) else v) for k, v in value.items()}


def _build(cls, kwargs: Dict[str, Any], key: str):
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise type(err)(f"StyleGAN2Module: cannot build {cls.__name__} from model.{key}={kwargs}: {err}") from None


@contextmanager
def _seeded_rng(seed: int, device: torch.device) -> Iterator[None]:
    """Run the block with the CPU (and this CUDA device's) RNG seeded to ``seed``; restore afterwards."""
    devices: List[int] = []
    if device.type == "cuda":
        devices = [device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=devices):
        torch.random.default_generator.manual_seed(seed)
        for idx in devices:
            torch.cuda.default_generators[idx].manual_seed(seed)
        yield


class StyleGAN2Module(pl.LightningModule):
    """Trains a StyleGAN2 generator ``g`` against a discriminator ``d`` and keeps an EMA copy ``g_ema``.

    Args:
        generator: ``networks.stylegan2.Generator`` kwargs (e.g. ``{"size": 32, "style_dim": 128}``).
        discriminator: ``networks.stylegan2.Discriminator`` kwargs; ``size`` must equal the generator's.
        lr: Adam learning rate (before the lazy-regularisation correction).
        r1_gamma: R1 weight gamma; the penalty is ``gamma / 2 * r1_every * R1`` every ``r1_every``
            iterations; 0 disables R1.
        r1_every: lazy R1 interval (iterations).
        pl_weight: path-length weight; 0 disables path-length regularisation.
        pl_every: lazy path-length interval (iterations).
        pl_batch_shrink: the path-length batch is ``max(1, B // pl_batch_shrink)``.
        ema_beta: EMA decay of ``g_ema``; the decay used at iteration t is
            ``min(ema_beta, (1 + t) / (10 + t))`` so early iterations are not dominated by the init.
        mixing_prob: probability of style mixing (two z, random crossover layer) per batch.
        sample_every_n_steps, n_samples, sample_seed: defaults read by ``callbacks.sample_grid.SampleGrid``.
        init_checkpoint: optional generator file to start from (``stylegan2-ffhq-config-f.pt``, a
            stage-0 ``generator.pt``): ``g_ema`` goes into ``g_ema`` and ``g``, the file's ``g`` (if
            any) into ``g``, its ``d`` (if any) into ``d``, all strictly; its ``latent_avg`` is kept as
            ``init_latent_avg`` (style_dim,). Raises ``CheckpointError`` if the file is missing, unsafe
            or does not fit ``generator`` / ``discriminator``.
        checkpoint_trust: allow ``init_checkpoint`` files that need arbitrary unpickling (trusted sources only).

    Batches are dicts with ``"image"`` (B, 3, size, size) in [-1, 1] (every DataModule's batch). B must be
    divisible by min(B, 4) (minibatch-stddev groups).
    """

    def __init__(self, generator: dict, discriminator: dict, lr: float = 0.002, r1_gamma: float = 10.0,
                 r1_every: int = 16, pl_weight: float = 0.0, pl_every: int = 4, pl_batch_shrink: int = 2,
                 ema_beta: float = 0.999, mixing_prob: float = 0.9, sample_every_n_steps: int = 500,
                 n_samples: int = 16, sample_seed: int = 0, init_checkpoint: Optional[str] = None,
                 checkpoint_trust: bool = False):
        super().__init__()
        generator = _as_kwargs(generator, "generator")
        discriminator = _as_kwargs(discriminator, "discriminator")
        checks = {  # name: (value, valid)
            "lr": (lr, lr > 0), "r1_gamma": (r1_gamma, r1_gamma >= 0), "r1_every": (r1_every, r1_every >= 1),
            "pl_weight": (pl_weight, pl_weight >= 0), "pl_every": (pl_every, pl_every >= 1),
            "pl_batch_shrink": (pl_batch_shrink, pl_batch_shrink >= 1), "ema_beta": (ema_beta, 0 <= ema_beta < 1),
            "mixing_prob": (mixing_prob, 0 <= mixing_prob <= 1),
            "sample_every_n_steps": (sample_every_n_steps, sample_every_n_steps >= 0),
            "n_samples": (n_samples, n_samples >= 1),
        }
        bad = [f"model.{k}={v!r}" for k, (v, ok) in checks.items() if not ok]
        if bad:
            values = ", ".join(bad)
            raise ValueError(f"StyleGAN2Module: invalid {values} (need lr > 0, r1_gamma >= 0, pl_weight >= 0, "
                             f"*_every >= 1, pl_batch_shrink >= 1, 0 <= ema_beta < 1, 0 <= mixing_prob <= 1, "
                             f"sample_every_n_steps >= 0, n_samples >= 1)")
        if "size" in generator and "size" in discriminator and generator["size"] != discriminator["size"]:
            raise ValueError(f"StyleGAN2Module: model.generator.size={generator['size']} != "
                             f"model.discriminator.size={discriminator['size']}")
        self.save_hyperparameters()
        self.automatic_optimization = False

        self.g = _build(Generator, generator, "generator")
        self.d = _build(Discriminator, discriminator, "discriminator")
        self.g_ema = _build(Generator, generator, "generator")
        self.g_ema.load_state_dict(self.g.state_dict())
        self.g_ema.requires_grad_(False)  # trained only through the EMA; train/eval mode is irrelevant (no BN/dropout)
        self.register_buffer("mean_path_length", torch.zeros(()))
        # Not persistent: Lightning checkpoints keep their keys whether or not a file was used.
        self.register_buffer("init_latent_avg", None, persistent=False)
        if init_checkpoint is not None and not isinstance(init_checkpoint, (str, Path)):
            raise TypeError(f"StyleGAN2Module: model.init_checkpoint must be a file path or null, "
                            f"got {type(init_checkpoint).__name__}")
        self.init_checkpoint = str(init_checkpoint) if init_checkpoint else None
        if self.init_checkpoint:
            self._load_init_checkpoint(Path(self.init_checkpoint).expanduser(), bool(checkpoint_trust))

        self.lr, self.r1_gamma, self.r1_every = float(lr), float(r1_gamma), int(r1_every)
        self.pl_weight, self.pl_every, self.pl_batch_shrink = float(pl_weight), int(pl_every), int(pl_batch_shrink)
        self.ema_beta, self.mixing_prob = float(ema_beta), float(mixing_prob)
        self.sample_every_n_steps, self.n_samples = int(sample_every_n_steps), int(n_samples)
        self.sample_seed = int(sample_seed)
        self._base_seed: Optional[int] = None  # run seed of the per-iteration RNG; saved in checkpoints

    # ------------------------------------------------------------------ public API
    def forward(self, z: torch.Tensor, truncation: float = 1.0) -> torch.Tensor:
        """Decode z (B, style_dim) with ``g_ema`` (stored noise) -> images (B, 3, size, size) in ~[-1, 1]."""
        latent_avg = self.latent_avg().view(1, -1) if truncation < 1 else None
        return self.g_ema([z], truncation=truncation, truncation_latent=latent_avg)[0]

    @torch.no_grad()
    def latent_avg(self) -> torch.Tensor:
        """Mean w of ``g_ema``, (style_dim,).

        The ``init_checkpoint`` file's ``latent_avg`` while ``g_ema`` is still the file's (no iteration
        trained yet); otherwise the mean of w over 4096 fixed z (the file's value is stale once the
        mapping network has been fine-tuned).
        """
        if self.init_latent_avg is not None and int(self.global_step) == 0:
            return self.init_latent_avg.detach().clone()
        return self.g_ema.mean_latent(4096, seed=0).reshape(-1)

    def export_handoff(self, run_dir) -> Path:
        """Write ``run_dir/generator.pt`` (rosinality layout: g_ema, latent_avg, g, d, meta); returns its path."""
        latent_avg = self.latent_avg()
        meta = {
            "produced_by": PRODUCED_BY,
            "global_step": int(self.global_step),
            "init_checkpoint": self.init_checkpoint,
            "generator": dict(self.g_ema.config),
            "discriminator": dict(self.d.config),
            "module": self._plain_hparams(),
        }
        return export_generator(Path(run_dir) / "generator.pt", self.g_ema, latent_avg, g=self.g, d=self.d,
                                meta=meta)

    # ------------------------------------------------------------------ Lightning hooks
    def configure_optimizers(self):
        """Adam for g and d, betas (0, 0.99), lr and betas corrected for lazy regularisation."""
        g_ratio = self.pl_every / (self.pl_every + 1) if self.pl_weight > 0 else 1.0
        d_ratio = self.r1_every / (self.r1_every + 1) if self.r1_gamma > 0 else 1.0
        opt_g = torch.optim.Adam(self.g.parameters(), lr=self.lr * g_ratio, betas=(0.0, 0.99 ** g_ratio))
        opt_d = torch.optim.Adam(self.d.parameters(), lr=self.lr * d_ratio, betas=(0.0, 0.99 ** d_ratio))
        return [opt_g, opt_d]

    def on_save_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        """Store the run seed of the per-iteration RNG (g_ema, buffers and optimisers are saved by Lightning)."""
        checkpoint["stage0_base_seed"] = self._run_seed()

    def on_load_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        """Restore the run seed so a resumed run draws the same randomness as an uninterrupted one."""
        if "stage0_base_seed" in checkpoint:
            self._base_seed = int(checkpoint["stage0_base_seed"])

    def training_step(self, batch, batch_idx: int) -> None:
        """One StyleGAN2 iteration: D step, [R1 step], G step, [path-length step], EMA update."""
        real = self._images(batch)
        it = int(self.global_step)  # iterations completed before this one
        opt_g, opt_d = self.optimizers()
        with _seeded_rng(self._iteration_seed(it), real.device):
            logs = self._iteration(real, it, opt_g, opt_d)
        self.log_dict(logs, on_step=True, on_epoch=False, batch_size=real.shape[0])

    # ------------------------------------------------------------------ internals
    def _load_init_checkpoint(self, path: Path, trust: bool) -> None:
        """Strictly load g_ema (-> g_ema and g), g (-> g) and d (-> d) from a generator file."""
        where = f"model.init_checkpoint={path}"
        if not path.is_file():
            raise CheckpointError(
                f"{where}: no such file. Give a generator file in the rosinality layout (e.g. "
                f"stylegan2-ffhq-config-f.pt or a stage-0 generator.pt), or model.init_checkpoint=null to train "
                f"from scratch (null is also fine when resuming: the weights then come from the Lightning checkpoint).")
        try:
            ckpt = safe_load(path, trust=trust, trust_key="model.checkpoint_trust")
        except CheckpointError as err:
            raise CheckpointError(f"{where}: {err}") from None
        if not isinstance(ckpt, Mapping) or not isinstance(ckpt.get("g_ema"), Mapping):
            found = sorted(map(str, ckpt))[:10] if isinstance(ckpt, Mapping) else type(ckpt).__name__
            raise CheckpointError(
                f"{where} is not a StyleGAN2 generator file: expected a dict with a 'g_ema' state dict "
                f"(rosinality layout: g_ema, latent_avg, [g, d]), found {found}. To continue a Lightning run "
                f"use resume=true or ckpt_path=... instead.")

        entries = [("g_ema", self.g_ema), ("g_ema", self.g)]
        if ckpt.get("g") is not None:
            entries[1] = ("g", self.g)
        if ckpt.get("d") is not None:
            entries.append(("d", self.d))
        for entry, net in entries:  # check everything before changing anything
            state = ckpt[entry]
            report = describe_mismatch(net, state) if isinstance(state, Mapping) else \
                f"  not a state dict ({type(state).__name__})"
            if report:
                raise CheckpointError(self._mismatch_message(where, ckpt, entry, net, report))
        for entry, net in entries:
            net.load_state_dict(ckpt[entry], strict=True)

        latent_avg = ckpt.get("latent_avg")
        if latent_avg is not None:
            if not torch.is_tensor(latent_avg) or latent_avg.numel() != self.g_ema.style_dim:
                size = latent_avg.numel() if torch.is_tensor(latent_avg) else type(latent_avg).__name__
                raise CheckpointError(f"{where}: latent_avg has {size} values, model.generator.style_dim is "
                                      f"{self.g_ema.style_dim}")
            self.init_latent_avg = latent_avg.detach().reshape(-1).float().clone()
        loaded = ", ".join(f"{entry} -> {name}" for (entry, _), name in zip(entries, ("g_ema", "g", "d")))
        rank_zero_info(f"StyleGAN2Module: initialised from {path} ({loaded}"
                       f"{', latent_avg' if latent_avg is not None else ''})")

    @staticmethod
    def _mismatch_message(where: str, ckpt: Mapping, entry: str, net, report: str) -> str:
        meta = ckpt.get("meta") if isinstance(ckpt.get("meta"), Mapping) else {}
        if entry == "d":
            cfg_key, file_cfg = "model.discriminator", meta.get("discriminator")
            advice = "model.discriminator follows generator.size / channel_multiplier / channel_max"
        else:
            cfg_key, file_cfg = "model.generator", meta.get("generator")
            if not file_cfg:
                try:
                    file_cfg = infer_generator_config(ckpt["g_ema"])
                except (CheckpointError, TypeError, AttributeError, KeyError, IndexError):
                    file_cfg = None
            advice = ("choose the matching generator config (e.g. generator=ffhq1024 for "
                      "stylegan2-ffhq-config-f.pt) or override generator.<key>=VALUE")
        found = f"The file's {'discriminator' if entry == 'd' else 'generator'} is {dict(file_cfg)}; " \
            if file_cfg else ""
        return (f"{where}: the file's '{entry}' weights do not fit the configured {type(net).__name__} "
                f"({cfg_key}={dict(net.config)}):\n{report}\n{found}{advice}.")

    def _iteration(self, real: torch.Tensor, it: int, opt_g, opt_d) -> Dict[str, torch.Tensor]:
        batch = real.shape[0]
        no_autocast = torch.autocast(device_type=real.device.type, enabled=False)

        self.toggle_optimizer(opt_d)
        with torch.no_grad():
            fake, _ = self.g(**self._random_styles(batch, real.device), randomize_noise=True)
        fake_pred = self.d(fake).float()
        real_pred = self.d(real).float()
        loss_d = d_logistic_loss(real_pred, fake_pred)
        opt_d.zero_grad(set_to_none=True)
        self.manual_backward(loss_d)
        uncounted_step(self, opt_d)
        logs = {"train/loss_d": loss_d.detach(), "train/real_score": real_pred.detach().mean(),
                "train/fake_score": fake_pred.detach().mean()}

        if self.r1_gamma > 0 and it % self.r1_every == 0:
            with no_autocast:
                real_in = real.detach().float().requires_grad_(True)
                pred = self.d(real_in)
                r1 = r1_penalty(pred, real_in)
                # `0 * pred` keeps the discriminator's last layer in the graph (DDP bookkeeping)
                loss_r1 = r1 * (self.r1_gamma / 2 * self.r1_every) + 0 * pred[0, 0]
            opt_d.zero_grad(set_to_none=True)
            self.manual_backward(loss_r1)
            uncounted_step(self, opt_d)
            logs["train/r1"] = r1.detach()
        self.untoggle_optimizer(opt_d)

        self.toggle_optimizer(opt_g)
        fake, _ = self.g(**self._random_styles(batch, real.device), randomize_noise=True)
        loss_g = g_nonsaturating_loss(self.d(fake).float())
        opt_g.zero_grad(set_to_none=True)
        self.manual_backward(loss_g)
        opt_g.step()  # the one counted step: global_step == iterations
        logs["train/loss_g"] = loss_g.detach()

        if self.pl_weight > 0 and it % self.pl_every == 0:
            n = max(1, batch // self.pl_batch_shrink)
            with no_autocast:
                fake, latents = self.g(**self._random_styles(n, real.device), return_latents=True,
                                       randomize_noise=True)
                penalty, path_mean, _ = path_length_penalty(fake, latents, self.mean_path_length)
                loss_pl = penalty * (self.pl_weight * self.pl_every) + 0 * fake[0, 0, 0, 0]
            opt_g.zero_grad(set_to_none=True)
            self.manual_backward(loss_pl)
            uncounted_step(self, opt_g)
            self.mean_path_length.copy_(path_mean)
            logs["train/pl"] = penalty.detach()
        self.untoggle_optimizer(opt_g)

        self._update_ema(it)
        return logs

    @torch.no_grad()
    def _update_ema(self, it: int) -> None:
        beta = min(self.ema_beta, (1.0 + it) / (10.0 + it))
        for p_ema, p in zip(self.g_ema.parameters(), self.g.parameters()):
            p_ema.lerp_(p.detach(), 1.0 - beta)
        for b_ema, b in zip(self.g_ema.buffers(), self.g.buffers()):
            b_ema.copy_(b)

    def _random_styles(self, n: int, device: torch.device) -> Dict[str, Any]:
        """Generator kwargs for n random samples: one z (B, D), or two z and a crossover layer."""
        dim = self.g.style_dim
        if self.mixing_prob > 0 and float(torch.rand(())) < self.mixing_prob:
            inject = int(torch.randint(1, self.g.n_latent, ()))
            return {"styles": list(torch.randn(2, n, dim, device=device).unbind(0)), "inject_index": inject}
        return {"styles": [torch.randn(n, dim, device=device)]}

    def _run_seed(self) -> int:
        if self._base_seed is None:
            self._base_seed = int(torch.initial_seed()) % (2 ** 63)
        return self._base_seed

    def _iteration_seed(self, it: int) -> int:
        mixed = self._run_seed() * 6364136223846793005 + (it + 1) * 1442695040888963407
        return (mixed + self.global_rank * 2654435761) % (2 ** 63)

    def _images(self, batch) -> torch.Tensor:
        images = batch["image"]  # every DataModule's batch: a dict with "image" (B, 3, S, S)
        size = self.g.size
        if not (torch.is_tensor(images) and images.is_floating_point() and images.ndim == 4
                and tuple(images.shape[1:]) == (3, size, size)):
            desc = tuple(images.shape) if torch.is_tensor(images) else type(images).__name__
            raise ValueError(f"StyleGAN2Module: batches must be float images (B, 3, {size}, {size}) in [-1, 1] "
                             f"(model.generator.size={size}); the datamodule gave {desc}. Check data.image_size.")
        return images

    def _plain_hparams(self) -> Dict[str, Any]:
        keys = ("lr", "r1_gamma", "r1_every", "pl_weight", "pl_every", "pl_batch_shrink", "ema_beta",
                "mixing_prob", "sample_every_n_steps", "n_samples", "sample_seed")
        out: Dict[str, Any] = {k: getattr(self, k) for k in keys}
        out["generator"] = _as_kwargs(self.hparams["generator"], "generator")
        out["discriminator"] = _as_kwargs(self.hparams["discriminator"], "discriminator")
        out["init_checkpoint"] = self.init_checkpoint
        return out
