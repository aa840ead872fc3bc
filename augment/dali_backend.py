"""The DALI backend: shard samples -> crop (or resize), mirror, lighting and normalisation, fused.

DALI has no HDF5 reader, so a parallel ``external_source`` callback feeds it, one call per
batch, in DALI's Python worker processes. The callback (``ShardSource``) takes batch k of the
stream from the plan (``augment.feed``: its place, the order, the rank split and every
per-sample parameter, the same the torch backend uses) and returns one ``FeedRecord``: the
images, the labels, the lighting offsets, the windows in the forms DALI's operators take them,
the mirror flags and the batch's tag. The graph is one of four:

    crop      the stored images (a JPEG decoded first: nvJPEG on a GPU), each window cut at its
              corner by ``crop_mirror_normalize``: the paper's crops, val without val_resize
    resize    the stored images, each window resized to the output by ``fn.resize`` (its
              region of interest, antialiased linear), then ``crop_mirror_normalize`` without a
              crop: resized windows on a GPU, where the resize costs the host nothing
    windows   windows the workers already cut (a JPEG: only the window's region decoded) and
              resized in uint8 (``augment.windows``): resized windows on the CPU (the paper's
              crops too where ``resize_on="workers"`` asks), where DALI's own operators cost
              more. There the graph hands the uint8 windows out (with their mirror flags,
              lighting offsets and, for mean-image normalisation, corners; the ten views of
              test10 alone) and ``augment.torch_ops`` finishes them as the torch backend does
              (NCHW float32: one compiled pass, ``augment.planes``): crop_mirror_normalize on the
              CPU, and the copy of its float output, cost ~190 us an image more than that finish
              for resized windows, ~85 us for the paper's crops.
    ten       the paper's ten crops of square images, ten ``crop_mirror_normalize`` stacked

``resize_on="device"`` runs DALI's own graphs (crop, resize, ten) on the CPU too.

Lighting folds into a per-sample mean:  (v + offset - mean) / std = (v - (mean - offset)) / std.

The stream is endless (``augment.feed``): it never raises StopIteration, so DALI keeps
prefetching across epoch boundaries and the Loader takes exactly the batches it needs.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass

import numpy as np

from augment.buffers import ReusedOutputs
from augment.errors import worker_errors_reported
from augment.params import ten_crop_windows
from augment.streams import Delivered, StreamRequest
from augment.torch_ops import finish_windows, on_device, one_torch_thread
from augment.windows import cut_ten, cut_windows, decoded, quiet_threads, window_sources
from prep.lifeline import become_worker, starting_workers

STOP_GRACE_SECONDS = 5  # a worker that has not left this long after being told to is killed
PIPELINE_DEPTH = 2  # batches DALI keeps ready beyond the one being used


@dataclass
class FeedRecord:
    """One batch as ``external_source`` outputs it, a field an output (per sample, in order)."""

    images: list | np.ndarray  # uint8: the images as stored or decoded, or the cut windows (one array)
    labels: np.ndarray  # int64 [B]; -1 on the repeated samples of a short last batch
    offsets: np.ndarray  # float32 [B, 3]: lighting, 0-255 scale
    crop_x: np.ndarray  # float32 [B]: the window's corner as DALI's relative crop position
    crop_y: np.ndarray  # float32 [B]
    crop_side: np.ndarray  # float32 [B]: the window's side (crop graph)
    roi_start: np.ndarray  # float32 [B, 2]: (y, x) of the window (resize graph)
    roi_end: np.ndarray  # float32 [B, 2]
    out_size: np.ndarray  # float32 [B, 2]: (r, r), the output side (resize graph)
    mirror: np.ndarray  # int32 [B]
    tag: np.ndarray  # int64 [B, 3]: (generation, epoch, position) of the batch, on every row


# The fields each graph reads (DALI warns of, and computes, outputs nobody uses).
FEEDS = {
    "crop": ("images", "labels", "offsets", "crop_x", "crop_y", "crop_side", "mirror", "tag"),
    "resize": ("images", "labels", "offsets", "roi_start", "roi_end", "out_size", "mirror", "tag"),
    "windows": ("images", "labels", "offsets", "mirror", "tag"),
    "windows, mean image": ("images", "labels", "offsets", "mirror", "roi_start", "tag"),
    "ten windows": ("images", "labels", "offsets", "tag"),
    "ten": ("images", "labels", "offsets", "tag"),
    "feed only": ("images", "labels", "tag"),
}


def record_types(names) -> list:
    """DALI types of the FeedRecord fields ``names``."""
    from nvidia.dali import types

    kinds = {"images": types.UINT8, "labels": types.INT64, "mirror": types.INT32, "tag": types.INT64}
    return [kinds.get(name, types.FLOAT) for name in names]


def hands_windows(request: StreamRequest) -> bool:
    """Whether the graph's output is the workers' uint8 windows, finished by torch (see above)."""
    return request.device != "cuda" and graph_kind(request) == "windows"


def graph_kind(request: StreamRequest) -> str:
    """Which graph (see above) runs ``request``: DALI's own operators on the device where
    ``resize_on`` asks for them (the default, but for resized windows on the CPU), else the
    workers' windows. DALI's graphs alone cut the mean image by each window on a GPU, and the ten
    views' mean image anywhere. The paper's crops on the CPU are 1.7x faster from the workers'
    windows, but only where asked: with them, a Ctrl-C of a two-process run sometimes ended in
    a crash at interpreter exit (BENCHMARKS.md), a cause not found yet."""
    spec, cuda = request.spec, request.device == "cuda"
    by_dali = (request.resize_on or ("device" if cuda or not spec.resizes else "workers")) == "device"
    mean_image = spec.normalize == "mean-image"  # square shards, no resize (AugmentSpec, the statistics)
    if spec.mode == "test10":
        return "ten" if request.square and not spec.resizes and (by_dali or mean_image) else "windows"
    if not spec.resizes:
        return "crop" if by_dali or (cuda and mean_image) else "windows"
    return "resize" if by_dali else "windows"


def start_method(device: str) -> str:
    """DALI refuses to fork its workers once this process has initialised CUDA's driver (on a
    GPU machine, any ``torch.cuda.is_available()`` may have): then, and for GPU loaders, spawn."""
    if device == "cuda":
        return "spawn"
    try:
        from nvidia.dali.backend import IsDriverInitialized

        if IsDriverInitialized():
            return "spawn"
    except ImportError:
        pass
    import torch

    return "spawn" if torch.cuda.is_initialized() else "fork"


class ShardSource:
    """The batch callback of ``fn.external_source``; picklable, it opens the shards lazily in
    each worker. Call k returns batch k of the stream as a FeedRecord's fields."""

    def __init__(self, request: StreamRequest, kind: str, names: tuple[str, ...]):
        self.root, self.split, self.plan, self.table = request.root, request.split, request.plan, request.table
        self.cache = request.cache
        self.spec, self.kind, self.names = request.spec, kind, names
        self.parent_pid = os.getpid()  # the training process: workers must not outlive it
        self._reader = None

    def __setstate__(self, state):
        """Unpickled in a worker started by 'spawn' (CUDA): it becomes a worker before any batch.
        (Forked workers do so in ``prep.lifeline.starting_workers``.)"""
        self.__dict__.update(state)
        if os.getpid() != self.parent_pid:
            become_worker(self.parent_pid)

    def __call__(self, k: int):
        with worker_errors_reported(self.table):
            record = self.record(k)
            return tuple(getattr(record, name) for name in self.names)

    def record(self, k: int) -> FeedRecord:
        if self._reader is None:
            from prep.shards import open_shards

            quiet_threads(self.parent_pid)
            self._reader = open_shards(self.root, cached_by=self.cache).split(self.split)
        reader, spec = self._reader, self.spec
        generation, epoch, position, res = self.table.place(self.plan, k)
        batch = self.plan.batch(epoch, position, reader, res, generation)
        params, size = batch.params, len(batch.indices)
        stored = reader.stored_many(batch.indices)
        if self.kind == "windows" and spec.mode == "test10":
            images = cut_ten(decoded(reader, batch.indices, stored), spec,
                             np.empty((size, 10, spec.crop, spec.crop, 3), np.uint8))
        elif self.kind == "windows":
            images = cut_windows(*window_sources(reader, batch.indices, stored, params), batch.res,
                                 np.empty((size, batch.res, batch.res, 3), np.uint8))
        elif reader.bounded and not reader.storage.compressed:  # copied here, so that the files can be let go
            images = [np.array(image) for image in stored]
        else:
            images = stored  # views into the memory maps, or the JPEG bytes: DALI copies them once
        shapes = reader.shapes_of(batch.indices)
        # DALI's crop anchor is round(pos * (W - side)): pos = x / (W - side) puts it at x.
        span_x = np.maximum(shapes[:, 1] - params.width, 1)  # (the crop graph's windows are whole pixels)
        span_y = np.maximum(shapes[:, 0] - params.height, 1)
        start = np.stack([params.y, params.x], axis=1).astype(np.float32)
        reader.let_go()  # (a bounded cache: no image below is a view of a file)
        return FeedRecord(
            images=images if isinstance(images, np.ndarray) else list(images), labels=batch.labels, offsets=batch.offsets,
            crop_x=(params.x / span_x).astype(np.float32), crop_y=(params.y / span_y).astype(np.float32),
            crop_side=params.width.astype(np.float32), roi_start=start,
            roi_end=start + np.stack([params.height, params.width], axis=1).astype(np.float32),
            out_size=np.full((size, 2), batch.res, np.float32), mirror=params.mirror.astype(np.int32),
            tag=np.tile(np.array([[batch.generation, batch.epoch, batch.position]], np.int64), (size, 1)))


