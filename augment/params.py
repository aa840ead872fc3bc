"""The one source of randomness: per-sample crop offset, mirror and lighting alpha.

Each parameter is a pure function of (seed, epoch, sample index), so the DALI and torch
backends draw the same values, a resumed run redraws exactly what it would have drawn, and
the draw of a sample does not depend on rank, world size, batch size or worker.

    key       = SplitMix64(seed) xor SplitMix64(epoch + 2^32) xor SplitMix64(index + 2^33)
                xor SplitMix64(domain + 2^34)     domain 0: augmentation, 1: epoch order
    u_k       = top 53 bits of SplitMix64(key + k * 0x9E3779B97F4A7C15) / 2^53      in [0, 1)
    x, y      = floor(u_0 * (S - crop + 1)), floor(u_1 * (S - crop + 1))            window corner
    mirror    = u_2 < flip
    alpha_c   = lighting * sqrt(-2 ln(1 - u)) cos(2 pi v)   (Box-Muller; (u, v) = (u_3, u_4),
                (u_5, u_6), (u_7, u_8) for c = 0, 1, 2)                              ~ N(0, lighting^2)

With crop_mode "random-resized" the window is w x h instead of crop x crop, drawn as
torchvision's RandomResizedCrop draws it on an S x S image: for tries t = 0..9, area
a = S^2 (0.08 + 0.92 u_(9+2t)), aspect r = exp(ln 3/4 + ln(16/9) u_(10+2t)),
w = round(sqrt(a r)), h = round(sqrt(a / r)); the first try that fits wins, else the whole
image; then x = floor(u_0 (S - w + 1)), y = floor(u_1 (S - h + 1)).

SplitMix64 (Steele, Lea and Flood) is a bijective 64-bit mixer; computed with numpy's
wrapping uint64 arithmetic it gives the same bits on every platform and version.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from augment.spec import AugmentSpec

GOLDEN = np.uint64(0x9E3779B97F4A7C15)
MIX_1 = np.uint64(0xBF58476D1CE4E5B9)
MIX_2 = np.uint64(0x94D049BB133111EB)


def splitmix64(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, dtype=np.uint64) + GOLDEN
    z = (z ^ (z >> np.uint64(30))) * MIX_1
    z = (z ^ (z >> np.uint64(27))) * MIX_2
    return z ^ (z >> np.uint64(31))


AUGMENT, ORDER = 0, 1  # domains: the draws that order an epoch must not be the ones that crop


def uniforms(seed: int, epoch: int, indices: np.ndarray, count: int, domain: int = AUGMENT) -> np.ndarray:
    """[len(indices), count] uniforms in [0, 1), each a pure function of (seed, epoch, index,
    domain, k). Different domains give independent draws for the same sample."""
    indices = np.asarray(indices, dtype=np.uint64).reshape(-1, 1)
    key = (splitmix64(np.array([seed % 2**64], np.uint64)) ^ splitmix64(np.array([epoch + 2**32], np.uint64))
           ^ splitmix64(indices + np.uint64(2**33)) ^ splitmix64(np.array([domain + 2**34], np.uint64)))
    streams = np.arange(count, dtype=np.uint64) * GOLDEN
    with np.errstate(over="ignore"):
        bits = splitmix64(key + streams)
    return (bits >> np.uint64(11)).astype(np.float64) * 2.0**-53


@dataclass(frozen=True)
class SampleParams:
    """Per-sample parameters of a batch: window corners, mirror flags, lighting alphas."""

    x: np.ndarray  # int64 [B], left column of the crop window
    y: np.ndarray  # int64 [B], top row of the crop window
    mirror: np.ndarray  # bool [B]
    alpha: np.ndarray  # float64 [B, 3], lighting coefficients (zeros without lighting)
    width: np.ndarray | None = None  # int64 [B], window size for crop_mode "random-resized"
    height: np.ndarray | None = None  # (None: the window is crop x crop)


def sample_params(spec: AugmentSpec, size: int, seed: int, epoch: int, indices) -> SampleParams:
    """Parameters for the samples ``indices`` (global indices in the split) of ``epoch``."""
    indices = np.asarray(indices, dtype=np.int64).reshape(-1)
    n = len(indices)
    if not spec.random:
        centre = (size - spec.crop) // 2
        return SampleParams(np.full(n, centre), np.full(n, centre), np.zeros(n, bool), np.zeros((n, 3)))
    resized = spec.crop_mode == "random-resized"
    u = uniforms(seed, epoch, indices, 29 if resized else 9)
    width = height = np.full(n, spec.crop)
    if resized:
        width, height = random_resized_size(u[:, 9:29], size)
    x = np.minimum((u[:, 0] * (size - width + 1)).astype(np.int64), size - width)
    y = np.minimum((u[:, 1] * (size - height + 1)).astype(np.int64), size - height)
    mirror = u[:, 2] < spec.flip
    radius = np.sqrt(-2.0 * np.log1p(-u[:, 3:9:2]))
    alpha = spec.lighting * radius * np.cos(2.0 * np.pi * u[:, 4:9:2])
    return SampleParams(x, y, mirror, alpha, *((width, height) if resized else (None, None)))


def random_resized_size(u: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(width, height) of RandomResizedCrop windows from 20 uniforms a sample (ten tries)."""
    area = size * size * (0.08 + 0.92 * u[:, 0::2])  # [B, 10]
    ratio = np.exp(np.log(3 / 4) + np.log(16 / 9) * u[:, 1::2])
    width = np.rint(np.sqrt(area * ratio)).astype(np.int64)
    height = np.rint(np.sqrt(area / ratio)).astype(np.int64)
    fits = (width <= size) & (height <= size) & (width > 0) & (height > 0)
    first = np.argmax(fits, axis=1)
    rows = np.arange(len(u))
    found = fits[rows, first]
    return np.where(found, width[rows, first], size), np.where(found, height[rows, first], size)
