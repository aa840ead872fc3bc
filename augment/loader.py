"""``Loader``: batches of augmented shard images on a device, from DALI or from plain torch.

    with Loader("shards", "train", batch_size=128, spec=AugmentSpec(), device="cuda",
                rank=rank, world_size=world, seed=0, workers=4) as loader:
        for epoch in range(epochs):
            loader.set_epoch(epoch)              # or set_epoch(epoch, res=160): a resolution ramp
            for images, labels in loader: ...

Order, rank split and augmentation are functions of (seed, epoch, sample index, rank, world
size) only (``augment.feed``), so both backends give the same batches, and
``state_dict``/``load_state_dict`` resume mid-epoch exactly. Worker processes do the per-image
work of each batch (copy its images out of the shards' memory maps, or cut and resize its
windows); everything else is arrays computed once per batch, and the maths runs in DALI
(``augment.dali_backend``) or in batched torch ops on the device (``augment.torch_backend``).

The workers start on the first iteration and run one endless stream across epochs. Moving the
loader somewhere else (another epoch or position, another resolution) moves the stream, not the
workers: the stream table says from which batch on the new place holds, and the few batches the
workers had begun before it are dropped.
"""

from __future__ import annotations

import os
import weakref

import torch

from augment.colour import ColourStats, colour_stats
from augment.errors import AugmentError, WorkerError, forget_worker_errors, raise_worker_error
from augment.feed import BatchPlan, StreamTable
from augment.sampler import ShardWindows, check_batch_fits
from augment.spec import BACKENDS, AugmentSpec, dali_available
from augment.streams import Stream, StreamRequest
from prep.shards import ShardSet, open_shards

RESIZE_ON = ("device", "workers")


