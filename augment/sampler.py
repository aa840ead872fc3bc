"""Which samples each rank sees in each epoch, and in what order.

Training (shuffle): one permutation of all n samples per epoch, ordered by a keyed hash of
(seed, epoch, index), which is the same on every rank without communication. Every rank runs
the same number of steps, n // (world * batch); rank r takes the r-th contiguous block of
steps * batch samples of the permutation, and the remainder (fewer than world * batch samples,
a different set each epoch) is dropped.

Evaluation (no shuffle): rank r takes samples r, r + world, r + 2 world, ... so that every
sample is seen exactly once over all ranks; the last batch of a rank may be short.
"""

from __future__ import annotations

import numpy as np

from augment.params import uniforms


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    """The order of all n samples in ``epoch``: argsort of one hashed uniform per sample."""
    keys = uniforms(seed, epoch, np.arange(n), 1)[:, 0]
    return np.argsort(keys, kind="stable")


def rank_samples(n: int, batch_size: int, rank: int, world_size: int, shuffle: bool, seed: int = 0,
                 epoch: int = 0) -> np.ndarray:
    """Global indices rank ``rank`` visits in ``epoch``, in order (see the module docstring)."""
    if shuffle:
        per_rank = (n // (world_size * batch_size)) * batch_size
        order = epoch_permutation(n, seed, epoch)
        return order[rank * per_rank : (rank + 1) * per_rank]
    return np.arange(rank, n, world_size)


def batches_per_epoch(n: int, batch_size: int, rank: int, world_size: int, shuffle: bool) -> int:
    if shuffle:
        return n // (world_size * batch_size)
    mine = len(range(rank, n, world_size))
    return -(-mine // batch_size)
