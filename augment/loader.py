"""``Loader``: batches of augmented shard images on a device, from DALI or from plain torch.

    with Loader("shards", "train", batch_size=128, spec=AugmentSpec(), device="cuda",
                rank=rank, world_size=world, seed=0, workers=4) as loader:
        for epoch in range(epochs):
            loader.set_epoch(epoch)
            for images, labels in loader: ...

Order, rank split and augmentation are functions of (seed, epoch, sample index, rank, world
size) only (``augment.feed``), so both backends give the same batches, and
``state_dict``/``load_state_dict`` resume mid-epoch exactly. Worker processes do one thing per
batch: copy its images out of the shards' memory maps (or their JPEG bytes) once; everything
else is arrays computed once per batch, and the image maths runs in DALI or in batched torch
ops on the device.
"""

from __future__ import annotations

import importlib.util
import os
import threading
import weakref
from collections import deque
from dataclasses import dataclass

import torch

from augment.colour import ColourStats, colour_stats
from augment.errors import AugmentError
from augment.feed import BatchPlan, PlannedBatch
from augment.sampler import check_batch_fits
from augment.spec import AugmentSpec
from augment.torch_ops import augment_batch, ten_crop_batch
from prep.lifeline import starting_workers
from prep.shards import ShardSet, open_shards

BACKENDS = ("dali", "torch")
STOP_GRACE_SECONDS = 5  # a worker that has not left this long after being told to is killed


def dali_available() -> bool:
    return importlib.util.find_spec("nvidia.dali") is not None


