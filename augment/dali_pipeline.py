"""The DALI graph: shard samples -> crop, mirror, lighting and normalisation in one fused op.

DALI has no HDF5 reader, so a parallel ``external_source`` callback reads one sample per call
in DALI's Python worker processes. The callback owns order, rank split and augmentation
parameters (``augment.params``, the same function the torch backend uses) and returns, per
sample: the image (uint8 HWC, or the JPEG bytes), the label, the lighting offset and (train
and val) the window corner as DALI's relative crop position and the mirror flag. Then one
``crop_mirror_normalize`` does everything, with lighting folded into a per-sample mean:

    (v + offset - mean) / std  =  (v - (mean - offset)) / std

The source is an endless stream: sample k of it belongs to epoch first_epoch + k // per_epoch.
It never raises StopIteration, so DALI keeps prefetching across epoch boundaries and the
Loader takes exactly one epoch's batches at a time. Evaluation pads its last batch with
label -1 samples, which the Loader drops: DALI batches are always full.
"""

from __future__ import annotations

import numpy as np

from augment.colour import ColourStats, lighting_offsets
from augment.params import sample_params
from augment.sampler import batches_per_epoch, rank_samples
from augment.spec import AugmentSpec
from augment.torch_ops import ten_crop_corners


class ShardSource:
    """The external_source callback; picklable, it opens the shards lazily in each worker."""

    def __init__(self, root, split: str, spec: AugmentSpec, colour: ColourStats, batch_size: int, rank: int,
                 world_size: int, seed: int, first_epoch: int, skip_samples: int):
        self.root, self.split, self.spec, self.colour = str(root), split, spec, colour
        self.batch_size, self.rank, self.world_size, self.seed = batch_size, rank, world_size, seed
        self.first_epoch, self.skip_samples = first_epoch, skip_samples
        self._reader = None
        self._order = (None, None)  # (epoch, sample indices of this rank in that epoch)

    def _open(self):
        from prep.shards import open_shards

        self._reader = open_shards(self.root).split(self.split)
        self.size = self._reader.size
        self.per_epoch = self.batch_size * batches_per_epoch(
            len(self._reader), self.batch_size, self.rank, self.world_size, self.spec.random)

    def __call__(self, sample_info):
        if self._reader is None:
            self._open()
        k = sample_info.idx_in_epoch + self.skip_samples
        epoch, position = self.first_epoch + k // self.per_epoch, k % self.per_epoch
        if self._order[0] != epoch:
            self._order = (epoch, rank_samples(len(self._reader), self.batch_size, self.rank, self.world_size,
                                               self.spec.random, self.seed, epoch))
        order = self._order[1]
        index = int(order[min(position, len(order) - 1)])
        stored, label = self._reader.stored(index)
        if position >= len(order):
            label = -1  # padding of the last evaluation batch
        params = sample_params(self.spec, self.size, self.seed, epoch, [index])
        offset = lighting_offsets(params.alpha, self.colour)[0].astype(np.float32)
        label = np.array(label, np.int64)
        if self.spec.mode == "test10":  # fixed windows: no per-sample position or mirror
            return stored, label, offset
        mirror = np.array(params.mirror[0], np.int32)
        if params.width is not None:  # random-resized: the window as a region of interest (y, x)
            x, y, w, h = params.x[0], params.y[0], params.width[0], params.height[0]
            return (stored, label, offset, np.array([y, x], np.float32), np.array([y + h, x + w], np.float32), mirror)
        span = max(self.size - self.spec.crop, 1)  # DALI's anchor is round(pos * (S - crop))
        return (stored, label, offset, np.array(params.x[0] / span, np.float32),
                np.array(params.y[0] / span, np.float32), mirror)


def build_pipeline(source: ShardSource, spec: AugmentSpec, encoding: str, size: int, batch_size: int,
                   device: str, workers: int):
    """A started DALI pipeline yielding (images, labels) batches of ``spec``."""
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
        image, label, offset, *window_params = fn.external_source(
            source=source, num_outputs=3 if ten else 6, parallel=True, batch=False,
            dtype=[types.UINT8, types.INT64, types.FLOAT] + ([] if ten else [types.FLOAT, types.FLOAT, types.INT32]))
        if encoding == "jpeg":
            image = fn.decoders.image(image, device="mixed" if cuda else "cpu", output_type=types.RGB)
        elif cuda:
            image = image.gpu()
        if cuda:
            label = label.gpu()  # the iterator hands out CPU tensors for CPU outputs
        if spec.normalize == "mean-image":
            mean_image = types.Constant(colour.mean_image, layout="HWC", device="gpu" if cuda else "cpu")
            image = fn.cast(image, dtype=types.FLOAT) - mean_image
            mean, std = -offset, 1.0
        elif spec.normalize == "channel":
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
    pipe.start_py_workers()
    return pipe
