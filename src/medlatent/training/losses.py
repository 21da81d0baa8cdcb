"""Stage-1 objective (paper §3, "Stage 1"; 3D "Stage 2" reuses it): L1 + perceptual reconstruction with
a learned log-variance, a KL penalty, a delayed PatchGAN with an adaptive weight (latent-diffusion's
``LPIPSWithDiscriminator``, as in the official MedVAE criterion), and an optional BiomedCLIP term.

The training loop runs two explicit steps per batch::

    loss, logs = criterion.generator_loss(x, x_rec, posterior, step, model.last_layer_weight())
    opt_ae.zero_grad(); loss.backward(); opt_ae.step()
    if criterion.discriminator_active(step):
        d_loss, d_logs = criterion.discriminator_loss(x, x_rec, step)
        opt_d.zero_grad(); d_loss.backward(); opt_d.step()

With ``disc_schedule: alternate`` (the official loop) a step is one or the other once the discriminator is on:
the autoencoder on even steps, the discriminator on odd steps (see :meth:`Stage1Loss.trains_generator`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal, get_args

import torch
import torch.nn.functional as F
from annotated_types import Ge, MinLen
from pydantic import AfterValidator, FiniteFloat
from torch import nn

from medlatent.model.posterior import DiagonalGaussian
from medlatent.training.clip import BIOMEDCLIP, ClipConsistency, load_biomedclip
from medlatent.training.discriminator import PatchDiscriminator
from medlatent.training.options import ConfigError, check_fields, option
from medlatent.training.perceptual import MSSSIMLoss, load_lpips, over_slices

Perceptual = Literal["lpips", "ms_ssim", "none"]
PERCEPTUAL_CHOICES: tuple[str, ...] = get_args(Perceptual)
#: ``alternate``: once the GAN is on, even steps train the autoencoder and odd steps the discriminator (the
#: official loop); ``every_batch``: both optimisers step on every batch
DiscSchedule = Literal["alternate", "every_batch"]
DISC_SCHEDULES: tuple[str, ...] = get_args(DiscSchedule)
#: the old way of switching the GAN off was a ``disc_start`` no run reaches; from this value on it means off (null)
DISC_START_OFF = 10**9
#: the weight of a loss term (a finite number ≥ 0)
Weight = Annotated[FiniteFloat, Ge(0)]


def _off_when_unreachable(step: int | None) -> int | None:
    return None if step is not None and step >= DISC_START_OFF else step


@dataclass
class LossConfig:
    """Weights and switches of the stage-1 objective (the ``loss`` section of a training config).

    On ``clip_weight``: the official criterion multiplies the BiomedCLIP term by 100 when
    ``use_biomedclip_loss`` is on. That flag defaults to off and no released config sets it;
    ``medvae_finetune.py`` only adds a BiomedCLIP metric slot for the LoRA members ``medvae_4_3_2d`` /
    ``medvae_8_4_2d``, while the paper lists the term for all four 2D stage-1 base models.

    The annotations are the rules (checked by pydantic when the section is built, :func:`check_fields`).
    """

    perceptual: Perceptual = option(
        "lpips", "`lpips` (official; needs the lpips + torchvision weights), `ms_ssim` (offline, no pretrained "
                 "weights) or `none`.")
    perceptual_weight: Weight = option(1.0, "Weight of the perceptual term inside the reconstruction loss.")
    lpips_weights: Annotated[str, MinLen(1)] | None = option(
        "auto", "LPIPS weights file, or `auto` (the lpips + torchvision packages); null: random weights (tests "
                "only).")
    kl_weight: Weight = option(1e-6, "KL penalty weight (paper and official: 1e-6).")
    disc_weight: Weight = option(0.5, "Scale of the adaptive adversarial weight (official 0.5).")
    disc_start: Annotated[Annotated[int, Ge(0)] | None, AfterValidator(_off_when_unreachable)] = option(
        3125, "Step from which the PatchGAN terms are on (official experiments: 3125); null switches the GAN off: "
              "no discriminator, no discriminator optimiser, nothing of it in checkpoints (values ≥ 1e9, the old "
              "spelling of off, mean the same).")
    disc_layers: Annotated[int, Ge(1)] = option(
        3, "Stride-2 layers of the PatchGAN (official 3, which needs sides ≥ 24; 1 suits tiny crops).")
    adaptive_disc_weight: bool = option(
        True, "Balance the adversarial gradient against the reconstruction gradient at the decoder's last layer; "
              "false uses a fixed weight 1.0, as the official code does for LoRA training.")
    disc_schedule: DiscSchedule = option(
        "every_batch", "Once the GAN is on: `alternate` steps the autoencoder on even steps and the discriminator on "
                       "odd ones, each on its own batch (the official loop; the paper presets use it); "
                       "`every_batch` steps both on every batch.")
    learn_logvar: bool = option(False, "Train the scalar log-variance that scales the reconstruction loss.")
    clip_weight: Weight = option(
        0.0, "Weight of the BiomedCLIP reconstruction-consistency term; 0 turns it off (the default outside the "
             "presets, so a run needs no BiomedCLIP download). The paper uses it for all four 2D stage-1 models and "
             "the 2D stage-1 presets set 100, the official criterion's weight.")
    clip_model: Annotated[str, MinLen(1)] = option(BIOMEDCLIP, "open_clip source of the BiomedCLIP encoder.")

    def __post_init__(self) -> None:
        check_fields(self, "loss", ConfigError)

    @property
    def adversarial(self) -> bool:
        """Whether the run has a GAN at all (``disc_start`` is not null)."""
        return self.disc_start is not None


def build_perceptual(cfg: LossConfig) -> nn.Module | None:
    """The perceptual module ``cfg.perceptual`` names (None for ``none``)."""
    if cfg.perceptual == "lpips":
        return load_lpips(cfg.lpips_weights)
    if cfg.perceptual == "ms_ssim":
        return MSSSIMLoss()
    return None


def _check_pair(x: torch.Tensor, x_rec: torch.Tensor) -> None:
    if x.shape != x_rec.shape or x.ndim not in (4, 5):
        raise ValueError(
            f"x and x_rec must be equal B×C×H×W or B×C×D×H×W tensors, got {tuple(x.shape)} and {tuple(x_rec.shape)}"
        )


class Stage1Loss(nn.Module):
    """The stage-1 criterion; attribute names match the official criterion's state dict
    (``perceptual_loss.*``, ``discriminator.main.*``, ``logvar``), so its ``loss.*`` tensors load.

    Args:
        cfg: loss settings.
        in_channels: channels of the reconstructions the discriminator judges.
        perceptual: a module ``(x, x̂) → B×1×1×1`` (e.g. a ready LPIPS); None builds it from ``cfg``.
        clip: a :class:`ClipConsistency`; None loads BiomedCLIP when ``cfg.clip_weight > 0``.

    Notes for the training loop:

    * ``generator_loss`` and ``discriminator_loss`` return ``(scalar tensor, logs)``; logs are plain floats
      with unprefixed keys (add ``train/`` … yourself).
    * Skip the discriminator step while ``discriminator_active(step)`` is False: ``discriminator_loss`` then
      returns a constant 0 that does not require grad (calling ``backward`` on it raises, on purpose).
    * After ``disc_start`` the generator loss also back-propagates into the discriminator's parameters (as
      in the official code): zero the discriminator's gradients before its own backward, and never step
      its optimiser on the generator's gradients. BatchNorm running statistics of the discriminator are
      updated by both calls.
    * The frozen perceptual/CLIP networks are part of ``state_dict()`` (official layout); save only
      ``discriminator`` and ``logvar`` if checkpoint size matters.
    """

    def __init__(self, cfg: LossConfig, in_channels: int, perceptual: nn.Module | None = None,
                 clip: ClipConsistency | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        if perceptual is not None and cfg.perceptual == "none":
            raise ValueError("a perceptual module was given but cfg.perceptual is 'none'")
        if clip is not None and cfg.clip_weight == 0:
            raise ValueError("a CLIP module was given but cfg.clip_weight is 0; set a positive weight or drop it")
        self.perceptual_loss = perceptual if perceptual is not None else build_perceptual(cfg)
        if cfg.clip_weight > 0 and clip is None:
            clip = load_biomedclip(cfg.clip_model)
        self.clip = clip
        # GAN off: no critic at all, so nothing of it is optimised or saved
        self.discriminator = PatchDiscriminator(in_channels, n_layers=cfg.disc_layers) if cfg.adversarial else None
        self.logvar = nn.Parameter(torch.zeros(()), requires_grad=cfg.learn_logvar)

    def discriminator_active(self, step: int) -> bool:
        """Whether the adversarial terms are on at ``step`` (``step ≥ disc_start``; never with the GAN off)."""
        return self.cfg.disc_start is not None and step >= self.cfg.disc_start

    def trains_generator(self, step: int) -> bool:
        """Whether ``step`` takes an autoencoder step (always, except odd steps of ``alternate`` with the GAN on)."""
        return not (self.cfg.disc_schedule == "alternate" and self.discriminator_active(step) and step % 2 == 1)

    def trains_discriminator(self, step: int) -> bool:
        """Whether ``step`` takes a discriminator step (with the GAN on: every step, or odd ones with ``alternate``)."""
        return self.discriminator_active(step) and (self.cfg.disc_schedule == "every_batch" or step % 2 == 1)

    def perceptual_term(self, x: torch.Tensor, x_rec: torch.Tensor) -> torch.Tensor:
        """Per-sample perceptual distance ``B×1×1×1`` (zeros when off); volumes: mean over all slices."""
        if self.perceptual_loss is None or self.cfg.perceptual_weight == 0:
            return x.new_zeros((x.shape[0], 1, 1, 1))
        return over_slices(self.perceptual_loss, x.contiguous(), x_rec.contiguous())

    def _logits(self, t: torch.Tensor) -> torch.Tensor:
        """Discriminator logits; for volumes the per-sample mean over slices of all three axes."""
        return over_slices(self.discriminator, t.contiguous())

    def _adaptive_weight(self, nll: torch.Tensor, g: torch.Tensor, last_layer: torch.Tensor | None) -> torch.Tensor:
        if not self.cfg.adaptive_disc_weight:
            return torch.ones((), device=nll.device)
        if last_layer is None or not (torch.is_grad_enabled() and nll.requires_grad and g.requires_grad):
            if self.training:
                raise RuntimeError(
                    "the adaptive discriminator weight needs gradients: pass last_layer=model.last_layer_weight() "
                    "with autograd on, call criterion.eval() for validation, or set loss.adaptive_disc_weight=false"
                )
            return torch.zeros((), device=nll.device)  # validation without a graph: official falls back to 0
        nll_grad = torch.autograd.grad(nll, last_layer, retain_graph=True)[0]
        g_grad = torch.autograd.grad(g, last_layer, retain_graph=True)[0]
        weight = torch.norm(nll_grad) / (torch.norm(g_grad) + 1e-4)
        return torch.clamp(weight, 0.0, 1e4).detach() * self.cfg.disc_weight

    def generator_loss(self, x: torch.Tensor, x_rec: torch.Tensor, posterior: DiagonalGaussian, step: int,
                       last_layer: torch.Tensor | None) -> tuple[torch.Tensor, dict[str, float]]:
        """Autoencoder objective for one batch.

        ``rec = |x − x̂| + w_p·p`` (p per sample, broadcast), ``nll = Σ(rec/e^logvar + logvar)/B``,
        ``kl = Σ KL/B``, ``g = −mean D(x̂)`` (from ``disc_start``), and
        ``total = nll + kl_weight·kl + d_weight·g + clip_weight·Σ clip/B`` with
        ``d_weight = disc_weight·clamp(‖∇nll‖ / (‖∇g‖ + 1e-4), 0, 1e4)`` at ``last_layer`` (detached).
        Volumes: perceptual and adversarial terms average over slices along all three axes.

        Args:
            x: inputs ``B×C×H×W`` or ``B×C×D×H×W`` in [-1, 1].
            x_rec: reconstructions, same shape.
            posterior: the encoder's posterior for ``x``.
            step: global optimisation step.
            last_layer: the decoder's last weight (``model.last_layer_weight()``); may be None before
                ``disc_start``, with ``adaptive_disc_weight=False``, or in eval mode (weight 0 then).

        Returns:
            ``(total, logs)``; logs: total, nll, rec (mean of rec), kl, g, d_weight, logvar, perceptual
            (mean p), and clip (mean per-sample clip loss) when the term is on.
        """
        _check_pair(x, x_rec)
        b = x.shape[0]
        p = self.perceptual_term(x, x_rec).reshape(b, *([1] * (x.ndim - 1)))
        rec = (x - x_rec).abs() + self.cfg.perceptual_weight * p
        nll = (rec / torch.exp(self.logvar) + self.logvar).sum() / b
        kl = posterior.kl().sum() / b
        zero = torch.zeros((), device=x.device)
        g, d_weight = zero, zero
        if self.discriminator_active(step):
            g = -self._logits(x_rec).mean()
            d_weight = self._adaptive_weight(nll, g, last_layer)
        total = nll + self.cfg.kl_weight * kl + d_weight * g
        terms = {"total": total, "nll": nll, "rec": rec.mean(), "kl": kl, "g": g, "d_weight": d_weight,
                 "logvar": self.logvar, "perceptual": p.mean()}
        if self.clip is not None:
            clip = self.clip.reconstruction_loss(x, x_rec)
            total = total + self.cfg.clip_weight * clip.sum() / b
            terms.update(total=total, clip=clip.mean())
        values = torch.stack([v.detach().float().reshape(()) for v in terms.values()]).tolist()  # one sync
        return total, dict(zip(terms, values))

    def discriminator_loss(self, x: torch.Tensor, x_rec: torch.Tensor,
                           step: int) -> tuple[torch.Tensor, dict[str, float]]:
        """Hinge loss of the PatchGAN on ``x`` (real) and ``x̂`` (fake), both detached.

        Volumes: the hinge loss of every slice along all three axes, averaged (the paper's per-slice rule;
        the official code instead averaged the logit maps over slices before the hinge).

        Returns:
            ``(loss, logs)`` with logs disc, logits_real, logits_fake (mean logits). Before ``disc_start``:
            a constant 0 that does not require grad and logs ``{"disc": 0.0}`` — skip the step, see
            :meth:`discriminator_active`.
        """
        if not self.discriminator_active(step):
            return torch.zeros((), device=x.device), {"disc": 0.0}
        _check_pair(x, x_rec)
        reals: list[torch.Tensor] = []
        fakes: list[torch.Tensor] = []

        def per_slice(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
            # Hinge loss per image (mean over its logit map); the batch mean of this is hinge_d_loss.
            lr, lf = self.discriminator(real), self.discriminator(fake)
            reals.append(lr.detach().flatten())
            fakes.append(lf.detach().flatten())
            return 0.5 * (F.relu(1.0 - lr).flatten(1).mean(1) + F.relu(1.0 + lf).flatten(1).mean(1))

        loss = over_slices(per_slice, x.detach().contiguous(), x_rec.detach().contiguous()).mean()
        disc, real, fake = torch.stack([loss.detach(), torch.cat(reals).mean(), torch.cat(fakes).mean()]).tolist()
        return loss, {"disc": disc, "logits_real": real, "logits_fake": fake}
