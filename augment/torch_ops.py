"""The augmentation maths as plain batched torch functions: the torch backend's device half, the
reference the DALI graph is tested against, and what ``imgprep preview`` draws.

Images arrive as uint8 on the device: whole square images [B, S, S, 3] (cut here), or windows
already cut and resized by the loader workers [B, r, r, 3] (``augment.windows``). For sample b
with window corner (x_b, y_b), mirror flag m_b and lighting offset o_b (a 3-vector, 0-255 scale):

    crop       w_b[i, j]   = image_b[y_b + i, x_b + j]                 0 <= i, j < r
    mirror     w_b[i, j]   = w_b[i, r - 1 - j]                         when m_b
               (crop and mirror are one gather: column x_b + r - 1 - j)
    lighting   v_b[i, j]   = w_b[i, j] + o_b                           no clamping
    normalise  "channel":    (v_b - mean) / std    per channel, 0-255 mean and std (stats.json;
               "torchvision": the same with torchvision's ImageNet mean and std)
               "mean-image": v_b - M_b, M_b the mean image cut by the same window and mirror
               "none":       v_b

The per-sample parameters come as tensors on the device (the torch backend copies them there
with the images, in one transfer); the colour constants are put there once (``DeviceColour``).
Nothing here reads a device value back on the host.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch

from augment.colour import ColourStats, lighting_offsets
from augment.params import SampleParams, ten_crop_windows
from augment.spec import AugmentSpec

DTYPES = {"float32": torch.float32, "float16": torch.float16}


@dataclass(frozen=True)
class DeviceColour:
    """The normalisation constants, on the device once: float32 mean [3], std [3] and the mean
    image [S, S, 3] (mean-image normalisation only), also as planes [3, S, S] (the CPU's pass)."""

    mean: torch.Tensor
    std: torch.Tensor
    mean_image: torch.Tensor | None
    mean_planes: torch.Tensor | None = None


def on_device(colour: ColourStats, device) -> DeviceColour:
    def tensor(values):
        return torch.as_tensor(np.asarray(values, dtype=np.float32), device=device)

    mean_image = tensor(colour.mean_image) if colour.mean_image is not None else None
    return DeviceColour(tensor(colour.mean), tensor(colour.std), mean_image,
                        mean_image.permute(2, 0, 1).contiguous() if mean_image is not None else None)


@contextlib.contextmanager
def one_torch_thread():
    """torch's intra-op threads set to one for the block, then back to what they were."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def cut_windows(images: torch.Tensor, x: torch.Tensor, y: torch.Tensor, flags: torch.Tensor, size: int) -> torch.Tensor:
    """[B, H, W, C] -> [B, size, size, C]: the window with top-left corner (x_b, y_b) of each
    image, mirrored where ``flags`` [B] is true (x, y, flags: tensors on the images' device). On a
    GPU one gather kernel; on the CPU a copy of each window's rows (a gather there costs several
    times more)."""
    if images.device.type == "cpu":
        out = torch.empty((images.shape[0], size, size, images.shape[3]), dtype=images.dtype)
        for b, (left, top, flip) in enumerate(zip(x.tolist(), y.tolist(), flags.tolist())):
            window = images[b, top : top + size, left : left + size]
            out[b] = window.flip(1) if flip else window
        return out
    steps = torch.arange(size, device=images.device)
    rows = (y[:, None] + steps)[:, :, None]  # [B, size, 1]
    cols = torch.where(flags[:, None], x[:, None] + size - 1 - steps, x[:, None] + steps)[:, None, :]  # [B, 1, size]
    batch = torch.arange(images.shape[0], device=images.device)[:, None, None]
    return images[batch, rows, cols]


def mirror_windows(windows: torch.Tensor, flags: torch.Tensor) -> torch.Tensor:
    """[B, r, r, C] with the windows where ``flags`` is true mirrored left to right."""
    if windows.device.type == "cpu":
        for b in np.flatnonzero(flags.numpy()).tolist():
            windows[b] = windows[b].flip(1)
        return windows
    return torch.where(flags[:, None, None, None], windows.flip(2), windows)


def finish(windows: torch.Tensor, offsets: torch.Tensor, spec: AugmentSpec, colour: DeviceColour,
           mean_at: tuple | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 windows [B, r, r, 3], already mirrored -> [B, 3, r, r] (NCHW) or [B, r, r, 3] in
    spec.dtype: lighting ``offsets`` [B, 3] added, then normalised. ``mean_at`` = (x, y, mirror),
    tensors [B] (for "mean-image"): where each window lies in its square stored image and whether
    it was mirrored, so that the mean image is cut the same way. ``out``: a float32 tensor of the
    output's shape to write into (``augment.buffers``: on the CPU a new one costs more than the maths)."""
    nchw = spec.layout == "NCHW"
    if nchw and windows.device.type == "cpu" and spec.dtype == "float32":
        return planes_on_cpu(windows, offsets, spec, colour, mean_at, out)
    arranged = windows.permute(0, 3, 1, 2) if nchw else windows
    # Convert once, in the copy that rearranges, then scale and shift in place.
    values = arranged.to(torch.float32, memory_format=torch.contiguous_format) if out is None else out.copy_(arranged)
    channel = (slice(None), slice(None), None, None) if nchw else (slice(None), None, None, slice(None))
    if spec.per_channel:  # (v + o - mean) / std
        values.sub_((colour.mean - offsets)[channel]).div_(colour.std[(None, *channel[1:])])
    elif spec.normalize == "mean-image":  # v + o - M, M cut by the same window and mirror
        mean_windows = cut_windows(colour.mean_image.expand(len(windows), -1, -1, -1), *mean_at, windows.shape[1])
        values.sub_(mean_windows.permute(0, 3, 1, 2) if nchw else mean_windows).add_(offsets[channel])
    else:  # v + o
        values.add_(offsets[channel])
    return values.to(DTYPES[spec.dtype])


def planes_on_cpu(windows: torch.Tensor, offsets: torch.Tensor, spec: AugmentSpec, colour: DeviceColour,
                  mean_at: tuple | None, out: torch.Tensor | None) -> torch.Tensor:
    """``finish`` for NCHW float32 on the CPU: one compiled pass (``augment.planes``) that gives
    the values of the torch ops to the last bit, 2-3x faster (8x with the mean image)."""
    from augment.planes import normalise_planes, subtract_mean_planes

    batch, side = windows.shape[0], windows.shape[1]
    if out is None or not out.is_contiguous():  # the compiled loop writes whole planes in order
        out = torch.empty((batch, 3, side, side), dtype=torch.float32)
    pixels, offsets = windows.contiguous().numpy(), offsets.to(torch.float32).contiguous().numpy()
    if spec.normalize == "mean-image":  # (v - M) + o
        x, y, mirror = (v.contiguous().numpy() for v in mean_at)
        planes = colour.mean_planes.numpy()
        if x.size and (min(x.min(), y.min()) < 0 or max(y.max(), x.max()) + side > min(planes.shape[1:])):
            raise ValueError(f"windows of {side} at corners up to ({x.max()}, {y.max()}) fall outside the "
                             f"{planes.shape[2]} x {planes.shape[1]} mean image")  # the pass reads unchecked
        subtract_mean_planes(pixels, planes, y.astype(np.int64), x.astype(np.int64), mirror.astype(np.bool_),
                             offsets, out.numpy())
        return out
    if spec.per_channel:  # (v - (mean - o)) / std
        shift, scale = colour.mean.numpy() - offsets, colour.std.numpy()
    else:  # (v - (-o)) / 1 = v + o, exactly
        shift, scale = -offsets, np.ones(3, np.float32)
    normalise_planes(pixels, np.ascontiguousarray(shift, np.float32), np.ascontiguousarray(scale, np.float32),
                     out.numpy())
    return out


def kept_output(outputs, spec: AugmentSpec, lead: tuple) -> torch.Tensor | None:
    """A float32 tensor kept by ``outputs`` (``augment.buffers.ReusedOutputs``; None: the maths
    makes a new one) for an output of ``lead`` = (B, [views,] side) in ``spec.layout``."""
    if outputs is None:
        return None
    *batch, side = lead
    image = (3, side, side) if spec.layout == "NCHW" else (side, side, 3)
    return outputs.take((*batch, *image), torch.float32)


def finish_windows(windows: torch.Tensor, mirror: torch.Tensor, offsets: torch.Tensor, spec: AugmentSpec,
                   colour: DeviceColour, outputs=None, corners: torch.Tensor | None = None) -> torch.Tensor:
    """Windows the loader workers cut and resized, uint8 [B, r, r, 3] (the ten views
    [B, 10, c, c, 3] in test10), mirrored where ``mirror`` [B] is true, lit and normalised; on
    the CPU into a tensor ``outputs`` keeps (``kept_output``). ``corners`` [B, 2]: each window's
    (y, x) in its square stored image, where "mean-image" cuts the mean image by the same window."""
    batch, side = windows.shape[0], windows.shape[-2]
    if spec.mode == "test10":
        return finish_ten(windows, spec, colour, kept_output(outputs, spec, (batch, 10, side)))
    mean_at = None
    if spec.normalize == "mean-image":
        y, x = corners.to(torch.int64).unbind(1)
        mean_at = (x, y, mirror)
    return finish(mirror_windows(windows, mirror), offsets, spec, colour, mean_at,
                  out=kept_output(outputs, spec, (batch, side)))


def augment_whole(images: torch.Tensor, x, y, mirror, offsets, spec: AugmentSpec, colour: DeviceColour,
                  side: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Whole square images [B, S, S, 3] -> the output of their ``side`` x ``side`` windows at
    (x, y), mirrored, lit and normalised (``finish``)."""
    return finish(cut_windows(images, x, y, mirror, side), offsets, spec, colour, (x, y, mirror), out)


def augment_batch(images: torch.Tensor, params: SampleParams, spec: AugmentSpec, colour: ColourStats) -> torch.Tensor:
    """The recipe on a batch of whole square images uint8 [B, S, S, 3] with host parameters, for
    windows that need no resize (the paper's crops, val without val_resize): the reference."""
    device = images.device
    side = int(params.width[0])

    def tensor(values, dtype):
        return torch.as_tensor(np.asarray(values), dtype=dtype, device=device)

    offsets = tensor(lighting_offsets(params.alpha, colour), torch.float32)
    return augment_whole(images, tensor(params.x, torch.int64), tensor(params.y, torch.int64),
                         tensor(params.mirror, torch.bool), offsets, spec, on_device(colour, device), side)


def ten_crop_batch(images: torch.Tensor, spec: AugmentSpec, colour: DeviceColour) -> torch.Tensor:
    """uint8 [B, S, S, 3] -> [B, 10, 3, crop, crop]: the five windows, then their mirrors."""
    batch, size = images.shape[0], images.shape[1]
    no_offsets = torch.zeros((batch, 3), device=images.device)
    views = []
    for flip in (False, True):
        for x0, y0, side, _ in ten_crop_windows(spec, size, size):
            def full(value, dtype):
                return torch.full((batch,), value, dtype=dtype, device=images.device)

            views.append(augment_whole(images, full(x0, torch.int64), full(y0, torch.int64), full(flip, torch.bool),
                                       no_offsets, spec, colour, side))
    return torch.stack(views, dim=1)


def finish_ten(views: torch.Tensor, spec: AugmentSpec, colour: DeviceColour,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """Ten views cut by the workers, uint8 [B, 10, c, c, 3] -> [B, 10, 3, c, c] (or NHWC)."""
    batch = views.shape[0]
    flat = views.reshape(batch * 10, *views.shape[2:])
    if out is not None:
        out = out.view(batch * 10, *out.shape[2:])
    values = finish(flat, torch.zeros((batch * 10, 3), device=views.device), spec, colour, out=out)
    return values.reshape(batch, 10, *values.shape[1:])
