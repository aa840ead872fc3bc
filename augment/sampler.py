"""Which samples each rank sees in each epoch, and in what order.

Training (shuffle): one permutation of all n samples per epoch, ordered by a keyed hash of
(seed, epoch, index), which is the same on every rank without communication. The permutation
is cut into global batches of world * batch samples; in step s, rank r takes the r-th slice of
global batch s. Every rank runs the same n // (world * batch) steps, the remainder (fewer than
world * batch samples, a different set each epoch) is dropped, and a global batch holds the
same samples whatever the world size: W processes of batch b train like one of batch W * b.

Evaluation (no shuffle): rank r takes samples r, r + world, r + 2 world, ... so that every
sample is seen exactly once over all ranks; the last batch of a rank may be short.
"""

from __future__ import annotations

import numpy as np

from augment.errors import AugmentError
from augment.params import ORDER, uniforms


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    """The order of all n samples in ``epoch``: argsort of one hashed uniform per sample, from
    its own domain: ordering by a draw that also sets the crop would sort batches by crop."""
    keys = uniforms(seed, epoch, np.arange(n), 1, domain=ORDER)[:, 0]
    return np.argsort(keys, kind="stable")


def rank_samples(n: int, batch_size: int, rank: int, world_size: int, shuffle: bool, seed: int = 0,
                 epoch: int = 0) -> np.ndarray:
    """Global indices rank ``rank`` visits in ``epoch``, in order (see the module docstring)."""
    if shuffle:
        steps = n // (world_size * batch_size)
        order = epoch_permutation(n, seed, epoch)[: steps * world_size * batch_size]
        return order.reshape(steps, world_size, batch_size)[:, rank, :].reshape(-1)
    return np.arange(rank, n, world_size)


def batches_per_epoch(n: int, batch_size: int, rank: int, world_size: int, shuffle: bool) -> int:
    if shuffle:
        return n // (world_size * batch_size)
    mine = len(range(rank, n, world_size))
    return -(-mine // batch_size)


def per_rank_batch(global_batch: int, world_size: int) -> int:
    """The batch each of ``world_size`` processes takes from a global batch, which must split
    evenly (the same samples per step whatever the world size, see the module docstring)."""
    if global_batch < 1 or global_batch % world_size:
        raise AugmentError(f"batch size {global_batch} does not divide over {world_size} processes")
    return global_batch // world_size


def check_batch_fits(n: int, batch_size: int, world_size: int, split: str, shuffle: bool = True) -> None:
    """Training drops the remainder, so one full step over all ranks must fit in the split;
    evaluation takes any batch size (a short last batch)."""
    if batch_size < 1:
        raise AugmentError(f"batch size must be at least 1, got {batch_size}")
    if shuffle and batch_size * world_size > n:
        total = f"{batch_size * world_size} ({batch_size} x {world_size} processes)" if world_size > 1 else batch_size
        raise AugmentError(f"batch size {total} is larger than the {n} images of split '{split}'")