class Loader:
    """Batches of one rank, one epoch per iteration. Worker processes start on the first
    iteration and run on across epochs; ``close()`` (or leaving a ``with Loader(...)`` block)
    stops them for certain. Call it: worker processes do not end by themselves."""

    def __init__(self, shards, split: str = "train", batch_size: int = 128, spec: AugmentSpec = AugmentSpec(),
                 backend: str | None = None, device: str = "cuda", rank: int = 0, world_size: int = 1,
                 seed: int = 0, workers: int = 4, colour: ColourStats | None = None):
        """``shards``: a folder or an open ``ShardSet``; ``colour``: the folder's colour
        statistics when the caller has them already (see ``augment.colour``)."""
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
        if workers < 0:
            raise AugmentError(f"workers must be 0 or more, got {workers}")
        self.shard_set = shards if isinstance(shards, ShardSet) else open_shards(shards)
        self.reader = self.shard_set.split(split)
        self.size = self.shard_set.size
        if spec.crop > self.size:
            raise AugmentError(f"crop {spec.crop} is larger than the {self.size} px shard images")
        check_batch_fits(len(self.reader), batch_size, world_size, split, spec.random)
        self.split, self.batch_size, self.spec = split, batch_size, spec
        self.backend, self.device, self.rank, self.world_size = backend, device, rank, world_size
        self.seed, self.workers = seed, workers
        self.colour = colour or colour_stats(self.shard_set.root, spec)
        self.plan = BatchPlan(len(self.reader), spec, self.size, batch_size, rank, world_size, seed)
        self.epoch, self.position = 0, 0  # next batch to yield: batch `position` of `epoch`
        self._stream = None  # the running stream of batches (an endless iterator) ...
        self._stream_at = None  # ... the (epoch, batch) its next batch belongs to ...
        self._stop_stream = None  # ... how to stop its workers ...
        self._worker_pids: list[int] = []  # ... and their process ids
        self._mean_image_tensor = None

    def __len__(self) -> int:
        return self.plan.per_epoch

    def __enter__(self) -> "Loader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.position = epoch, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        if state["seed"] != self.seed or state["world_size"] != self.world_size:
            raise AugmentError(f"loader state was saved with seed {state['seed']} and world size "
                               f"{state['world_size']}; this loader has {self.seed} and {self.world_size}")
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position <= len(self):
            raise AugmentError(f"loader state (epoch {epoch}, batch {position}) is outside an epoch of "
                               f"{len(self)} batches")
        self.epoch, self.position = epoch, position

    def __iter__(self):
        if len(self) == 0:  # more ranks than evaluation images: this rank has none
            return
        if self.position >= len(self):  # a finished epoch iterated again repeats it (as torch's samplers do)
            self.position = 0
        wanted = (self.epoch, self.position)
        # Evaluation batches do not depend on the epoch: any epoch's stream at this position will do.
        current = self._stream_at and (self._stream_at if self.spec.random else (self.epoch, self._stream_at[1]))
        if self._stream is None or current != wanted:
            self._start_stream()
        for _ in range(len(self) - self.position):
            images, labels = next(self._stream)
            epoch, position = self._stream_at
            self._stream_at = (epoch + 1, 0) if position + 1 == len(self) else (epoch, position + 1)
            self.position += 1
            yield images, labels

    def close(self) -> None:
        """Stop the stream's worker processes (and DALI's pipeline) now; safe to call twice.
        A later iteration starts a new stream."""
        stop, self._stop_stream, self._stream, self._stream_at = self._stop_stream, None, None, None
        self._worker_pids = []
        if stop is not None:
            _running_streams.discard(stop)
            stop()

    def worker_pids(self) -> list[int]:
        """Process ids of the running stream's workers (none before the first batch, or after close)."""
        return list(self._worker_pids)

    def _start_stream(self) -> None:
        self.close()
        start = self._start_dali if self.backend == "dali" else self._start_torch
        self._stream, stop, self._worker_pids = start(self.epoch, self.position)
        # Stopped by close(), else when this Loader is garbage, else at interpreter exit.
        _stop_streams_before_multiprocessing_exits()
        finalizer = weakref.finalize(self, _stop_in_owner, os.getpid(), stop)
        finalizer.atexit = False  # _stop_all_at_exit runs earlier
        _running_streams.difference_update([f for f in _running_streams if not f.alive])
        _running_streams.add(finalizer)
        self._stop_stream = finalizer
        self._stream_at = (self.epoch, self.position)

    # ------------------------------------------------------------------------- DALI backend

    def _start_dali(self, epoch: int, position: int):
        from nvidia.dali.plugin.pytorch import DALIGenericIterator

        from augment.dali_pipeline import ShardSource, build_pipeline

        source = ShardSource(self.shard_set.root, self.split, self.plan, self.colour, epoch, position)
        pipe = build_pipeline(source, self.spec, self.shard_set.storage.compressed, self.size, self.batch_size, self.device,
                              self.workers)
        iterator = DALIGenericIterator(pipe, ["images", "labels"], auto_reset=False)

        def batches():
            for (output,) in iterator:
                images, labels = output["images"], output["labels"].reshape(-1)
                keep = labels >= 0
                if not bool(keep.all()):  # the repeated samples of the last evaluation batch
                    images, labels = images[keep], labels[keep]
                yield images, labels

        pool = getattr(pipe, "_py_pool", None)
        return batches(), lambda: stop_dali(pipe), pool.pids() if pool is not None else []

    # ------------------------------------------------------------------------- torch backend

    def _start_torch(self, epoch: int, position: int):
        """Worker processes gather each batch's uint8 images into a ring of shared buffers
        (one copy an image); here the batch goes to the device whole and is cut, mirrored,
        lit and normalised there by batched ops (``torch_ops.augment_batch``)."""
        iterator, ring = start_torch_feed(self, epoch, position)
        # Locals, not self: the generator must not keep the Loader alive (its finalizer stops us).
        spec, colour, device, mean_image = self.spec, self.colour, self.device, self._mean_image()

        def batches():
            while True:
                ring.before_fetch()
                filled = next(iterator)
                images = ring.to_device(filled.slot)
                batch = filled.batch
                if spec.mode == "test10":
                    out = ten_crop_batch(images, spec, colour, mean_image)
                else:
                    out = augment_batch(images, batch.params, spec, colour, mean_image)
                labels = torch.from_numpy(batch.labels[: batch.count]).to(device, non_blocking=device == "cuda")
                yield out[: batch.count], labels

        def stop():
            shutdown = getattr(iterator, "_shutdown_workers", None)  # joins them (a single-process iterator has none)
            if shutdown is not None:
                shutdown()
            ring.release()

        return batches(), stop, [worker.pid for worker in getattr(iterator, "_workers", [])]

    def _mean_image(self):
        """The mean image as a device tensor, copied there once (mean-image normalisation)."""
        if self.colour.mean_image is None:
            return None
        if self._mean_image_tensor is None:
            self._mean_image_tensor = torch.as_tensor(self.colour.mean_image, device=self.device)
        return self._mean_image_tensor


def start_torch_feed(loader: Loader, epoch: int, position: int):
    """(iterator of filled slots, their ring): the torch backend's worker side, started."""
    ring = SlotRing(loader.workers, loader.batch_size, loader.size, loader.device)
    filler = _SlotFiller(loader.shard_set.root, loader.split, loader.plan, ring.slots, epoch, position)
    stream = torch.utils.data.DataLoader(
        # Its own generator: a DataLoader draws a seed when it starts, which must not move the
        # global torch RNG (dropout), or a resumed run would draw other dropout masks.
        filler, sampler=range(2**62), batch_size=None, num_workers=loader.workers, generator=torch.Generator(),
        prefetch_factor=ring.prefetch if loader.workers else None)
    try:
        with starting_workers():
            iterator = iter(stream)  # forks the workers
    except BaseException:
        ring.release()
        raise
    return iterator, ring


