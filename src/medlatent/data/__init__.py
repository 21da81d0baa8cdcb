"""Latents as a dataset: :class:`LatentDataset`, an exact-coverage distributed sampler, and (with MONAI) dictionary
transforms in :mod:`medlatent.data.monai`."""

from medlatent.data.latents import ExactDistributedSampler, LatentDataError, LatentDataset, latent_meta

__all__ = ["ExactDistributedSampler", "LatentDataError", "LatentDataset", "latent_meta"]