def build_pipeline(request: StreamRequest, feed_only: bool = False):
    """A started DALI pipeline for ``request``; outputs (images, labels, tag), and (offsets,
    mirror[, corners (y, x) for mean-image]) where it ``hands_windows`` of train or val (not the
    ten views of test10).
    ``feed_only``: the source's images as they are, no image operation (tools/bench_feed)."""
    from nvidia.dali import fn, pipeline_def, types

    spec, colour, cuda = request.spec, request.colour, request.device == "cuda"
    kind = graph_kind(request)
    device_id = None
    if cuda:
        import torch

        device_id = torch.cuda.current_device()
    dtype = {"float32": types.FLOAT, "float16": types.FLOAT16}[spec.dtype]
    workers = max(1, request.workers)
    ten_windows = kind == "windows" and spec.mode == "test10"
    layout = ("FCHW" if ten_windows else "CHW") if spec.layout == "NCHW" else ("FHWC" if ten_windows else "HWC")
    handed = hands_windows(request)
    bare = feed_only or (ten_windows and handed)  # the images alone: ten views are neither mirrored nor lit
    cornered = handed and spec.normalize == "mean-image"  # the finish cuts the mean image by each window
    names = FEEDS["feed only" if bare else "ten windows" if ten_windows else "windows, mean image" if cornered
                  else kind]
    source = ShardSource(request, kind, names)
    image_layout = "FHWC" if ten_windows else "" if request.compressed and kind != "windows" else "HWC"

    @pipeline_def(batch_size=request.batch_size, num_threads=workers, device_id=device_id, py_num_workers=workers,
                  py_start_method=start_method(request.device), prefetch_queue_depth=PIPELINE_DEPTH)
    def graph():
        # Batch mode: each batch is one worker's task, so the workers run in parallel only as
        # far as batches are prefetched: keep every worker busy, plus one batch in hand.
        outputs = fn.external_source(source=source, num_outputs=len(names), parallel=True, batch=True,
                                     prefetch_queue_depth=workers + 1, dtype=record_types(names),
                                     layout=[image_layout] + [""] * (len(names) - 1))
        record = dict(zip(names, outputs))
        image, label, tag = record["images"], record["labels"], record["tag"]
        if bare:
            return image, label, tag
        if handed:
            return image, label, tag, record["offsets"], record["mirror"], *([record["roi_start"]] if cornered else [])
        offset = record["offsets"]
        if request.compressed and kind != "windows":  # JPEG blobs: decoded here, by nvJPEG on a GPU
            image = fn.decoders.image(image, device="mixed" if cuda else "cpu", output_type=types.RGB)
        elif cuda:
            image = image.gpu()
        if cuda:
            label = label.gpu()  # the iterator hands out CPU tensors for CPU outputs (the tag stays there)
        if spec.normalize == "mean-image":
            mean_image = types.Constant(colour.mean_image, layout="HWC", device="gpu" if cuda else "cpu")
            image = fn.cast(image, dtype=types.FLOAT) - mean_image
            mean, std = -offset, 1.0
        elif spec.per_channel:
            mean, std = types.Constant(colour.mean.astype(np.float32)) - offset, colour.std.astype(np.float32).tolist()
        else:
            mean, std = -offset, 1.0

        def normalised(pixels, **window):
            return fn.crop_mirror_normalize(pixels, mean=mean, std=std, dtype=dtype, output_layout=layout, **window)

        if kind == "ten":
            span = max(request.size - spec.crop, 1)
            views = [normalised(image, crop=(spec.crop, spec.crop), crop_pos_x=x0 / span, crop_pos_y=y0 / span,
                                mirror=flip)
                     for flip in (0, 1) for x0, y0, _, _ in ten_crop_windows(spec, request.size, request.size)]
            return fn.stack(*views, axis=0), label, tag
        if kind == "crop":
            side = record["crop_side"]
            return normalised(image, crop_h=side, crop_w=side, crop_pos_x=record["crop_x"],
                              crop_pos_y=record["crop_y"], mirror=record["mirror"]), label, tag
        if kind == "resize":
            image = fn.resize(image, size=record["out_size"], roi_start=record["roi_start"],
                              roi_end=record["roi_end"], roi_relative=False, interp_type=types.INTERP_LINEAR,
                              antialias=True, dtype=types.UINT8)
        return normalised(image, mirror=0 if ten_windows else record["mirror"]), label, tag

    pipe = graph()
    with starting_workers():  # forked workers die with us and leave group signals to us
        pipe.start_py_workers()
    return pipe