_running_streams: set = set()  # finalizers of streams, stopped at exit by _stop_all_at_exit


def _stop_in_owner(owner: int, stop) -> None:
    """A collected Loader's finalizer may run in a forked child (a worker of another Loader):
    the stream is its creator's to stop."""
    if os.getpid() == owner:
        stop()


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


class SlotRing:
    """Shared uint8 buffers [slots, B, S, S, 3] that torch-backend workers fill in turn.

    Batch k goes to slot k % slots. The DataLoader keeps at most ``workers * prefetch`` tasks
    ahead and hands out the next task when this process takes a batch, so with two slots more
    than that, taking batch r lets a worker start on the slot of batch r - 2, which this process
    finished with before asking for batch r - 1. On a GPU the buffers are page-locked once
    (cudaHostRegister) and copied asynchronously on a stream of their own, which overlaps the
    copy with the model's work; before taking batch r we wait for the copy out of the slot of
    batch r - 2 (long done: it was issued a whole step earlier).
    """

    def __init__(self, workers: int, batch_size: int, size: int, device: str):
        self.prefetch = 2
        count = workers * self.prefetch + 2 if workers else 2
        self.slots = torch.empty((count, batch_size, size, size, 3), dtype=torch.uint8)
        if workers:
            self.slots.share_memory_()
        self.device = device
        self.registered = False
        self._copies = deque()
        if device == "cuda":
            cudart = torch.cuda.cudart()
            self.registered = int(cudart.cudaHostRegister(self.slots.data_ptr(), self.slots.nbytes, 0)) == 0
            self.stream = torch.cuda.Stream()

    def before_fetch(self) -> None:
        if len(self._copies) == 2:
            self._copies.popleft().synchronize()

    def to_device(self, slot: int) -> torch.Tensor:
        images = self.slots[slot]
        if self.device != "cuda":
            return images
        with torch.cuda.stream(self.stream):
            images = images.to(self.device, non_blocking=self.registered)
            done = torch.cuda.Event()
            done.record(self.stream)
        torch.cuda.current_stream().wait_event(done)  # the augmentation waits for its input ...
        images.record_stream(torch.cuda.current_stream())  # ... which the allocator keeps until used
        self._copies.append(done)
        return images

    def release(self) -> None:
        if self.registered:
            self.stream.synchronize()  # only our copies: not the model's kernels, which may never end
            torch.cuda.cudart().cudaHostUnregister(self.slots.data_ptr())
            self.registered = False


@dataclass(frozen=True)
class _Filled:
    slot: int
    batch: PlannedBatch  # a plain object: the DataLoader passes it pickled, not as shared tensors


class _SlotFiller(torch.utils.data.Dataset):
    """Task k: batch k of the stream that starts at (first_epoch, first_position), its images
    copied into slot k % slots."""

    def __init__(self, root, split: str, plan: BatchPlan, slots: torch.Tensor, first_epoch: int,
                 first_position: int):
        self.root, self.split, self.plan, self.slots = str(root), split, plan, slots
        self.first_epoch, self.first_position = first_epoch, first_position
        self._reader = None

    def __getitem__(self, k: int) -> _Filled:
        if self._reader is None:  # opened in the worker: HDF5 handles do not survive a fork
            self._reader = open_shards(self.root).split(self.split)
        batch = self.plan.batch(*self.plan.locate(self.first_epoch, self.first_position, k), self._reader)
        slot = k % len(self.slots)
        self._reader.gather(batch.indices, self.slots[slot].numpy())
        return _Filled(slot, batch)

    def __len__(self) -> int:
        return 2**62


def stop_dali(pipe) -> None:
    """Stop a DALI pipeline and its Python worker processes, for certain.

    DALI stops them only when the pipeline is garbage-collected, and its processes are not
    daemons: left alone they kept a finished two-process run waiting at exit. Its pool asks each
    worker to leave and then waits; a worker that does not (it ignores SIGTERM, see
    ``prep.lifeline``) is killed after STOP_GRACE_SECONDS so that wait always ends.
    """
    pool = getattr(pipe, "_py_pool", None)
    pids = pool.pids() if pool is not None else []
    pipe._shutdown()  # the executor first: nothing may wait on the workers while they go
    if pool is None:
        return
    killer = threading.Timer(STOP_GRACE_SECONDS, kill_children, args=(pids,))
    killer.daemon = True
    killer.start()
    try:
        pool.close()
    finally:
        killer.cancel()


def kill_children(pids) -> None:
    """SIGKILL those of ``pids`` that are still children of this process."""
    import signal

    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if parent == os.getpid():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
