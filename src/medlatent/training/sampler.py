"""Resumable, shardable sampling: :class:`EpochSampler` gives the keys ``(index, item_seed)`` of an epoch.

The keys are a function of ``(seed, epoch)`` only, so a run resumes exactly mid-epoch
(``set_epoch(epoch, start_batch)``) and gives the same batches with any number of loader workers or ranks.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
from torch.utils.data import Sampler


class EpochSampler(Sampler):
    """Deterministic, shardable, resumable keys ``(index, item_seed)`` for an :class:`ImageDataset`.

    Epoch ``e`` is one global stream of positions ``p = 0, 1, …``: position ``p`` holds dataset index
    ``order[p]`` (permutations of the dataset drawn from ``(seed, e)``, concatenated) and
    ``item_seed[p]`` (a 63-bit number drawn from ``(seed, e)``). Both depend only on ``(seed, e, p)`` — not
    on the batch size, the number of ranks or loader workers — so a sample is the same wherever it lands.

    The stream is cut into global batches of ``batch_size × world_size`` positions; rank ``r`` takes
    positions ``r, r + world_size, …`` of each (a disjoint strided share; together the ranks cover the
    global batch). Every batch is full: with ``drop_last`` the leftover ``len % global_batch`` positions
    are dropped, without it the last batch is filled from the next permutation (some images twice). A
    dataset smaller than one global batch fills it by repeating permutations (sampling with replacement
    across, never within, a permutation).

    Resuming mid-epoch: ``set_epoch(epoch, start_batch=k)`` skips the first ``k`` batches; the rest is
    identical to an uninterrupted epoch (same ``batch_size × world_size`` required).

    Args:
        length: dataset size (≥ 1).
        batch_size: per-rank batch size (what the DataLoader is given).
        seed: run seed (≥ 0).
        rank, world_size: this process and the number of processes.
        drop_last: see above.
    """

    def __init__(self, length: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 drop_last: bool = True) -> None:
        if length < 1:
            raise ValueError(f"EpochSampler needs a non-empty dataset, got length {length}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
        if seed < 0:
            raise ValueError(f"seed must be ≥ 0, got {seed}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size) with world_size ≥ 1, got rank {rank} of {world_size}")
        self.length = int(length)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.drop_last = bool(drop_last)
        self.epoch = 0
        self.start_batch = 0

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    @property
    def batches_per_epoch(self) -> int:
        """Batches in a whole epoch (each rank yields this many, before any ``start_batch`` skip)."""
        n, g = self.length, self.global_batch
        return n // g if self.drop_last and n >= g else -(-n // g)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch; skip its first ``start_batch`` batches (resume after that many finished)."""
        if epoch < 0:
            raise ValueError(f"epoch must be ≥ 0, got {epoch}")
        if not 0 <= start_batch <= self.batches_per_epoch:
            raise ValueError(f"start_batch must be in [0, {self.batches_per_epoch}] (batches per epoch), "
                             f"got {start_batch}")
        self.epoch = int(epoch)
        self.start_batch = int(start_batch)

    def global_keys(self, epoch: int | None = None) -> list[tuple[int, int]]:
        """All keys of the epoch's global stream, in order (every rank's share, interleaved)."""
        order, seeds = self._stream(self.epoch if epoch is None else epoch)
        return [(int(i), int(s)) for i, s in zip(order, seeds)]

    def _stream(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        total = self.batches_per_epoch * self.global_batch
        rng = np.random.default_rng([self.seed, epoch])
        perms = [rng.permutation(self.length) for _ in range(math.ceil(total / self.length))]
        order = np.concatenate(perms)[:total]
        # a separate stream for the item seeds: raw 64-bit draws, so position p's seed does not depend on total
        raw = np.random.PCG64(np.random.SeedSequence([self.seed, epoch, 1])).random_raw(total)
        return order, (raw >> np.uint64(1)).astype(np.int64)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order, seeds = self._stream(self.epoch)
        g, w = self.global_batch, self.world_size
        for b in range(self.start_batch, self.batches_per_epoch):
            for p in range(b * g + self.rank, (b + 1) * g, w):
                yield int(order[p]), int(seeds[p])

    def __len__(self) -> int:
        return (self.batches_per_epoch - self.start_batch) * self.batch_size

