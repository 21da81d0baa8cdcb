"""The diagonal Gaussian posterior q(z|x) produced by the encoder."""

from __future__ import annotations

import math

import torch


class DiagonalGaussian:
    """Posterior ``N(mean, diag(std²))`` over the latent, from the encoder's moments.

    Args:
        moments: ``B×2C×...`` tensor; the first ``C`` channels are the mean, the last ``C`` the
            log-variance, which is clamped to [-30, 20] as in the released models.

    The latent of record in medlatent is ``mean`` (the posterior mean, ``z``): encoding the same image
    twice gives the same bits. Draw a sample only when you want one, with an explicit generator.
    """

    def __init__(self, moments: torch.Tensor) -> None:
        if moments.ndim < 3 or moments.shape[1] % 2:
            raise ValueError(f"moments must be B×2C×..., got shape {tuple(moments.shape)}")
        self.mean, logvar = torch.chunk(moments, 2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)

    @property
    def std(self) -> torch.Tensor:
        return torch.exp(0.5 * self.logvar)

    @property
    def var(self) -> torch.Tensor:
        return torch.exp(self.logvar)

    def mode(self) -> torch.Tensor:
        """The posterior mean (mode of a Gaussian)."""
        return self.mean

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """``mean + std * eps`` with ``eps ~ N(0, I)`` drawn from ``generator`` (reparameterised)."""
        eps = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * eps

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) summed over all non-batch axes; shape ``B``."""
        dims = tuple(range(1, self.mean.ndim))
        return 0.5 * torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, dim=dims)

    def nll(self, sample: torch.Tensor) -> torch.Tensor:
        """Negative log-likelihood of ``sample`` summed over all non-batch axes; shape ``B``."""
        dims = tuple(range(1, self.mean.ndim))
        return 0.5 * torch.sum(
            math.log(2.0 * math.pi) + self.logvar + (sample - self.mean).pow(2) / self.var, dim=dims
        )
