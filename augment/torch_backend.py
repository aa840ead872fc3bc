"""The torch backend: worker processes fill a ring of shared buffers, the device does the maths.

    workers (a torch DataLoader)                 this process, on the device
    batch k of the stream (augment.feed)  ->     slot k % slots: uint8 images + parameters
      whole square images, or windows            one copy of each to the device (a stream of
      cut and resized in uint8                   their own on a GPU), then crop, mirror,
      (augment.windows), and a float32           lighting, normalisation (augment.torch_ops)
      [B, 8] block: x, y, mirror, the
      lighting offset, the label

Two kinds of batch. On a GPU, square shards read without resizing (the paper's crops, val
without val_resize, the ten crops) copy each image whole, one memory copy out of the page cache,
and the device cuts the windows. Everything else (random-resized crops, val_resize, aspect-kept
shards, and every window on the CPU) has the workers cut each window and resize it to the output
side in uint8, and the device only mirrors, lights and normalises. On the CPU that moves the cut
into the workers: for the paper's crops 0.77x the bytes through the slots (224 of 256), 10-20%
less CPU an image; for the ten views 7.7x the bytes (ten 224 windows against one 256 image: a
larger ring of shared memory) for 3x the images/s. The ten views with the mean image stay whole
(``ten_crop_batch`` cuts the mean image with them).

Nothing is read back from the device per batch: labels and parameters travel with the images.
"""

from __future__ import annotations

import contextlib
import os
from collections import deque
from dataclasses import dataclass

import numpy as np
import torch

from augment.buffers import ReusedOutputs
from augment.errors import worker_errors_reported
from augment.feed import PlannedBatch
from augment.streams import Delivered, StreamRequest
from augment.torch_ops import augment_whole, finish_windows, kept_output, on_device, one_torch_thread, ten_crop_batch
from augment.windows import cut_ten, cut_windows, decoded, quiet_threads, window_sources
from prep.lifeline import starting_workers

PARAMETERS = 8  # per sample: x, y, mirror, offset R, G, B, label, (unused)


def copies_whole(request: StreamRequest) -> bool:
    """Whether the workers copy whole images (square shards, windows not resized; see above)."""
    spec = request.spec
    if not request.square or spec.resizes:
        return False
    return request.device == "cuda" or (spec.mode == "test10" and spec.normalize == "mean-image")


def sample_bytes(request: StreamRequest) -> int:
    """Bytes one sample may take in a slot."""
    spec = request.spec
    if copies_whole(request):
        return request.size * request.size * 3
    if spec.mode == "test10":
        return 10 * spec.crop * spec.crop * 3
    return max(request.max_res, spec.crop) ** 2 * 3