class DaliStream:
    """The DALI backend's ``Stream``: the pipeline, its iterator and its workers.

    On a GPU, DALI's torch iterator copies each output into a new device tensor (torch's caching
    allocator reuses the memory). On the CPU the outputs go into tensors kept for reuse
    (``augment.buffers``): a new 77 MB host tensor a batch cost as much as the batch's maths.
    Windows handed out as uint8 (``hands_windows``) are finished by ``torch_ops`` here, read in
    DALI's output buffer and written into a kept tensor (float32; float16 batches are new ones)."""

    def __init__(self, request: StreamRequest, feed_only: bool = False):
        from nvidia.dali.plugin.pytorch import DALIGenericIterator

        self.pipe = build_pipeline(request, feed_only)
        self.iterator, self.outputs = None, ReusedOutputs()
        self.spec, self.finishes = request.spec, hands_windows(request) and not feed_only
        self.colour = on_device(request.colour, "cpu") if self.finishes else None
        try:
            if request.device == "cuda":
                self.iterator = DALIGenericIterator(self.pipe, ["images", "labels", "tag"], auto_reset=False)
        except BaseException:  # its first batch failed: its workers must not outlive it
            stop_dali(self.pipe)
            raise
        pool = getattr(self.pipe, "_py_pool", None)
        self.pids = pool.pids() if pool is not None else []
        # How far ahead of the batch being taken the workers may have begun one: the source's
        # prefetch, DALI's queue, the batch in hand.
        self.horizon = max(1, request.workers) + 1 + PIPELINE_DEPTH + 2

    def __next__(self) -> Delivered:
        if self.iterator is None:
            images, labels, tag = self._run_on_cpu()
        else:
            (output,) = next(self.iterator)
            images, labels, tag = output["images"], output["labels"], output["tag"]
        generation, epoch, position = (int(v) for v in tag[0])  # a CPU tensor: no device sync
        return Delivered(images, labels.reshape(-1), generation, epoch, position)

    def _run_on_cpu(self) -> tuple:
        import torch
        from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type

        images, labels, tag, *lit = (output.as_tensor() for output in self.pipe.run())  # valid until the next run
        if self.finishes:  # read (and mirrored) where DALI left them; on one thread, as the torch backend does
            offsets, mirror, *corners = (torch.from_numpy(np.array(v)) for v in lit) if lit else (None, None)
            outputs = self.outputs if self.spec.dtype == "float32" else None
            with one_torch_thread():
                out = finish_windows(torch.from_numpy(np.asarray(images)), mirror.bool() if lit else None, offsets,
                                     self.spec, self.colour, outputs, *corners)
        else:
            out = self.outputs.take(tuple(images.shape()), to_torch_type[images.dtype])
            feed_ndarray(images, out)
        return out, torch.from_numpy(np.array(labels)), np.array(tag)

    def close(self) -> None:
        stop_dali(self.pipe)


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

    from prep.procs import process_stat

    for pid in pids:
        stat = process_stat(pid)
        if stat is not None and stat.parent == os.getpid():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
