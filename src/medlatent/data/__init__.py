"""Latents as a dataset: :class:`LatentDataset` (over folders or sharded stores, :mod:`medlatent.data.store`), an
exact-coverage distributed sampler, and (with MONAI) dictionary transforms in :mod:`medlatent.data.monai`."""

from medlatent.data.latents import ExactDistributedSampler, LatentDataError, LatentDataset, latent_meta
from medlatent.data.store import LatentStore, StoreError, pack, unpack, verify

__all__ = ["ExactDistributedSampler", "LatentDataError", "LatentDataset", "LatentStore", "StoreError", "latent_meta",
           "pack", "unpack", "verify"]
