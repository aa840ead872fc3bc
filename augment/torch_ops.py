"""The augmentation maths as plain batched torch functions: the reference the DALI graph is
tested against, and the backend for machines without DALI.

Images arrive as uint8 [B, S, S, 3] RGB on the device. For sample b with window corner
(x_b, y_b), mirror flag m_b and lighting offset o_b (a 3-vector, 0-255 scale):

    crop       w_b[i, j]   = image_b[y_b + i, x_b + j]                 0 <= i, j < crop
               (random-resized: the w_b x h_b window there, resized to crop x crop with
               antialiased bilinear interpolation, PIL's triangle filter)
    mirror     w_b[i, j]   = w_b[i, crop - 1 - j]                      when m_b
    lighting   v_b[i, j]   = w_b[i, j] + o_b                           no clamping
    normalise  "channel":    (v_b - mean) / std    per channel, 0-255 mean and std
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


def crop(images: torch.Tensor, x: torch.Tensor, y: torch.Tensor, size: int) -> torch.Tensor:
    """[B, H, W, C] -> [B, size, size, C]: the window with top-left corner (x_b, y_b) of each."""
    steps = torch.arange(size, device=images.device)
    rows = (y[:, None] + steps)[:, :, None]  # [B, size, 1]
    cols = (x[:, None] + steps)[:, None, :]  # [B, 1, size]
    batch = torch.arange(images.shape[0], device=images.device)[:, None, None]
    return images[batch, rows, cols]


def resized_crop(images: torch.Tensor, params: SampleParams, size: int) -> torch.Tensor:
    """[B, H, W, C] -> float32 [B, size, size, C]: window b (x, y, width, height) resized to size."""
    windows = []
    for b in range(images.shape[0]):
        x, y, w, h = (int(v[b]) for v in (params.x, params.y, params.width, params.height))
        window = images[b, y : y + h, x : x + w].permute(2, 0, 1)[None].float()  # (1, C, h, w)
        windows.append(F.interpolate(window, size=(size, size), mode="bilinear", antialias=True)[0].permute(1, 2, 0))
    return torch.stack(windows)


def mirror(images: torch.Tensor, flags: torch.Tensor) -> torch.Tensor:
    """Mirror [B, H, W, C] images left-right where ``flags`` [B] is true."""
    return torch.where(flags[:, None, None, None], images.flip(2), images)


def normalize(windows: torch.Tensor, offsets: torch.Tensor, spec: AugmentSpec, colour: ColourStats,
              mean_windows: torch.Tensor | None) -> torch.Tensor:
    """float32 [B, h, w, 3] + per-sample offsets [B, 3], then the spec's normalisation."""
    values = windows.float() + offsets[:, None, None, :]
    if spec.normalize == "channel":
        mean = torch.as_tensor(colour.mean, dtype=torch.float32, device=windows.device)
        std = torch.as_tensor(colour.std, dtype=torch.float32, device=windows.device)
        return (values - mean) / std
    if spec.normalize == "mean-image":
        return values - mean_windows
    return values


def to_layout(images: torch.Tensor, spec: AugmentSpec) -> torch.Tensor:
    """[..., h, w, 3] -> the spec's layout and dtype (contiguous)."""
    if spec.layout == "NCHW":
        images = images.movedim(-1, -3)
    return images.to(DTYPES[spec.dtype]).contiguous()


def augment_batch(images: torch.Tensor, params: SampleParams, spec: AugmentSpec, colour: ColourStats) -> torch.Tensor:
    """uint8 [B, S, S, 3] -> [B, 3, crop, crop] (NCHW) or [B, crop, crop, 3]; train or val mode."""
    x, y, flags = (torch.as_tensor(p, device=images.device) for p in (params.x, params.y, params.mirror))
    if spec.crop_mode == "random-resized" and spec.random:
        windows = resized_crop(images, params, spec.crop)
    else:
        windows = crop(images, x, y, spec.crop)
    return finish_windows(mirror(windows, flags), params, spec, colour)


def finish_windows(windows: torch.Tensor, params: SampleParams, spec: AugmentSpec, colour: ColourStats,
                   mean_image: torch.Tensor | None = None) -> torch.Tensor:
    """Lighting, normalisation, dtype and layout of uint8 windows [B, crop, crop, 3] already cut
    and mirrored by ``params`` (the torch backend cuts them in its reader processes).
    ``mean_image``: colour.mean_image already on the device, if the caller keeps one there."""
    device = windows.device
    offsets = torch.as_tensor(lighting_offsets(params.alpha, colour), dtype=torch.float32, device=device)
    mean_windows = None
    if spec.normalize == "mean-image":
        x, y, flags = (torch.as_tensor(p, device=device) for p in (params.x, params.y, params.mirror))
        if mean_image is None:
            mean_image = torch.as_tensor(colour.mean_image, device=device)
        mean_image = mean_image.expand(len(windows), -1, -1, -1)
        mean_windows = mirror(crop(mean_image, x, y, spec.crop), flags)
    return to_layout(normalize(windows, offsets, spec, colour, mean_windows), spec)


def ten_crop_corners(size: int, crop_size: int) -> list[tuple[int, int]]:
    """(x, y) of the paper's five windows: top-left, top-right, bottom-left, bottom-right, centre."""
    far, centre = size - crop_size, (size - crop_size) // 2
    return [(0, 0), (far, 0), (0, far), (far, far), (centre, centre)]


def ten_crop_batch(images: torch.Tensor, spec: AugmentSpec, colour: ColourStats) -> torch.Tensor:
    """uint8 [B, S, S, 3] -> [B, 10, 3, crop, crop]: the five windows, then their mirrors."""
    batch, size = images.shape[0], images.shape[1]
    views = []
    for flip in (False, True):
        for x0, y0 in ten_crop_corners(size, spec.crop):
            params = SampleParams(np.full(batch, x0), np.full(batch, y0), np.full(batch, flip), np.zeros((batch, 3)))
            views.append(augment_batch(images, params, spec, colour))
    return torch.stack(views, dim=1)