class Loader:
    """Batches of one rank, one epoch per iteration. Worker processes start on the first
    iteration and run on across epochs; ``close()`` (or leaving a ``with Loader(...)`` block)
    stops them for certain. Call it: worker processes do not end by themselves."""

    def __init__(self, shards, split: str = "train", batch_size: int = 128, spec: AugmentSpec = AugmentSpec(),
                 backend: str | None = None, device: str = "cuda", rank: int = 0, world_size: int = 1,
                 seed: int = 0, workers: int = 4, colour: ColourStats | None = None, max_res: int | None = None,
                 resize_on: str | None = None, cache=None, cache_limit: int | None = None,
                 window: int | None = None):
        """``shards``: a folder, a URL (``s3://bucket/prefix``: read through a local cache in
        folder ``cache``, default ~/.cache/imgprep, of at most ``cache_limit`` bytes) or an open
        ``ShardSet``; ``window``: train in shard-window order, K shards at a time
        (``augment.sampler``); by default only when the shards do not all fit the cache, with K
        from its limit; ``colour``: the folder's colour
        statistics when the caller has them already (see ``augment.colour``); ``max_res``: the
        largest training resolution ``set_epoch`` will ask for (default spec.crop); ``resize_on``
        (DALI): where the windows are cut and resized, "device" (DALI's own operators; the
        default, but for resized windows on the CPU) or "workers" (uint8, in the workers; the
        default for resized windows on the CPU, and 1.7x faster for the paper's crops there)."""
        backend = backend or ("dali" if dali_available() else "torch")
        if backend not in BACKENDS:
            raise AugmentError(f"unknown backend {backend!r}: use 'dali' or 'torch'")
        if backend == "dali" and not dali_available():
            raise AugmentError("the DALI backend needs DALI: pip install nvidia-dali-cuda130 (Linux), "
                               "or use backend='torch'")
        if device not in ("cuda", "cpu"):
            raise AugmentError(f"unknown device {device!r}: use 'cuda' or 'cpu'")
        if device == "cuda" and not torch.cuda.is_available():
            raise AugmentError("device='cuda' but torch sees no CUDA GPU: use device='cpu'")
        if not 0 <= rank < world_size:
            raise AugmentError(f"rank {rank} is outside a world of {world_size}")
        if not 0 <= workers <= MAX_WORKERS:
            raise AugmentError(f"workers must be 0 to {MAX_WORKERS}, got {workers}")
        if resize_on not in (None, *RESIZE_ON):
            raise AugmentError(f"resize_on must be one of {', '.join(RESIZE_ON)}, got {resize_on!r}")
        self.shard_set = shards if isinstance(shards, ShardSet) else open_shards(shards, cache, cache_limit)
        self.reader = self.shard_set.split(split)
        self.window = window_for(self.reader, window) if spec.random else None
        self.size = self.shard_set.size
        self.max_res = max_res or spec.crop
        check_batch_fits(len(self.reader), batch_size, world_size, split, spec.random)
        self.split, self.batch_size, self.spec = split, batch_size, spec
        self.backend, self.device, self.rank, self.world_size = backend, device, rank, world_size
        self.seed, self.workers, self.resize_on = seed, workers, resize_on
        self._check_res(spec.crop, "crop")
        self._check_res(self.max_res, "max_res")
        self.colour = colour or colour_stats(self.shard_set.root, spec)
        self._check_mean_image()
        windows = ShardWindows(tuple(self.reader.starts), self.window) if self.window else None
        self.plan = BatchPlan(len(self.reader), spec, self.size, batch_size, rank, world_size, seed, self.colour,
                              windows)
        self.epoch, self.position, self.res = 0, 0, spec.crop  # the next batch to yield, and its resolution
        self._stream: Stream | None = None  # the running stream of batches (an endless iterator) ...
        self._table: StreamTable | None = None  # ... where each of its batches belongs ...
        self._received = 0  # ... how many batches of it this process has taken ...
        self._generation = 0  # ... and the table row the batches it yields must come from
        self._stop_stream = None  # the finalizer that stops it
        self._prefetch = None  # for shards at a URL: downloads ahead of the batches (augment.prefetch)

    def __len__(self) -> int:
        return self.plan.per_epoch

    def __enter__(self) -> "Loader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _check_res(self, res: int, name: str) -> None:
        """A training side the shards can give: a paper window must fit inside every image."""
        if res < 1:
            raise AugmentError(f"{name} must be positive, got {res}")
        spec = self.spec
        cut_at_res = spec.crop_mode == "paper" if spec.random else spec.val_resize is None
        if cut_at_res and res > self.size:
            raise AugmentError(f"{name} {res} is larger than the {self.size} px shard images")

    def _check_mean_image(self) -> None:
        """A mean image of the shards' own size, where the recipe subtracts one: the windows cut
        from it are read unchecked by the compiled CPU pass (a ``colour`` passed in may be another's)."""
        if self.spec.normalize != "mean-image":
            return
        shape = None if self.colour.mean_image is None else tuple(self.colour.mean_image.shape)
        if shape != (self.size, self.size, 3):
            raise AugmentError(f"mean-image normalisation needs a {self.size} x {self.size} x 3 mean image for "
                               f"these shards, got {'none' if shape is None else ' x '.join(map(str, shape))}")

    def set_epoch(self, epoch: int, res: int | None = None) -> None:
        """The next iteration yields ``epoch`` from its start; its training batches are ``res``
        x ``res`` (default: the spec's crop). No worker restarts."""
        if epoch < 0:
            raise AugmentError(f"epoch must not be negative, got {epoch}")
        res = res or self.spec.crop
        if res != self.spec.crop:
            if not self.spec.random:
                raise AugmentError("res applies to training batches; evaluation windows are the spec's crop")
            self._check_res(res, "res")
            if res > self.max_res:
                raise AugmentError(f"res {res} is larger than this loader's max_res {self.max_res}: give "
                                   f"Loader(..., max_res={res}) or more")
        self.epoch, self.position, self.res = epoch, 0, res

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "world_size": self.world_size,
                "res": self.res, "window": self.window}

    def load_state_dict(self, state: dict) -> None:
        if state["seed"] != self.seed or state["world_size"] != self.world_size:
            raise AugmentError(f"loader state was saved with seed {state['seed']} and world size "
                               f"{state['world_size']}; this loader has {self.seed} and {self.world_size}")
        if state.get("window") != self.window:  # another order: the resumed epoch would not be the same
            raise AugmentError(f"loader state was saved with shard windows of {state.get('window')} (None: fully "
                               f"random order); this loader has {self.window}: give window={state.get('window')}")
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position <= len(self):
            raise AugmentError(f"loader state (epoch {epoch}, batch {position}) is outside an epoch of "
                               f"{len(self)} batches")
        self.set_epoch(epoch, int(state.get("res") or self.spec.crop))
        self.position = position

    def __iter__(self):
        if len(self) == 0:  # more ranks than evaluation images: this rank has none
            return
        if self.position >= len(self):  # a finished epoch iterated again repeats it (as torch's samplers do)
            self.position = 0
        self._move_stream(self.epoch, self.position, self.res)
        self._follow_with_prefetch()
        for _ in range(len(self) - self.position):
            delivered = self._next_from_stream()
            count = self.plan.count(self.position)
            self.position += 1
            if self._prefetch is not None:
                self._prefetch.consumed(self.position)
            images, labels = delivered.images, delivered.labels
            if count < len(labels):  # the repeated samples of a short last evaluation batch
                images, labels = images[:count], labels[:count]
            yield images, labels

    def _next_from_stream(self):
        """The stream's next batch of the current generation; those planned before it are dropped."""
        while True:
            k = self._received
            try:
                delivered = next(self._stream)
            except WorkerError:
                raise
            except Exception:
                raise_worker_error(self._table)  # one of our errors in a worker: its own sentence
                raise
            self._received += 1
            if delivered.generation == self._generation:
                break
            if k >= self._table.start(self._generation):  # a batch the new generation holds, planned before it
                raise AugmentError("a loader worker ran further ahead than planned; please report this")
        expected = (self.epoch, self.position) if self.spec.random else self.position
        got = (delivered.epoch, delivered.position) if self.spec.random else delivered.position
        if got != expected:
            raise AugmentError(f"the loader stream gave batch {got} where {expected} was due; please report this")
        return delivered

    def _move_stream(self, epoch: int, position: int, res: int) -> None:
        """Make the stream's next batch (epoch, position) at ``res``: start it, or add a
        generation (evaluation batches do not depend on the epoch or the resolution)."""
        if self._stream is not None:
            generation, at_epoch, at_position, at_res = self._table.place(self.plan, self._received)
            here = (at_epoch, at_position, at_res) if self.spec.random else at_position
            if here == ((epoch, position, res) if self.spec.random else position):
                self._generation = generation
                return
            added = self._table.add(self._received + self._stream.horizon, epoch, position, res)
            if added is not None:
                self._generation = added
                return
        self._start_stream(epoch, position, res)

    def _follow_with_prefetch(self) -> None:
        """Shards at a URL: download the files of the batches to come ahead of the workers. The
        threads start after the workers (a fork copies no thread) and stop before a new stream."""
        if self.reader.cache is None:
            return
        if self._prefetch is None:
            from augment.prefetch import AHEAD, ShardPrefetch

            self._prefetch = ShardPrefetch(self.reader, self.plan, self.window or AHEAD)
        self._prefetch.follow(self.epoch, self.position)

    def _stop_prefetch(self) -> None:
        prefetch, self._prefetch = self._prefetch, None
        if prefetch is not None:
            prefetch.close()

    def close(self) -> None:
        """Stop the stream's worker processes (and DALI's pipeline) now; safe to call twice.
        A later iteration starts a new stream."""
        self._stop_prefetch()
        stop, self._stop_stream, self._stream, self._table = self._stop_stream, None, None, None
        if stop is not None:
            _running_streams.discard(stop)
            stop()

    def worker_pids(self) -> list[int]:
        """Process ids of the running stream's workers (none before the first batch, or after close)."""
        return list(self._stream.pids) if self._stream is not None else []

    def request(self, table: StreamTable) -> StreamRequest:
        """What a backend is handed to start a stream of this loader's batches."""
        shard_set = self.shard_set
        return StreamRequest(str(shard_set.root), self.split, self.plan, table, self.spec, self.colour, self.device,
                             self.workers, self.size, shard_set.max_side, shard_set.square,
                             shard_set.storage.compressed, self.max_res, self.resize_on, shard_set.cache)

    def _start_stream(self, epoch: int, position: int, res: int) -> None:
        self.close()
        table = StreamTable()
        table.add(0, epoch, position, res)
        try:
            if self.backend == "dali":
                from augment.dali_backend import DaliStream as backend
            else:
                from augment.torch_backend import TorchStream as backend
            try:
                stream = backend(self.request(table))
            except WorkerError:
                raise
            except Exception:  # DALI runs the first batch while it starts: a worker's error shows here
                raise_worker_error(table)
                raise
        except BaseException:
            table.remove()
            raise
        # Stopped by close(), else when this Loader is garbage, else at interpreter exit.
        _stop_streams_before_multiprocessing_exits()
        finalizer = weakref.finalize(self, _stop_in_owner, os.getpid(), stream, table)
        finalizer.atexit = False  # _stop_all_at_exit runs earlier
        _running_streams.difference_update([f for f in _running_streams if not f.alive])
        _running_streams.add(finalizer)
        self._stream, self._table, self._stop_stream = stream, table, finalizer
        self._received, self._generation = 0, 0


