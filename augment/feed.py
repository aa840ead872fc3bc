"""The feed: what each batch needs before any image operation, computed once per batch as arrays.

Both backends read the same endless stream of batches; worker processes compute any batch of it
from its number k alone (they run ahead, out of order, across epoch boundaries). Where batch k
belongs is kept in a ``StreamTable``, a small table in shared memory: its rows are generations
(start, epoch, position, res), and batch k of the stream, taken by the last generation g with
start_g <= k, is

    batch p of epoch e at resolution res_g,   e = epoch_g + (position_g + k - start_g) // P,
                                              p = (position_g + k - start_g) % P

with P the batches per epoch of this rank. A stream starts with one generation (its first
batch); the Loader adds one when asked for another place or resolution than the stream is at
(``set_epoch(e, res=...)``, a resume), starting at a batch number far enough ahead that no worker
can have begun it, and drops the batches in between: the workers go on as they are.

For each batch the plan gives the global sample indices (the rank's slice of the epoch's
permutation, ``augment.sampler``), their labels and stored sizes (read by the worker from the
shard files it reads the images from) and every per-sample parameter (``augment.params``): pure
functions of (seed, epoch, index, rank, world size), so a resumed run and the other backend see
the same batches. Batches are always full: a short last evaluation batch repeats its last sample,
marked with label -1, and the Loader yields only its first ``count`` rows.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, replace

import numpy as np

from augment.colour import ColourStats, lighting_offsets
from augment.params import SampleParams, sample_params
from augment.sampler import ShardWindows, batches_per_epoch, rank_samples
from augment.spec import AugmentSpec


@dataclass(frozen=True)
class PlannedBatch:
    epoch: int
    position: int  # batch number within the epoch
    generation: int  # the stream table's row it was planned by
    res: int  # output side of its windows
    indices: np.ndarray  # int64 [B], global sample indices in the split
    count: int  # real samples: B, except for the last batch of an evaluation epoch
    labels: np.ndarray  # int64 [B]; -1 marks the repeated samples after ``count``
    params: SampleParams  # parameters of all B samples
    offsets: np.ndarray  # float32 [B, 3], lighting offsets on the 0-255 scale (zeros without lighting)


class BatchPlan:
    """Batches of one rank over a split of ``n`` samples; cheap to pickle (arithmetic and a few
    constants), so workers get a copy."""

    def __init__(self, n: int, spec: AugmentSpec, size: int, batch_size: int, rank: int, world_size: int, seed: int,
                 colour: ColourStats | None = None, windows: ShardWindows | None = None):
        self.n, self.spec, self.size, self.batch_size, self.windows = n, spec, size, batch_size, windows
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.colour = replace(colour, mean_image=None) if colour is not None else None  # eigenpairs only
        self.per_epoch = batches_per_epoch(n, batch_size, rank, world_size, spec.random)
        self._order = (None, None)  # (epoch, this rank's indices in that epoch): one argsort per epoch

    def locate(self, first_epoch: int, first_position: int, k: int) -> tuple[int, int]:
        """(epoch, position) of batch k of a stream that starts at (first_epoch, first_position)."""
        epoch, position = divmod(first_position + k, self.per_epoch)
        return first_epoch + epoch, position

    def count(self, position: int) -> int:
        """Real samples in batch ``position`` of any epoch (the last evaluation batch may be short)."""
        mine = self.per_epoch * self.batch_size if self.spec.random else len(range(self.rank, self.n, self.world_size))
        return min(self.batch_size, mine - position * self.batch_size)

    def order(self, epoch: int) -> np.ndarray:
        """This rank's sample indices of ``epoch``, in order (computed once an epoch)."""
        if self._order[0] != epoch:
            self._order = (epoch, rank_samples(self.n, self.batch_size, self.rank, self.world_size,
                                               self.spec.random, self.seed, epoch, self.windows))
        return self._order[1]

    def batch(self, epoch: int, position: int, reader, res: int | None = None, generation: int = 0) -> PlannedBatch:
        """Batch ``position`` of ``epoch``; its labels and image sizes come from ``reader`` (a
        SplitReader). ``res``: the training resolution (default spec.crop)."""
        order = self.order(epoch)
        start = position * self.batch_size
        real = order[start : start + self.batch_size]
        count = len(real)
        indices = np.concatenate([real, np.repeat(real[-1:], self.batch_size - count)])
        labels = reader.labels_of(indices)
        labels[count:] = -1
        res = res if res and self.spec.random else self.spec.crop
        params = sample_params(self.spec, reader.shapes_of(indices), self.seed, epoch, indices, res)
        offsets = np.zeros((len(indices), 3), np.float32)
        if self.spec.uses_lighting and self.colour is not None:
            offsets = lighting_offsets(params.alpha, self.colour).astype(np.float32)
        return PlannedBatch(epoch, position, generation, res, indices, count, labels, params, offsets)


MAX_GENERATIONS = 256  # a stream asked to move more often than this is restarted instead
COLUMNS = 4  # start, epoch, position, res


class StreamTable:
    """Where each batch of an endless stream belongs (see the module docstring), in a file in
    shared memory that the workers read: row 0 holds the number of generations, then one row of
    (start, epoch, position, res) each. Only the process that made it writes it; workers, forked
    or spawned, map it on first use."""

    def __init__(self):
        folder = "/dev/shm" if os.path.isdir("/dev/shm") else None
        descriptor, self.path = tempfile.mkstemp(prefix="imgprep-stream-", dir=folder)
        os.ftruncate(descriptor, 8 * COLUMNS * (MAX_GENERATIONS + 1))
        os.close(descriptor)
        self.owner = os.getpid()
        self._rows = None

    def __getstate__(self):
        return {"path": self.path, "owner": self.owner, "_rows": None}

    @property
    def rows(self) -> np.ndarray:
        if self._rows is None:
            self._rows = np.memmap(self.path, dtype=np.int64, mode="r+" if os.getpid() == self.owner else "r",
                                   shape=(MAX_GENERATIONS + 1, COLUMNS))
        return self._rows

    @property
    def generations(self) -> int:
        return int(self.rows[0, 0])

    def add(self, start: int, epoch: int, position: int, res: int) -> int | None:
        """Append a generation from batch ``start`` on; its number, or None when the table is full."""
        count = self.generations
        if count == MAX_GENERATIONS:
            return None
        self.rows[count + 1] = (start, epoch, position, res)  # the row first, then the count that shows it
        self.rows[0, 0] = count + 1
        return count

    def start(self, generation: int) -> int:
        """The first batch of the stream that ``generation`` plans."""
        return int(self.rows[generation + 1, 0])

    def find(self, k: int) -> tuple[int, int, int, int, int]:
        """(generation, start, epoch, position, res) that batch k of the stream is planned by."""
        count = self.generations
        starts = self.rows[1 : count + 1, 0]
        generation = int(np.searchsorted(starts, k, side="right")) - 1
        start, epoch, position, res = (int(v) for v in self.rows[generation + 1])
        return generation, start, epoch, position, res

    def place(self, plan: BatchPlan, k: int) -> tuple[int, int, int, int]:
        """(generation, epoch, position, res) of batch k of the stream."""
        generation, start, epoch, position, res = self.find(k)
        epoch, position = plan.locate(epoch, position, k - start)
        return generation, epoch, position, res

    def remove(self) -> None:
        if os.getpid() == self.owner:
            self._rows = None
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
