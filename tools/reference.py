"""The resize stage's independent reference, shared by the tests and ``tools/bench_shard.py``:
Pillow's full decode and antialiased Lanczos resize on the paper's geometry, and PSNR.

It uses nothing of ``prep.decode`` on purpose: a change there cannot move both sides of a
comparison. For a W x H source (W >= H) and output side S, as in ``prep.decode``::

    resized width   W' = round(W * S / H),  height S
    window left     (W' - S) // 2            (top 0; the same with the axes swapped)
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def crop_box(width: int, height: int, size: int = 256) -> tuple[tuple[int, int], tuple[int, int, int, int]]:
    """(resized size, crop box) for a shorter side of ``size`` and the central size x size window."""
    if width >= height:
        resized = (round(width * size / height), size)
    else:
        resized = (size, round(height * size / width))
    left, top = (resized[0] - size) // 2, (resized[1] - size) // 2
    return resized, (left, top, left + size, top + size)


def lanczos_reference(data: bytes, size: int = 256, policy: str = "crop") -> np.ndarray:
    """RGB uint8 (size, size, 3): Pillow full decode, antialiased Lanczos resize, then the
    central window (policy "crop") or both sides to ``size`` (policy "squash")."""
    image = Image.open(io.BytesIO(data)).convert("RGB")
    if policy == "squash":
        return np.asarray(image.resize((size, size), Image.LANCZOS))
    resized, box = crop_box(*image.size, size)
    return np.asarray(image.resize(resized, Image.LANCZOS).crop(box))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB of two uint8 images: 10 log10(255^2 / MSE). The error is
    floored at 1e-12, so equal images give 168 dB rather than infinity and means stay finite."""
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / max(mse, 1e-12)))
