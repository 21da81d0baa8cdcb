"""The training loop for all stages, on Hugging Face Accelerate (one CPU/GPU, DDP over GPUs and nodes).

One optimiser step consumes ``grad_accum`` micro-batches of ``batch_size`` per process. Stage 1 and stage 2-3D
then take a discriminator step (after ``loss.disc_start``; never with ``disc_start: null``, which builds no
discriminator) on the same batches, or, with
``loss.disc_schedule: alternate`` (the official loop), odd steps train only the discriminator. The autoencoder
runs under DDP (``accelerator.prepare``); the discriminator's gradients are averaged across processes by hand, because
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
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from medlatent.model import MedVAE
from medlatent.training.build import build_model
from medlatent.training.checkpointing import checkpoint_dirs, load_checkpoint_state, prune, save_checkpoint
from medlatent.training.config import TrainConfig, check_trackers
from medlatent.training.data import EpochSampler, build_datasets, make_loader
from medlatent.training.export import export_model
from medlatent.training.previews import LOG_FILE, VAL_FILE, save_curves, save_previews
from medlatent.training.schedule import learning_rate

SPLIT_FILE = "val_split.txt"  # how the validation images were chosen, and their paths


class TrainingInterrupted(Exception):
    """SIGINT/SIGTERM stopped the run after a checkpoint of the step it was in was saved."""

    def __init__(self, signum: int, step: int, checkpoint: Path) -> None:
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        super().__init__(f"interrupted by {signal.Signals(signum).name} at step {step}: checkpoint saved in "
                         f"{checkpoint}; run the same command again to resume from it")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM


class _Stage1Step(nn.Module):
    """What DDP wraps in stage 1 / stage 2-3D: encode, sample ``z`` from the posterior, decode."""

    def __init__(self, model: MedVAE, sample: bool) -> None:
        super().__init__()
        self.model, self.sample = model, sample

    def forward(self, x: torch.Tensor):
        # the readers refused non-finite images; scanning every batch again would wait for the device each step
        return self.model(x, sample=self.sample, check_finite=False)


class _Stage2Step(nn.Module):
    """Stage 2 (2D): stage-2 features of the posterior mean ``z``; the frozen VAE runs without a graph."""

    def __init__(self, model: MedVAE) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            z = self.model.encode(x, check_finite=False).mean
        return self.model.stage2_features(z, check_finite=False)


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
        from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration

        self.cfg = cfg.validate()
        t = cfg.train
        check_trackers(t.log_with)  # a tracker that is not installed stops the run here, not silently later
        self.acc = Accelerator(
            mixed_precision=t.mixed_precision, cpu=t.cpu, log_with=t.log_with or None,
            project_config=ProjectConfiguration(project_dir=t.output_dir,
                                                logging_dir=str(Path(t.output_dir) / "tensorboard")),
            kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)],
        )
        self.rank, self.world = self.acc.process_index, self.acc.num_processes
        self.out = Path(t.output_dir)  # created once the model and the data are known to load
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
            if self.disc is not None:  # GAN off (disc_start: null): no discriminator and no optimiser for it
                self.opt_d = torch.optim.Adam(list(self.disc.parameters()), lr=self.lr,
                                              betas=tuple(cfg.optim.betas))
            step_module = _Stage1Step(self.model, t.sample_posterior)
        torch.manual_seed(t.seed + 1000 * self.rank)  # after every module is built: same weights on all ranks
        self.step_module, self.opt = self.acc.prepare(step_module, self.opt)
        if self.opt_d is not None:
            self.opt_d = self.acc.prepare(self.opt_d)
        self.ema = EMA(self.params, t.ema_decay) if t.ema_decay else None

        self.train_ds, self.val_ds = build_datasets(cfg.data, downsample=self.model.downsample_per_axis,
                                                    seed=t.seed)
        self.sampler = EpochSampler(len(self.train_ds), t.batch_size, t.seed, rank=self.rank, world_size=self.world)
        self.progress = Progress()
        self._log_columns: list[str] = []
        self._pending: dict[str, list[float]] = {}  # per-step values since the last log row: [sum, count]
        self._elapsed = 0.0  # training seconds of earlier processes of this run (restored on resume)
        self._t0: float | None = None  # perf_counter() at which this run's elapsed time would have been 0
        self._stop_signal: int | None = None
        if resume_from is not None:
            self._resume(resume_from)
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
        self._barrier()
        if self.is_main and self.val_ds is not None:
            from medlatent.training.validation import write_split

            write_split(self.out / SPLIT_FILE, self.val_ds.entries, self.val_ds.selection)
        if t.log_with:
            self.acc.init_trackers("medlatent", config=_flat(cfg.to_dict()),
                                   init_kwargs={"wandb": {"name": self.out.resolve().name}})

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
        """One optimiser step: the autoencoder's, the discriminator's, or both (``loss.disc_schedule``)."""
        step = self.progress.step
        logs: dict[str, float] = {}
        if self.loss.trains_generator(step):
            pairs = self._generator_step(micro, logs)
        else:  # alternate schedule, odd step: reconstructions of this step's batches, without a graph
            with torch.no_grad(), self.acc.autocast():
                pairs = [(x, self.step_module(x).reconstruction.detach()) for x in micro]
        if self.loss.trains_discriminator(step):
            self._discriminator_step(pairs, logs)
        return logs

    def _generator_step(self, micro: list[torch.Tensor], logs: dict[str, float]
                        ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        step, n = self.progress.step, len(micro)
        last = self.model.last_layer_weight()
        last = last if last.requires_grad and self.cfg.loss.adaptive_disc_weight else None
        pairs = []
        if self.disc is not None:
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
        if self.disc is not None:
            self.disc.requires_grad_(True)
        self._clip_and_step(self.opt, self.params)
        if self.ema:
            self.ema.update()
        return pairs

    def _discriminator_step(self, pairs: list[tuple[torch.Tensor, torch.Tensor]], logs: dict[str, float]) -> None:
        step, n = self.progress.step, len(pairs)
        for x, rec in pairs:
            with self.acc.autocast():
                d_loss, d_logs = self.loss.discriminator_loss(x, rec, step)
            self.acc.backward(d_loss / n)
            _accumulate(logs, d_logs, n)
        self._allreduce_disc_grads()
        self.opt_d.step()
        self.opt_d.zero_grad(set_to_none=True)
        self._sync_disc_buffers()

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
        started = time.perf_counter()
        self._t0 = started - self._elapsed  # the seconds column continues across resumes
        budget = t.max_minutes * 60 if t.max_minutes else math.inf
        with self._stop_on_signals():
            while self.progress.step < stop:
                if budget < math.inf and self._over_budget(time.perf_counter() - started > budget):
                    stop = self.progress.step + 1  # one more step, then the end-of-run log, validation, checkpoint
                micro = [next(batches) for _ in range(t.grad_accum)]
                lr = self._set_lr(self.progress.step + 1)
                logs = self._stage2_step(micro) if self.stage == "stage2" else self._stage1_step(micro)
                self.progress.step += 1
                s = self.progress.step
                self._add_pending({"lr": lr, **logs})
                interrupted = self._signalled()
                if s % t.log_every == 0 or s == stop or interrupted:
                    self._flush_log(stop)
                if interrupted:
                    self._interrupt()
                if self.val_ds is not None and (s % t.val_every == 0 or s == stop):
                    metrics = self.validate()
                if s % t.ckpt_every == 0 or s == stop:
                    self.save()
        self._barrier()
        if self.is_main:
            save_curves(self.out)
        return metrics

    # ------------------------------------------------------------------ interrupts
    @contextlib.contextmanager
    def _stop_on_signals(self) -> Iterator[None]:
        """SIGINT/SIGTERM finish the current step, save a checkpoint and stop (a second signal stops at once)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {}

        def handler(signum: int, frame) -> None:
            if self._stop_signal is not None:
                for sig, old in previous.items():
                    signal.signal(sig, old)
                raise KeyboardInterrupt
            self._stop_signal = signum
            print(f"{signal.Signals(signum).name}: finishing step {self.progress.step + 1}, then saving a checkpoint "
                  "(send it again to stop at once, losing the steps since the last checkpoint)",
                  file=sys.stderr, flush=True)

        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, handler)
        try:
            yield
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)

    def _signalled(self) -> bool:
        """Whether any rank received SIGINT/SIGTERM (all ranks stop at the same step)."""
        local = self._stop_signal is not None
        if self.world == 1 or not dist.is_initialized():
            return local
        flag = torch.tensor([float(self._stop_signal or 0)], device=self.acc.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() and self._stop_signal is None:
            self._stop_signal = int(flag.item())
        return bool(flag.item())

    def _interrupt(self) -> None:
        """Save the step just finished (unless its checkpoint exists) and raise :class:`TrainingInterrupted`."""
        d = self.out / "checkpoints" / f"step_{self.progress.step:07d}"
        if not (d / "state.pt").is_file():
            d = self.save()
        if self.is_main:
            save_curves(self.out)
        raise TrainingInterrupted(self._stop_signal or signal.SIGINT, self.progress.step, d)

    def _set_lr(self, step: int) -> float:
        """The learning rate of optimiser step ``step`` (1-based): ``optim.warmup_steps`` of linear warm-up, then
        ``optim.schedule`` over ``train.max_steps`` (:func:`medlatent.training.schedule.learning_rate`).

        Set before every step, so the configuration decides it: resuming with a new ``optim.base_lr`` (e.g. to
        decay it for the last steps) takes effect; with an unchanged config the run continues as it was.
        """
        o = self.cfg.optim
        lr = learning_rate(step, self.lr, warmup_steps=o.warmup_steps, schedule=o.schedule,
                           max_steps=self.cfg.train.max_steps, min_lr_ratio=o.min_lr_ratio)
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
    def _add_pending(self, logs: dict[str, float]) -> None:
        for k, v in logs.items():
            total = self._pending.setdefault(k, [0.0, 0])
            total[0] += float(v)
            total[1] += 1

    def _flush_log(self, stop: int) -> None:
        """One log row: every value averaged over the steps since the previous row (terms that are off in some
        of them, like ``disc`` before ``loss.disc_start``, over the steps that had them)."""
        means = {k: total / n for k, (total, n) in self._pending.items()}
        self._pending = {}
        row = {"step": self.progress.step, "epoch": self.progress.epoch,
               "seconds": round(time.perf_counter() - self._t0, 2), **means}
        self._log(row)
        if self.is_main:
            terms = "  ".join(f"{k} {means[k]:.4g}" for k in ("total", "rec", "clip", "disc") if k in means)
            print(f"step {row['step']}/{stop}  {terms}  lr {means.get('lr', 0):.3g}  {row['seconds']:.0f} s",
                  flush=True)

    def _log(self, row: dict[str, Any]) -> None:
        if self.cfg.train.log_with:
            self.acc.log({k: v for k, v in row.items() if k != "step"}, step=row["step"])
        if not self.is_main:
            return
        path = self.out / LOG_FILE
        new = [k for k in row if k not in self._log_columns]
        if new or not path.exists():
            old_rows = _read_rows(path)
            self._log_columns += new
            _write_rows(path, self._log_columns, old_rows)
        with path.open("a", newline="") as fh:
            csv.DictWriter(fh, fieldnames=self._log_columns, lineterminator="\n").writerow(row)

    def _truncate_log(self, step: int) -> None:
        """Drop log rows after ``step`` (written by a run killed after its last checkpoint)."""
        path = self.out / LOG_FILE
        if not path.exists():
            return
        with path.open(newline="") as fh:
            self._log_columns = list(csv.DictReader(fh).fieldnames or [])
        _write_rows(path, self._log_columns, [r for r in _read_rows(path) if int(r["step"]) <= step])
        val = self.out / VAL_FILE
        if val.exists():  # validation rows after the checkpoint, likewise
            kept = [ln for ln in val.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
            val.write_text("".join(ln + "\n" for ln in kept))

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """PSNR / MS-SSIM of whole validation images, as ``medlatent evaluate recon`` measures them
        (:mod:`medlatent.training.validation`), and PNG previews (main process)."""
        from medlatent.training.validation import validate_model

        metrics: dict[str, float] = {}
        if self.is_main:
            model = self.model
            was_training = model.training
            model.eval()
            ctx = self.ema.swapped() if self.ema else contextlib.nullcontext()
            entries = self.val_ds.entries[: self.cfg.train.val_max_images]
            try:
                with ctx:
                    metrics, shown = validate_model(model, entries, self.cfg.data, self.cfg.train.previews)
            finally:
                model.train(was_training)
            save_previews(shown, self.out / "previews" / f"step_{self.progress.step:07d}.png")
            row = {"step": self.progress.step, **{k: round(v, 4) for k, v in metrics.items()}}
            row["val_images"] = len(entries)
            with (self.out / VAL_FILE).open("a") as fh:
                fh.write(json.dumps(row) + "\n")
            if self.cfg.train.log_with:
                self.acc.log({k: v for k, v in metrics.items() if k != "val_images"}, step=self.progress.step)
        self._barrier()
        return metrics

    def _state(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "step": self.progress.step, "epoch": self.progress.epoch, "batch_in_epoch": self.progress.batch_in_epoch,
            "opt": self.opt.optimizer.state_dict(),
            "config": self.cfg.to_dict(),
            "seconds": self._elapsed if self._t0 is None else time.perf_counter() - self._t0,
        }
        if self.opt_d is not None:
            state["opt_d"] = self.opt_d.optimizer.state_dict()
        if self.loss is not None:  # the learned log-variance, and the discriminator when the GAN is on
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
        saved = dict(state.get("loss", {}))  # the learned log-variance and, if the GAN was on, the discriminator
        had_disc = any(k.startswith("discriminator.") for k in saved)
        if self.disc is None and had_disc:  # GAN switched off since: the saved critic is not needed
            saved = {k: v for k, v in saved.items() if not k.startswith("discriminator.")}
            self._note(f"{directory}: its discriminator is not used (loss.disc_start: null switches the GAN off)")
        elif self.disc is not None and not had_disc and self.loss is not None:
            self._note(f"{directory}: saved without a discriminator (GAN off); it starts from its initial weights "
                       f"and becomes active at step {self.cfg.loss.disc_start}")
        if self.opt_d is not None and "opt_d" in state and had_disc:
            self.opt_d.optimizer.load_state_dict(state["opt_d"])
        if saved and self.loss is not None:
            self.loss.load_state_dict({**self.loss.state_dict(), **saved})
        if self.ema and "ema" in state:
            self.ema.shadow = [s.to(self.acc.device) for s in state["ema"]]
        self.progress = Progress(state["step"], state["epoch"], state["batch_in_epoch"])
        self._elapsed = float(state.get("seconds", 0.0))
        if self.is_main:
            self._truncate_log(self.progress.step)
            print(f"resumed from {directory} at step {self.progress.step}")

    def _note(self, text: str) -> None:
        if self.is_main:
            print(text, flush=True)

    def export(self, directory: str | Path | None = None, merged: bool | None = None) -> Path:
        """Save the trained model for inference (medlatent format; LoRA merged unless ``merged=False``)."""
        directory = Path(directory or self.out / "final")
        merged = self.cfg.train.export_merged if merged is None else merged
        if self.is_main:
            ctx = self.ema.swapped() if self.ema else contextlib.nullcontext()
            with ctx:  # a CPU snapshot of the weights to export (the averaged ones with EMA)
                model = copy.deepcopy(self.model).cpu().eval().requires_grad_(False)
            export_model(model, directory, merged=merged, name=self.cfg.export_name())
        self._barrier()
        return directory

    def end(self) -> None:
        self.acc.end_training()


def _read_rows(path: Path) -> list[dict[str, str]]:
    if not path.exists():
        return []
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def _write_rows(path: Path, columns: list[str], rows: list[dict[str, Any]]) -> None:
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=columns, lineterminator="\n")
        w.writeheader()
        w.writerows(rows)


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"train": {"seed": 0}}`` → ``{"train.seed": 0}``, lists and None as text (what trackers store)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, (bool, int, float, str)) else str(v)
    return out


def _accumulate(total: dict[str, float], logs: dict[str, float], n: int) -> None:
    for k, v in logs.items():
        total[k] = total.get(k, 0.0) + float(v) / n
