"""Which samples each rank sees in each epoch, and in what order.

Training (shuffle): one permutation of all n samples per epoch, ordered by a keyed hash of
(seed, epoch, index), which is the same on every rank without communication. The permutation
is cut into global batches of world * batch samples; in step s, rank r takes the r-th slice of
global batch s. Every rank runs the same n // (world * batch) steps, the remainder (fewer than
world * batch samples, a different set each epoch) is dropped, and a global batch holds the
same samples whatever the world size: W processes of batch b train like one of batch W * b.

Shard-window order (training over shards that do not all fit a local cache): the shards are
put in a seeded order of their own each epoch and taken K at a time; the samples of each window
of K shards are shuffled among themselves, and the windows follow each other. The result is one
permutation of all n samples, cut into global batches exactly as above, so every guarantee
holds (each sample at most once an epoch over all ranks, equal steps, resumable), while a stretch
of the epoch touches only about K shards. What it costs: two samples meet in a batch only if
their shards share a window, and a batch is drawn from K / shards of the data rather than all of
it (FFCV's quasi-random order and MosaicML's shuffle blocks make the same trade).

Evaluation (no shuffle): rank r takes samples r, r + world, r + 2 world, ... so that every
sample is seen exactly once over all ranks; the last batch of a rank may be short.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from augment.errors import AugmentError
from augment.params import ORDER, SHARD_ORDER, uniforms


@dataclass(frozen=True)
class ShardWindows:
    """Shard-window order: ``starts`` are the first global index of each shard file and n at the
    end (``SplitReader.starts``); ``window`` is K, the shards a window holds."""

    starts: tuple[int, ...]
    window: int


def shuffled(indices: np.ndarray, seed: int, epoch: int) -> np.ndarray:
    """``indices`` reordered by one hashed uniform each, from the order's own domain: ordering by
    a draw that also sets the crop would sort batches by crop."""
    keys = uniforms(seed, epoch, indices, 1, domain=ORDER)[:, 0]
    return indices[np.argsort(keys, kind="stable")]


def epoch_permutation(n: int, seed: int, epoch: int, windows: ShardWindows | None = None) -> np.ndarray:
    """The order of all n samples in ``epoch``: fully random, or by shard windows (see the module
    docstring)."""
    if windows is None:
        return shuffled(np.arange(n), seed, epoch)
    starts = np.asarray(windows.starts, dtype=np.int64)
    if starts[-1] != n:
        raise AugmentError(f"shard windows cover {starts[-1]} samples where the split has {n}")
    files = len(starts) - 1
    shard_keys = uniforms(seed, epoch, np.arange(files), 1, domain=SHARD_ORDER)[:, 0]
    shard_order = np.argsort(shard_keys, kind="stable")
    parts = []
    for first in range(0, files, windows.window):
        members = [np.arange(starts[f], starts[f + 1]) for f in shard_order[first : first + windows.window]]
        parts.append(shuffled(np.concatenate(members), seed, epoch))
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def rank_samples(n: int, batch_size: int, rank: int, world_size: int, shuffle: bool, seed: int = 0,
                 epoch: int = 0, windows: ShardWindows | None = None) -> np.ndarray:
    """Global indices rank ``rank`` visits in ``epoch``, in order (see the module docstring)."""
    if shuffle:
        steps = n // (world_size * batch_size)
        order = epoch_permutation(n, seed, epoch, windows)[: steps * world_size * batch_size]
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
