"""The augmentation maths as plain batched torch functions: the reference the DALI graph is
tested against, and the backend for machines without DALI.

Images arrive as uint8 [B, S, S, 3] RGB on the device. For sample b with window corner
(x_b, y_b), mirror flag m_b and lighting offset o_b (a 3-vector, 0-255 scale):

    crop       w_b[i, j]   = image_b[y_b + i, x_b + j]                 0 <= i, j < crop
               (random-resized: the w_b x h_b window there, resized to crop x crop with
               antialiased bilinear interpolation, PIL's triangle filter)
    mirror     w_b[i, j]   = w_b[i, crop - 1 - j]                      when m_b
               (crop and mirror are one gather: column x_b + crop - 1 - j)
    lighting   v_b[i, j]   = w_b[i, j] + o_b                           no clamping
    normalise  "channel":    (v_b - mean) / std    per channel, 0-255 mean and std (stats.json;
               "torchvision": the same with torchvision's ImageNet mean and std)
               "mean-image": v_b - M_b, M_b the mean image cut by the same window and mirror
               "none":       v_b
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from augment.colour import ColourStats, lighting_offsets
from augment.params import SampleParams
from augment.spec import AugmentSpec

DTYPES = {"float32": torch.float32, "float16": torch.float16}


def cut_windows(images: torch.Tensor, x, y, flags, size: int) -> torch.Tensor:
    """[B, H, W, C] -> [B, size, size, C]: the window with top-left corner (x_b, y_b) of each
    image, mirrored where ``flags`` [B] is true. On a GPU one gather kernel; on the CPU a copy of
    each window's rows (a gather there costs several times more)."""
    if images.device.type == "cpu":
        out = torch.empty((images.shape[0], size, size, images.shape[3]), dtype=images.dtype)
        for b, (left, top, flip) in enumerate(zip(_ints(x), _ints(y), _ints(flags))):
            window = images[b, top : top + size, left : left + size]
            out[b] = window.flip(1) if flip else window
        return out
    x, y, flags = (torch.as_tensor(np.asarray(v), device=images.device) for v in (x, y, flags))
    steps = torch.arange(size, device=images.device)
    rows = (y[:, None] + steps)[:, :, None]  # [B, size, 1]
    cols = torch.where(flags[:, None], x[:, None] + size - 1 - steps, x[:, None] + steps)[:, None, :]  # [B, 1, size]
    batch = torch.arange(images.shape[0], device=images.device)[:, None, None]
    return images[batch, rows, cols]


def _ints(values) -> list[int]:
    return np.asarray(values.cpu() if isinstance(values, torch.Tensor) else values).astype(np.int64).tolist()


def resized_crop(images: torch.Tensor, params: SampleParams, size: int) -> torch.Tensor:
    """[B, H, W, C] -> float32 [B, size, size, C]: window b (x, y, width, height) resized to size,
    then mirrored where params.mirror is true."""
    windows = []
    for b in range(images.shape[0]):
        x, y, w, h = (int(v[b]) for v in (params.x, params.y, params.width, params.height))
        window = images[b, y : y + h, x : x + w].permute(2, 0, 1)[None].float()  # (1, C, h, w)
        window = F.interpolate(window, size=(size, size), mode="bilinear", antialias=True)[0].permute(1, 2, 0)
        windows.append(window.flip(1) if params.mirror[b] else window)
    return torch.stack(windows)


def augment_batch(images: torch.Tensor, params: SampleParams, spec: AugmentSpec, colour: ColourStats,
                  mean_image: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 [B, S, S, 3] (on any device) -> [B, 3, crop, crop] (NCHW) or [B, crop, crop, 3]
    in spec.dtype; train or val mode. ``mean_image``: colour.mean_image already on the device,
    if the caller keeps one there (mean-image normalisation)."""
    if spec.crop_mode == "random-resized" and spec.random:
        windows = resized_crop(images, params, spec.crop)
    else:
        windows = cut_windows(images, params.x, params.y, params.mirror, spec.crop)
    nchw = spec.layout == "NCHW"
    # Permute while still uint8 (a quarter of the bytes), convert once, then scale and shift in place.
    values = (windows.permute(0, 3, 1, 2) if nchw else windows).to(torch.float32, memory_format=torch.contiguous_format)
    channel = (slice(None), slice(None), None, None) if nchw else (slice(None), None, None, slice(None))
    offsets = torch.as_tensor(lighting_offsets(params.alpha, colour), dtype=torch.float32, device=images.device)
    if spec.per_channel:  # (v + o - mean) / std
        mean, std = (torch.as_tensor(v, dtype=torch.float32, device=images.device) for v in (colour.mean, colour.std))
        values.sub_((mean - offsets)[channel]).div_(std[(None, *channel[1:])])
    elif spec.normalize == "mean-image":  # v + o - M, M cut by the same window and mirror
        if mean_image is None:
            mean_image = torch.as_tensor(colour.mean_image, device=images.device)
        mean_windows = cut_windows(mean_image.expand(len(windows), -1, -1, -1), params.x, params.y, params.mirror,
                                   spec.crop)
        values.sub_(mean_windows.permute(0, 3, 1, 2) if nchw else mean_windows).add_(offsets[channel])
    else:  # v + o
        values.add_(offsets[channel])
    return values.to(DTYPES[spec.dtype])


def ten_crop_corners(size: int, crop_size: int) -> list[tuple[int, int]]:
    """(x, y) of the paper's five windows: top-left, top-right, bottom-left, bottom-right, centre."""
    far, centre = size - crop_size, (size - crop_size) // 2
    return [(0, 0), (far, 0), (0, far), (far, far), (centre, centre)]


def ten_crop_batch(images: torch.Tensor, spec: AugmentSpec, colour: ColourStats,
                   mean_image: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 [B, S, S, 3] -> [B, 10, 3, crop, crop]: the five windows, then their mirrors."""
    batch, size = images.shape[0], images.shape[1]
    views = []
    for flip in (False, True):
        for x0, y0 in ten_crop_corners(size, spec.crop):
            params = SampleParams(np.full(batch, x0), np.full(batch, y0), np.full(batch, flip), np.zeros((batch, 3)))
            views.append(augment_batch(images, params, spec, colour, mean_image))
    return torch.stack(views, dim=1)
