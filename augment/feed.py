"""The feed: what each batch needs before any image operation, computed once per batch as arrays.

Both backends read the same endless stream of batches. A stream starts at batch ``p0`` of epoch
``e0``; its k-th batch is batch ``p`` of epoch ``e`` with

    e = e0 + (p0 + k) // P,    p = (p0 + k) % P,    P = batches per epoch of this rank

so it never ends and a worker can compute any batch from k alone (workers run ahead, out of
order, across epoch boundaries). For each batch the plan gives the global sample indices (the
rank's slice of the epoch's permutation, ``augment.sampler``), their labels (read by the worker
from the shard files it reads the images from) and every per-sample parameter (``augment.params``): pure functions of (seed, epoch, index, rank, world
size), so a resumed run and the other backend see the same batches.

Batches are always full: a short last evaluation batch repeats its last sample, marked with
label -1, and the Loader drops those rows (DALI wants full batches; so do the shared buffers).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from augment.params import SampleParams, sample_params
from augment.sampler import batches_per_epoch, rank_samples
from augment.spec import AugmentSpec


@dataclass(frozen=True)
class PlannedBatch:
    epoch: int
    position: int  # batch number within the epoch
    indices: np.ndarray  # int64 [B], global sample indices in the split
    count: int  # real samples: B, except for the last batch of an evaluation epoch
    labels: np.ndarray  # int64 [B]; -1 marks the repeated samples after ``count``
    params: SampleParams  # parameters of all B samples


class BatchPlan:
    """Batches of one rank over a split of ``n`` samples; cheap to pickle (arithmetic only), so
    workers get a copy."""

    def __init__(self, n: int, spec: AugmentSpec, size: int, batch_size: int, rank: int, world_size: int, seed: int):
        self.n, self.spec, self.size, self.batch_size = n, spec, size, batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.per_epoch = batches_per_epoch(n, batch_size, rank, world_size, spec.random)
        self._order = (None, None)  # (epoch, this rank's indices in that epoch): one argsort per epoch

    def locate(self, first_epoch: int, first_position: int, k: int) -> tuple[int, int]:
        """(epoch, position) of batch k of the stream that starts at (first_epoch, first_position)."""
        epoch, position = divmod(first_position + k, self.per_epoch)
        return first_epoch + epoch, position

    def batch(self, epoch: int, position: int, reader) -> PlannedBatch:
        """Batch ``position`` of ``epoch``; its labels come from ``reader`` (a SplitReader)."""
        if self._order[0] != epoch:
            self._order = (epoch, rank_samples(self.n, self.batch_size, self.rank, self.world_size,
                                               self.spec.random, self.seed, epoch))
        order = self._order[1]
        start = position * self.batch_size
        real = order[start : start + self.batch_size]
        count = len(real)
        indices = np.concatenate([real, np.repeat(real[-1:], self.batch_size - count)])
        labels = reader.labels_of(indices)
        labels[count:] = -1
        params = sample_params(self.spec, self.size, self.seed, epoch, indices)
        return PlannedBatch(epoch, position, indices, count, labels, params)
