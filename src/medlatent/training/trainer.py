"""The training loop for all stages, on Hugging Face Accelerate (one CPU/GPU, DDP over GPUs and nodes).

One optimiser step consumes ``grad_accum`` micro-batches of ``batch_size`` per process. Stage 1 and stage 2-3D
then take a discriminator step (after ``loss.disc_start``) on the same batches. The autoencoder runs under
DDP (``accelerator.prepare``); the discriminator's gradients are averaged across processes by hand, because
it is called several times per step (real, fake, and once per slice axis in 3D), which DDP does not allow.

Data order and augmentation are a pure function of (seed, epoch, position) — see
:class:`medlatent.training.data.EpochSampler` — and checkpoints hold every RNG, so a killed run resumed
from its last checkpoint takes the same next steps as one that never stopped.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from medlatent.model import MedVAE
from medlatent.model.lora import merge_lora_modules
from medlatent.training.build import build_model
from medlatent.training.checkpointing import checkpoint_dirs, load_checkpoint_state, prune, save_checkpoint
from medlatent.training.config import TrainConfig
from medlatent.training.data import EpochSampler, build_datasets, make_loader


class _Stage1Step(nn.Module):
    """What DDP wraps in stage 1 / stage 2-3D: encode, sample ``z`` from the posterior, decode."""

    def __init__(self, model: MedVAE, sample: bool) -> None:
        super().__init__()
        self.model, self.sample = model, sample

    def forward(self, x: torch.Tensor):
        return self.model(x, sample=self.sample)


class _Stage2Step(nn.Module):
    """Stage 2 (2D): stage-2 features of the posterior mean ``z``; the frozen VAE runs without a graph."""

    def __init__(self, model: MedVAE) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            z = self.model.encode(x).mean
        return self.model.stage2_features(z)


class EMA:
    """Exponential moving average of the trained parameters (used for validation and export when on)."""

    def __init__(self, params: list[nn.Parameter], decay: float) -> None:
        self.params, self.decay = params, decay
        self.shadow = [p.detach().clone() for p in params]

    @torch.no_grad()
    def update(self) -> None:
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1.0 - self.decay)

    @contextlib.contextmanager
    def swapped(self) -> Iterator[None]:
        """Temporarily put the averaged weights into the model."""
        backup = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for p, s in zip(self.params, self.shadow):
                p.copy_(s)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, b in zip(self.params, backup):
                    p.copy_(b)


@dataclass
class Progress:
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0


class Trainer:
    """Runs one training configuration.

    Args:
        cfg: the validated configuration.
        perceptual: a perceptual-loss network to use instead of building one from ``cfg.loss`` (tests pass a
            randomly initialised LPIPS).
        clip: a :class:`~medlatent.training.clip.ClipConsistency` to use instead of loading BiomedCLIP.
    """

    def __init__(self, cfg: TrainConfig, *, perceptual: nn.Module | None = None, clip: nn.Module | None = None) -> None:
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs

        self.cfg = cfg.validate()
        t = cfg.train
        self.acc = Accelerator(
            mixed_precision=t.mixed_precision, cpu=t.cpu, log_with=t.log_with or None,
            project_dir=t.output_dir, kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)],
        )
        self.rank, self.world = self.acc.process_index, self.acc.num_processes
        self.out = Path(t.output_dir)
        if self.acc.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
        # identical initial weights on every rank; different posterior noise / dropout per rank
        torch.manual_seed(t.seed)
        np.random.seed(t.seed)
        # a run that resumes takes its weights from the checkpoint: no need to fit a codec initialisation first
        resume_from = self._resume_dir()
        self.model, self.params = build_model(cfg, weights_follow=resume_from is not None)
        self.model.to(self.acc.device)
        if self.acc.device.type == "cpu":
            # channels-last speeds up CPU inference but makes oneDNN's conv backward ~2x slower
            self.model.to(memory_format=torch.contiguous_format)
        self.stage = t.stage
        self.lr = cfg.optim.base_lr * (t.batch_size * t.grad_accum if cfg.optim.scale_lr else 1)
        self.opt = torch.optim.Adam(self.params, lr=self.lr, betas=tuple(cfg.optim.betas),
                                    weight_decay=cfg.optim.weight_decay)
        self.loss = self.disc = self.opt_d = self.clip = None
        if self.stage == "stage2":
            from medlatent.training.clip import load_biomedclip

            self.clip = (clip or load_biomedclip(cfg.loss.clip_model)).to(self.acc.device)
            step_module: nn.Module = _Stage2Step(self.model)
        else:
            from medlatent.training.losses import Stage1Loss

            loss_cfg = cfg.loss
            self.loss = Stage1Loss(loss_cfg, in_channels=cfg.data.in_channels,
                                   perceptual=perceptual, clip=clip).to(self.acc.device)
            self.disc = self.loss.discriminator
            if loss_cfg.learn_logvar:
                self.opt.add_param_group({"params": [self.loss.logvar]})
            self.opt_d = torch.optim.Adam(list(self.disc.parameters()), lr=self.lr, betas=tuple(cfg.optim.betas))
            step_module = _Stage1Step(self.model, t.sample_posterior)
        torch.manual_seed(t.seed + 1000 * self.rank)  # after every module is built: same weights on all ranks
        self.step_module, self.opt = self.acc.prepare(step_module, self.opt)
        if self.opt_d is not None:
            self.opt_d = self.acc.prepare(self.opt_d)
        self.ema = EMA(self.params, t.ema_decay) if t.ema_decay else None

        self.train_ds, self.val_ds = build_datasets(cfg.data, downsample=self.model.downsample_per_axis)
        self.sampler = EpochSampler(len(self.train_ds), t.batch_size, t.seed, rank=self.rank, world_size=self.world)
        self.progress = Progress()
        self._log_columns: list[str] = []
        if resume_from is not None:
            self._resume(resume_from)

    # ------------------------------------------------------------------ helpers
    @property
    def is_main(self) -> bool:
        return self.acc.is_main_process

    def _barrier(self) -> None:
        self.acc.wait_for_everyone()

    def _allreduce_disc_grads(self) -> None:
        if self.world == 1 or not dist.is_initialized():
            return
        grads = [p.grad for p in self.disc.parameters() if p.grad is not None]
        for g in grads:
            dist.all_reduce(g)
            g.div_(self.world)

    def _sync_disc_buffers(self) -> None:
        """Average the discriminator's BatchNorm running statistics, so every rank holds the same state."""
        if self.world == 1 or not dist.is_initialized():
            return
        for b in self.disc.buffers():
            if b.is_floating_point():
                dist.all_reduce(b)
                b.div_(self.world)

    def _batches(self) -> Iterator[torch.Tensor]:
        """Micro-batches forever, epoch after epoch, starting where the progress counters say."""
        while True:
            self.sampler.set_epoch(self.progress.epoch, self.progress.batch_in_epoch)
            loader = make_loader(self.train_ds, self.sampler, self.cfg.train.batch_size, self.cfg.data.num_workers)
            for batch in loader:
                self.progress.batch_in_epoch += 1
                yield batch["image"].to(self.acc.device, non_blocking=True)
            self.progress.epoch += 1
            self.progress.batch_in_epoch = 0

    # ------------------------------------------------------------------ one optimiser step
    def _stage1_step(self, micro: list[torch.Tensor]) -> dict[str, float]:
        step, n = self.progress.step, len(micro)
        unwrapped = self.model
        last = unwrapped.last_layer_weight()
        last = last if last.requires_grad and self.cfg.loss.adaptive_disc_weight else None
        logs: dict[str, float] = {}
        pairs = []
        self.disc.requires_grad_(False)  # the generator pass needs gradients through D, not into it
        for i, x in enumerate(micro):
            sync = contextlib.nullcontext() if i == n - 1 else self.acc.no_sync(self.step_module)
            with sync:
                with self.acc.autocast():
                    out = self.step_module(x)
                    loss, g_logs = self.loss.generator_loss(x, out.reconstruction, out.posterior, step, last)
                self.acc.backward(loss / n)
            pairs.append((x, out.reconstruction.detach()))
            _accumulate(logs, g_logs, n)
        self.disc.requires_grad_(True)
        self._clip_and_step(self.opt, self.params)
        if self.ema:
            self.ema.update()
        if self.loss.discriminator_active(step):
            for x, rec in pairs:
                with self.acc.autocast():
                    d_loss, d_logs = self.loss.discriminator_loss(x, rec, step)
                self.acc.backward(d_loss / n)
                _accumulate(logs, d_logs, n)
            self._allreduce_disc_grads()
            self.opt_d.step()
            self.opt_d.zero_grad(set_to_none=True)
            self._sync_disc_buffers()
        return logs

    def _stage2_step(self, micro: list[torch.Tensor]) -> dict[str, float]:
        n, logs = len(micro), {}
        for i, x in enumerate(micro):
            sync = contextlib.nullcontext() if i == n - 1 else self.acc.no_sync(self.step_module)
            with sync:
                with self.acc.autocast():
                    feats = self.step_module(x)
                    loss = self.clip.latent_loss(x, feats).mean()
                self.acc.backward(loss / n)
            _accumulate(logs, {"total": float(loss.detach()), "clip": float(loss.detach())}, n)
        self._clip_and_step(self.opt, self.params)
        if self.ema:
            self.ema.update()
        return logs

    def _clip_and_step(self, opt, params) -> None:
        if self.cfg.optim.grad_clip:
            self.acc.clip_grad_norm_(params, self.cfg.optim.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)

    # ------------------------------------------------------------------ the loop
    def fit(self, max_steps: int | None = None) -> dict[str, float]:
        """Train until ``max_steps`` (default ``train.max_steps``); returns the last validation metrics."""
        t = self.cfg.train
        stop = max_steps if max_steps is not None else t.max_steps
        batches = self._batches()
        metrics: dict[str, float] = {}
        self.step_module.train()
        t0 = time.perf_counter()
        budget = t.max_minutes * 60 if t.max_minutes else math.inf
        while self.progress.step < stop:
            if budget < math.inf and self._over_budget(time.perf_counter() - t0 > budget):
                stop = self.progress.step + 1  # one more step, then the end-of-run log, validation, checkpoint
            micro = [next(batches) for _ in range(t.grad_accum)]
            lr = self._set_lr(self.progress.step + 1)
            logs = self._stage2_step(micro) if self.stage == "stage2" else self._stage1_step(micro)
            self.progress.step += 1
            s = self.progress.step
            if s % t.log_every == 0 or s == stop:
                self._log({"step": s, "epoch": self.progress.epoch, "lr": lr,
                           "seconds": round(time.perf_counter() - t0, 2), **logs})
            if self.val_ds is not None and (s % t.val_every == 0 or s == stop):
                metrics = self.validate()
            if s % t.ckpt_every == 0 or s == stop:
                self.save()
        self._barrier()
        return metrics

    def _set_lr(self, step: int) -> float:
        """The learning rate of optimiser step ``step`` (1-based): ``optim.warmup_steps`` of linear warm-up.

        Set before every step, so the configuration decides it: resuming with a new ``optim.base_lr`` (e.g. to
        decay it for the last steps) takes effect; with an unchanged config the run continues as it was.
        """
        warm = self.cfg.optim.warmup_steps
        lr = self.lr * min(1.0, step / warm) if warm else self.lr
        for opt in filter(None, (self.opt, self.opt_d)):
            for group in opt.optimizer.param_groups:
                group["lr"] = lr
        return lr

    def _over_budget(self, local: bool) -> bool:
        """Every rank stops at the same step: the time budget is over when any rank says so."""
        if self.world == 1 or not dist.is_initialized():
            return local
        flag = torch.tensor([float(local)], device=self.acc.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    # ------------------------------------------------------------------ logging, validation, export
    def _log(self, row: dict[str, Any]) -> None:
        if self.cfg.train.log_with:
            self.acc.log({k: v for k, v in row.items() if k != "step"}, step=row["step"])
        if not self.is_main:
            return
        path = self.out / "log.csv"
        new = [k for k in row if k not in self._log_columns]
        if new or not path.exists():
            old_rows = list(csv.DictReader(path.open())) if path.exists() else []
            self._log_columns += new
            with path.open("w", newline="") as fh:
                w = csv.DictWriter(fh, fieldnames=self._log_columns)
                w.writeheader()
                w.writerows(old_rows)
        with path.open("a", newline="") as fh:
            csv.DictWriter(fh, fieldnames=self._log_columns).writerow(row)

    def _truncate_log(self, step: int) -> None:
        """Drop log rows after ``step`` (written by a run killed after its last checkpoint)."""
        path = self.out / "log.csv"
        if not path.exists():
            return
        with path.open() as fh:
            reader = csv.DictReader(fh)
            self._log_columns = list(reader.fieldnames or [])
            rows = [r for r in reader if int(r["step"]) <= step]
        with path.open("w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=self._log_columns)
            w.writeheader()
            w.writerows(rows)

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """PSNR / MS-SSIM of posterior-mean reconstructions on the validation set, PNG previews (main process)."""
        from medlatent.metrics import ms_ssim, psnr
        from medlatent.training.previews import save_previews

        metrics: dict[str, float] = {}
        if self.is_main:
            model = self.model
            was_training = model.training
            model.eval()
            ctx = self.ema.swapped() if self.ema else contextlib.nullcontext()
            scores: dict[str, list[float]] = {"val_psnr": [], "val_ms_ssim": []}
            shown = []
            with ctx:
                for i in range(min(len(self.val_ds), self.cfg.train.val_max_images)):
                    x = self.val_ds[i]["image"][None].to(self.acc.device)
                    rec = model.reconstruct(x).clamp(-1, 1)
                    a, b = ((x[0] + 1) / 2).float().cpu(), ((rec[0] + 1) / 2).float().cpu()
                    scores["val_psnr"].append(psnr(a, b))
                    dims = model.spatial_dims  # volumes arrive as 1×X×Y×Z
                    value = ms_ssim(a if dims == 2 else a[0], b if dims == 2 else b[0], spatial_dims=dims)
                    if not math.isnan(value):
                        scores["val_ms_ssim"].append(value)
                    if len(shown) < self.cfg.train.previews:
                        shown.append((a, b))
            model.train(was_training)
            metrics = {k: float(np.mean([v for v in vals if math.isfinite(v)])) if vals else float("nan")
                       for k, vals in scores.items()}
            save_previews(shown, self.out / "previews" / f"step_{self.progress.step:07d}.png")
            row = {"step": self.progress.step, **{k: round(v, 4) for k, v in metrics.items()}}
            with (self.out / "val.jsonl").open("a") as fh:
                fh.write(json.dumps(row) + "\n")
        self._barrier()
        return metrics

    def _state(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "step": self.progress.step, "epoch": self.progress.epoch, "batch_in_epoch": self.progress.batch_in_epoch,
            "opt": self.opt.optimizer.state_dict(),
            "config": self.cfg.to_dict(),
        }
        if self.opt_d is not None:
            state["opt_d"] = self.opt_d.optimizer.state_dict()
            state["loss"] = {k: v.detach().clone() for k, v in self.loss.state_dict().items()
                             if k.startswith(("discriminator.", "logvar"))}
        if self.ema:
            state["ema"] = [s.clone() for s in self.ema.shadow]
        return state

    def save(self) -> Path:
        """Write a checkpoint of the current step (all processes must call it)."""
        d = self.out / "checkpoints" / f"step_{self.progress.step:07d}"
        save_checkpoint(d, self.model, self._state(), self.rank, self.world, self.is_main, self._barrier)
        if self.is_main:
            prune(self.out, self.cfg.train.keep_checkpoints)
        self._barrier()
        return d

    def _resume_dir(self) -> Path | None:
        """The checkpoint ``train.resume`` names: the newest in ``output_dir`` for ``auto`` (None if there is
        none), a given folder, or None when resuming is off."""
        src = self.cfg.train.resume
        if not src:
            return None
        if src == "auto":
            found = checkpoint_dirs(self.out)
            return found[-1] if found else None
        directory = Path(src)
        if not (directory / "state.pt").is_file():
            raise FileNotFoundError(f"train.resume={src}: not a checkpoint folder (no state.pt)")
        return directory

    def _resume(self, directory: Path) -> None:
        state = load_checkpoint_state(directory, self.model, self.rank, self.world)
        self.opt.optimizer.load_state_dict(state["opt"])
        if self.opt_d is not None and "opt_d" in state:
            self.opt_d.optimizer.load_state_dict(state["opt_d"])
        if "loss" in state:  # the discriminator and the learned log-variance (stage 1)
            self.loss.load_state_dict({**self.loss.state_dict(), **state["loss"]})
        if self.ema and "ema" in state:
            self.ema.shadow = [s.to(self.acc.device) for s in state["ema"]]
        self.progress = Progress(state["step"], state["epoch"], state["batch_in_epoch"])
        if self.is_main:
            self._truncate_log(self.progress.step)
            print(f"resumed from {directory} at step {self.progress.step}")

    def export(self, directory: str | Path | None = None, merged: bool | None = None) -> Path:
        """Save the trained model for inference (medlatent format; LoRA merged unless ``merged=False``)."""
        directory = Path(directory or self.out / "final")
        merged = self.cfg.train.export_merged if merged is None else merged
        if self.is_main:
            ctx = self.ema.swapped() if self.ema else contextlib.nullcontext()
            with ctx:
                model = copy.deepcopy(self.model).cpu().eval()
            if merged:
                merge_lora_modules(model)
            model.requires_grad_(False)
            model.save_pretrained(directory, name=self.cfg.model.name)
        self._barrier()
        return directory

    def end(self) -> None:
        self.acc.end_training()


def _accumulate(total: dict[str, float], logs: dict[str, float], n: int) -> None:
    for k, v in logs.items():
        total[k] = total.get(k, 0.0) + float(v) / n