class SlotRing:
    """Shared buffers that the workers fill in turn: uint8 [slots, B * sample bytes] for the
    images and float32 [slots, B, 8] for the parameters.

    Batch k goes to slot k % slots. The DataLoader keeps at most ``workers * prefetch`` tasks
    ahead and hands out the next task when this process takes a batch, so with two slots more
    than that, taking batch r lets a worker start on the slot of batch r - 2, which this process
    finished with before asking for batch r - 1. On a GPU the buffers are page-locked
    (cudaHostRegister, once the workers have started: ``register``) and copied asynchronously on
    a stream of their own, which overlaps the copy with the model's work; before taking batch r
    we wait for the copy out of the slot of batch r - 2 (long done: it was issued a whole step
    earlier).
    """

    def __init__(self, workers: int, batch_size: int, sample_bytes: int, device: str):
        self.prefetch = 2
        count = workers * self.prefetch + 2 if workers else 2
        self.images = torch.empty((count, batch_size * sample_bytes), dtype=torch.uint8)
        self.params = torch.zeros((count, batch_size, PARAMETERS), dtype=torch.float32)
        if workers:
            self.images.share_memory_()
            self.params.share_memory_()
        self.device = device
        self.registered: list[torch.Tensor] = []
        self.stream = torch.cuda.Stream() if device == "cuda" else None
        self._copies = deque()

    def register(self) -> bool:
        """Page-lock the buffers for asynchronous copies; False (copies then wait) if it fails."""
        if self.device != "cuda":
            return False
        cudart = torch.cuda.cudart()
        for tensor in (self.images, self.params):
            if int(cudart.cudaHostRegister(tensor.data_ptr(), tensor.nbytes, 0)) != 0:
                return False
            self.registered.append(tensor)
        return True

    def before_fetch(self) -> None:
        if len(self._copies) == 2:
            self._copies.popleft().synchronize()

    def to_device(self, slot: int, shape: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        """(images viewed as ``shape``, parameters [B, 8]) of ``slot`` on the device."""
        count = int(np.prod(shape))
        images, params = self.images[slot, :count].view(shape), self.params[slot]
        if self.device != "cuda":
            return images, params
        asynchronous = len(self.registered) == 2
        with torch.cuda.stream(self.stream):
            images = images.to(self.device, non_blocking=asynchronous)
            params = params.to(self.device, non_blocking=asynchronous)
            done = torch.cuda.Event()
            done.record(self.stream)
        current = torch.cuda.current_stream()
        current.wait_event(done)  # the augmentation waits for its input ...
        images.record_stream(current)  # ... which the allocator keeps until used
        params.record_stream(current)
        self._copies.append(done)
        return images, params

    def release(self) -> None:
        if self.registered:
            self.stream.synchronize()  # only our copies: not the model's kernels, which may never end
            for tensor in self.registered:
                torch.cuda.cudart().cudaHostUnregister(tensor.data_ptr())
            self.registered = []


@dataclass(frozen=True)
class Filled:
    slot: int
    batch: PlannedBatch  # a plain object: the DataLoader passes it pickled, not as shared tensors


class SlotFiller(torch.utils.data.Dataset):
    """Task k: batch k of the stream (its place from the stream table), its images copied or cut
    into slot k % slots and its parameters into the slot's block."""

    def __init__(self, request: StreamRequest, ring: SlotRing):
        self.root, self.split, self.plan, self.table = request.root, request.split, request.plan, request.table
        self.cache = request.cache
        self.spec, self.whole = request.spec, copies_whole(request)
        self.images, self.params = ring.images, ring.params
        self.parent_pid = os.getpid()
        self._reader = None

    def __getitem__(self, k: int) -> Filled:
        with worker_errors_reported(self.table):
            return self._fill(k)

    def _fill(self, k: int) -> Filled:
        if self._reader is None:  # opened in the worker: HDF5 handles do not survive a fork
            from prep.shards import open_shards

            quiet_threads(self.parent_pid)
            self._reader = open_shards(self.root, cached_by=self.cache).split(self.split)
        generation, epoch, position, res = self.table.place(self.plan, k)
        batch = self.plan.batch(epoch, position, self._reader, res, generation)
        slot = k % len(self.images)
        size = len(batch.indices)
        images = self.images[slot].numpy()
        if self.whole:
            self._reader.gather(batch.indices, images[: size * self._reader.size ** 2 * 3].reshape(
                size, self._reader.size, self._reader.size, 3))
        else:
            stored = self._reader.stored_many(batch.indices)
            if self.spec.mode == "test10":
                side = self.spec.crop
                cut_ten(decoded(self._reader, batch.indices, stored), self.spec,
                        images[: size * 10 * side * side * 3].reshape(size, 10, side, side, 3))
            else:
                cut_windows(*window_sources(self._reader, batch.indices, stored, batch.params), batch.res,
                            images[: size * batch.res ** 2 * 3].reshape(size, batch.res, batch.res, 3))
        params = self.params[slot].numpy()
        params[:, 0], params[:, 1], params[:, 2] = batch.params.x, batch.params.y, batch.params.mirror
        params[:, 3:6], params[:, 6] = batch.offsets, batch.labels
        self._reader.let_go()  # the images are copied into the slot
        return Filled(slot, batch)

    def __len__(self) -> int:
        return 2**62


class TorchStream:
    """The torch backend's ``Stream``: the DataLoader's workers and the device half."""

    def __init__(self, request: StreamRequest):
        self.spec, self.device, self.size = request.spec, request.device, request.size
        self.whole = copies_whole(request)
        self.colour = on_device(request.colour, request.device)  # once, not per batch
        self.ring = SlotRing(request.workers, request.batch_size, sample_bytes(request), request.device)
        loader = torch.utils.data.DataLoader(
            # Its own generator: a DataLoader draws a seed when it starts, which must not move the
            # global torch RNG (dropout), or a resumed run would draw other dropout masks.
            SlotFiller(request, self.ring), sampler=range(2**62), batch_size=None, num_workers=request.workers,
            generator=torch.Generator(), prefetch_factor=self.ring.prefetch if request.workers else None)
        try:
            with starting_workers():
                self.iterator = iter(loader)  # forks the workers
            self.pinned = self.ring.register()  # after the fork: the children need no pinned pages
        except BaseException:
            self.ring.release()
            raise
        self.pids = [worker.pid for worker in getattr(self.iterator, "_workers", [])]
        # How far ahead of the batch being taken a worker may have begun one: the tasks the
        # DataLoader hands out ahead (none without workers: it runs each when asked).
        self.horizon = request.workers * self.ring.prefetch + 1
        # On the CPU with worker processes, the batch maths runs on one thread: the workers keep
        # the cores busy, and torch's thread pool fighting them for the cores made every copy
        # and float op of the batch about ten times slower (measured on 2 loaded cores).
        self.one_thread = self.device == "cpu" and request.workers > 0
        # CPU float32 batches go into kept tensors nobody holds any more (augment.buffers).
        self.outputs = ReusedOutputs() if self.device == "cpu" and self.spec.dtype == "float32" else None

    def __next__(self) -> Delivered:
        self.ring.before_fetch()
        filled = next(self.iterator)
        with one_torch_thread() if self.one_thread else contextlib.nullcontext():
            return self._augment(filled)

    def _augment(self, filled) -> Delivered:
        batch, spec = filled.batch, self.spec
        size = len(batch.indices)
        if self.whole:
            shape = (size, self.size, self.size, 3)
        elif spec.mode == "test10":
            shape = (size, 10, spec.crop, spec.crop, 3)
        else:
            shape = (size, batch.res, batch.res, 3)
        images, params = self.ring.to_device(filled.slot, shape)
        offsets, labels = params[:, 3:6], params[:, 6].long()
        if not self.whole:
            corners = params[:, [1, 0]] if spec.normalize == "mean-image" else None  # (y, x)
            out = finish_windows(images, params[:, 2].bool(), offsets, spec, self.colour, self.outputs, corners)
        elif spec.mode == "test10":
            out = ten_crop_batch(images, spec, self.colour)
        else:
            x, y, mirror = params[:, 0].long(), params[:, 1].long(), params[:, 2].bool()
            out = augment_whole(images, x, y, mirror, offsets, spec, self.colour, batch.res,
                                kept_output(self.outputs, spec, (size, batch.res)))
        return Delivered(out, labels, batch.generation, batch.epoch, batch.position)

    def close(self) -> None:
        shutdown = getattr(self.iterator, "_shutdown_workers", None)  # joins them (one process has none)
        if shutdown is not None:
            shutdown()
        self.ring.release()