MAX_WORKERS = 256  # loader worker processes per training process: more is a typo, not a plan

_running_streams: set = set()  # finalizers of streams, stopped at exit by _stop_all_at_exit


def _stop_in_owner(owner: int, stream, table: StreamTable) -> None:
    """A collected Loader's finalizer may run in a forked child (a worker of another Loader):
    the stream is its creator's to stop."""
    if os.getpid() == owner:
        try:
            stream.close()
        finally:
            forget_worker_errors(table)
            table.remove()


def _stop_streams_before_multiprocessing_exits() -> None:
    """At interpreter exit, multiprocessing's handler waits for child processes (and sends
    daemonic ones a SIGTERM, which our workers ignore). atexit runs handlers last-registered
    first, so (re)registering ours after importing multiprocessing.util stops the streams first."""
    import atexit
    import multiprocessing.util  # noqa: F401  (registers its exit handler now, if not yet)

    atexit.unregister(_stop_all_at_exit)
    atexit.register(_stop_all_at_exit)


def _stop_all_at_exit() -> None:
    for finalizer in list(_running_streams):
        finalizer()  # a finalizer runs its function once; later calls do nothing


def window_for(reader, window: int | None) -> int | None:
    """K of the shard-window order: the one asked for, else the cache's (None: fully random)."""
    if window is None:
        return reader.window
    if not 1 <= window <= len(reader.files):
        raise AugmentError(f"window must be 1 to {len(reader.files)} shards (the split's), got {window}")
    if reader.window is not None and window > reader.window:
        raise AugmentError(f"a window of {window} shards does not fit the cache limit: at most {reader.window}")
    return window
