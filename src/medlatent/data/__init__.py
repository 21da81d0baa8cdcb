"""Latents as a dataset: :class:`LatentDataset` (over folders or sharded stores, :mod:`medlatent.data.store`),
batches streamed from a store (:class:`LatentStream`, for training on latent and label only), an exact-coverage
distributed sampler, and (with MONAI) dictionary transforms in :mod:`medlatent.data.monai`."""

from medlatent.data.latents import ExactDistributedSampler, LatentDataError, LatentDataset, latent_meta
from medlatent.data.store import LatentStore, StoreError, pack, unpack, verify
from medlatent.data.stream import LatentStream, iter_batches

__all__ = ["ExactDistributedSampler", "LatentDataError", "LatentDataset", "LatentStore", "LatentStream", "StoreError",
           "iter_batches", "latent_meta", "pack", "unpack", "verify"]
