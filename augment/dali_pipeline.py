"""The DALI graph: shard samples -> crop, mirror, lighting and normalisation in one fused op.

DALI has no HDF5 reader, so a parallel ``external_source`` callback feeds it, one call per
batch, in DALI's Python worker processes. The callback takes its batch from the plan
(``augment.feed``: order, rank split and augmentation parameters, the same the torch backend
uses) and returns, as arrays: the images as stored (views into the shards' memory maps, which
DALI copies once into its shared memory; or the JPEG bytes), the labels, the lighting offsets
and (train and val) the window corners as DALI's relative crop positions and the mirror flags.
Then one ``crop_mirror_normalize`` does everything, with lighting folded into a per-sample mean:

    (v + offset - mean) / std  =  (v - (mean - offset)) / std

The stream is endless (``augment.feed``): it never raises StopIteration, so DALI keeps
prefetching across epoch boundaries and the Loader takes exactly one epoch's batches at a time.
"""

from __future__ import annotations

import os

import numpy as np

from augment.colour import ColourStats, lighting_offsets
from augment.feed import BatchPlan
from augment.spec import AugmentSpec
from augment.torch_ops import ten_crop_corners
from prep.lifeline import become_worker, starting_workers


class ShardSource:
    """The batch callback of ``fn.external_source``; picklable, it opens the shards lazily in
    each worker. Call k returns batch k of the stream that starts at (first_epoch, first_position)."""

    def __init__(self, root, split: str, plan: BatchPlan, colour: ColourStats, first_epoch: int,
                 first_position: int):
        self.root, self.split, self.plan, self.colour = str(root), split, plan, colour
        self.first_epoch, self.first_position = first_epoch, first_position
        self.parent_pid = os.getpid()  # the training process: workers must not outlive it
        self._reader = None

    def __setstate__(self, state):
        """Unpickled in a worker started by 'spawn' (CUDA): it becomes a worker before any batch.
        (Forked workers do so in ``prep.lifeline.starting_workers``.)"""
        self.__dict__.update(state)
        if os.getpid() != self.parent_pid:
            become_worker(self.parent_pid)

    def _open(self):
        from prep.shards import open_shards

        self._reader = open_shards(self.root).split(self.split)

    def __call__(self, iteration: int):
        if self._reader is None:
            self._open()
        plan, spec = self.plan, self.plan.spec
        batch = plan.batch(*plan.locate(self.first_epoch, self.first_position, iteration), self._reader)
        stored = self._reader.stored_many(batch.indices)
        params = batch.params
        offsets = lighting_offsets(params.alpha, self.colour).astype(np.float32)
        if spec.mode == "test10":  # fixed windows: no per-sample position or mirror
            return stored, batch.labels, offsets
        mirror = params.mirror.astype(np.int32)
        if params.width is not None:  # random-resized: the window as a region of interest (y, x)
            start = np.stack([params.y, params.x], axis=1).astype(np.float32)
            end = start + np.stack([params.height, params.width], axis=1).astype(np.float32)
            return stored, batch.labels, offsets, start, end, mirror
        span = max(plan.size - spec.crop, 1)  # DALI's anchor is round(pos * (S - crop))
        return (stored, batch.labels, offsets, (params.x / span).astype(np.float32),
                (params.y / span).astype(np.float32), mirror)


def build_pipeline(source: ShardSource, spec: AugmentSpec, compressed: bool, size: int, batch_size: int,
                   device: str, workers: int, feed_only: bool = False):
    """A started DALI pipeline yielding (images, labels) batches of ``spec``. ``feed_only``: the
    source's (stored images, labels) as they are, no image operation (tools/bench_feed)."""
    from nvidia.dali import fn, pipeline_def, types

    cuda = device == "cuda"
    device_id = None
    if cuda:
        import torch

        device_id = torch.cuda.current_device()
    dtype = {"float32": types.FLOAT, "float16": types.FLOAT16}[spec.dtype]
    layout = "CHW" if spec.layout == "NCHW" else "HWC"
    colour = source.colour

    # spawn under CUDA: forked workers must not inherit a CUDA context.
    @pipeline_def(batch_size=batch_size, num_threads=max(1, workers), device_id=device_id,
                  py_num_workers=max(1, workers), py_start_method="spawn" if cuda else "fork",
                  prefetch_queue_depth=2)
    def graph():
        ten = spec.mode == "test10"
        # Batch mode: each batch is one worker's task, so the workers run in parallel only as
        # far as batches are prefetched: keep every worker busy, plus one batch in hand.
        image, label, offset, *window_params = fn.external_source(
            source=source, num_outputs=3 if ten else 6, parallel=True, batch=True,
            prefetch_queue_depth=max(1, workers) + 1,
            dtype=[types.UINT8, types.INT64, types.FLOAT] + ([] if ten else [types.FLOAT, types.FLOAT, types.INT32]))
        if feed_only:
            return image, label
        if compressed:  # JPEG blobs: decoded here, by nvJPEG on a GPU
            image = fn.decoders.image(image, device="mixed" if cuda else "cpu", output_type=types.RGB)
        elif cuda:
            image = image.gpu()
        if cuda:
            label = label.gpu()  # the iterator hands out CPU tensors for CPU outputs
        if spec.normalize == "mean-image":
            mean_image = types.Constant(colour.mean_image, layout="HWC", device="gpu" if cuda else "cpu")
            image = fn.cast(image, dtype=types.FLOAT) - mean_image
            mean, std = -offset, 1.0
        elif spec.per_channel:
            mean, std = types.Constant(colour.mean.astype(np.float32)) - offset, colour.std.astype(np.float32).tolist()
        else:
            mean, std = -offset, 1.0

        def window(x, y, mirror):
            return fn.crop_mirror_normalize(image, crop=(spec.crop, spec.crop), crop_pos_x=x, crop_pos_y=y,
                                            mirror=mirror, mean=mean, std=std, dtype=dtype, output_layout=layout)

        if spec.random and spec.crop_mode == "random-resized":
            roi_start, roi_end, flip = window_params
            image = fn.resize(image, size=(spec.crop, spec.crop), roi_start=roi_start, roi_end=roi_end,
                              roi_relative=False, interp_type=types.INTERP_LINEAR, antialias=True, dtype=types.FLOAT)
            return fn.crop_mirror_normalize(image, mirror=flip, mean=mean, std=std, dtype=dtype,
                                            output_layout=layout), label

        if ten:
            span = max(size - spec.crop, 1)
            views = [window(x0 / span, y0 / span, flip) for flip in (0, 1)
                     for x0, y0 in ten_crop_corners(size, spec.crop)]
            return fn.stack(*views, axis=0), label
        return window(*window_params), label

    pipe = graph()
    with starting_workers():  # forked workers die with us and leave group signals to us
        pipe.start_py_workers()
    return pipe

