"""The one source of randomness: each sample's window, mirror and lighting alpha.

Each parameter is a pure function of (seed, epoch, sample index) and of the stored image's size,
so the DALI and torch backends draw the same values, a resumed run redraws exactly what it would
have drawn, and the draw of a sample does not depend on rank, world size, batch size, worker or
output resolution (a resolution ramp resizes the same windows).

    key       = SplitMix64(seed) xor SplitMix64(epoch + 2^32) xor SplitMix64(index + 2^33)
                xor SplitMix64(domain + 2^34)     domain 0: augmentation, 1: epoch order
    u_k       = top 53 bits of SplitMix64(key + k * 0x9E3779B97F4A7C15) / 2^53      in [0, 1)

The uniforms of a sample, by slot (``SLOT_*`` below), for a stored image of H x W pixels:

    window    "paper" crop (train): side c (the epoch's resolution), corner
                  x = floor(u_X (W - c + 1)),  y = floor(u_Y (H - c + 1))
              "random-resized" (train), torchvision's RandomResizedCrop on the whole H x W image:
                  for tries t = 0..9: area a = H W (0.08 + 0.92 u_TRIES[2t]),
                  aspect r = exp(ln 3/4 + ln(16/9) u_TRIES[2t+1]), w = round(sqrt(a r)),
                  h = round(sqrt(a / r)); the first try with 0 < w <= W and 0 < h <= H wins,
                  at x = floor(u_X (W - w + 1)), y = floor(u_Y (H - h + 1)); if none fits, the
                  centred window of the image clamped to aspect 3/4-4/3
              evaluation: the central crop x crop (no resize); with val_resize, torchvision's
                  Resize(val_resize) then CenterCrop(crop) as one window of the stored image: the
                  resized image is H' x W' (shorter side val_resize, longer floor(val_resize L / S)),
                  its crop starts at (round((W' - crop) / 2), round((H' - crop) / 2)), and the window
                  is that box scaled back by (W / W', H / H'): fractional, resized in one step
    mirror    u_MIRROR < flip
    alpha_c   lighting * sqrt(-2 ln(1 - u)) cos(2 pi v)   (Box-Muller; (u, v) the pairs of
              SLOT_ALPHA, one per channel)                                   ~ N(0, lighting^2)

round() is round-half-to-even, as Python's (and so torchvision's). SplitMix64 (Steele, Lea and
Flood) is a bijective 64-bit mixer; computed with numpy's wrapping uint64 arithmetic it gives the
same bits on every platform and version.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from augment.spec import AugmentSpec

GOLDEN = np.uint64(0x9E3779B97F4A7C15)
MIX_1 = np.uint64(0xBF58476D1CE4E5B9)
MIX_2 = np.uint64(0x94D049BB133111EB)

# The uniforms each sample draws, by purpose: a slot keeps its meaning whatever the recipe, so
# adding a draw never moves another one.
SLOT_X, SLOT_Y, SLOT_MIRROR = 0, 1, 2
SLOT_ALPHA = slice(3, 9)  # (u, v) Box-Muller pairs for the three channels: 3, 4 | 5, 6 | 7, 8
SLOT_TRIES = slice(9, 29)  # RandomResizedCrop: (area, aspect) of ten tries
SLOTS = {"paper": 9, "random-resized": 29}  # uniforms a sample draws, by crop mode

TRIES = 10
MIN_AREA = 0.08
ASPECTS = (3 / 4, 4 / 3)


def splitmix64(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, dtype=np.uint64) + GOLDEN
    z = (z ^ (z >> np.uint64(30))) * MIX_1
    z = (z ^ (z >> np.uint64(27))) * MIX_2
    return z ^ (z >> np.uint64(31))


AUGMENT, ORDER, SHARD_ORDER = 0, 1, 2  # domains: the draws that order an epoch must not be the ones that crop


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
    """Per-sample parameters of a batch: the window in the stored image, mirror, lighting."""

    x: np.ndarray  # int64 [B], left column of the window (float64 for evaluation with val_resize)
    y: np.ndarray  # int64 [B], top row of the window (ditto)
    mirror: np.ndarray  # bool [B]
    alpha: np.ndarray  # float64 [B, 3], lighting coefficients (zeros without lighting)
    width: np.ndarray  # int64 [B], window width in stored pixels (ditto)
    height: np.ndarray  # int64 [B], window height (ditto)


def as_shapes(shapes, n: int) -> np.ndarray:
    """(height, width) int64 [n, 2] of the stored images: ``shapes`` as given, or all S x S for
    an int S (a square split)."""
    if np.isscalar(shapes):
        return np.full((n, 2), int(shapes), dtype=np.int64)
    return np.asarray(shapes, dtype=np.int64).reshape(n, 2)


def sample_params(spec: AugmentSpec, shapes, seed: int, epoch: int, indices, res: int | None = None) -> SampleParams:
    """Parameters of the samples ``indices`` (global indices in the split) of ``epoch``, whose
    stored images are ``shapes`` ((h, w) each, or one int S for a square split). ``res``: the
    training resolution of the epoch (default spec.crop)."""
    indices = np.asarray(indices, dtype=np.int64).reshape(-1)
    n = len(indices)
    height, width = as_shapes(shapes, n).T
    if not spec.random:
        x, y, w, h = eval_window(spec, height, width)
        return SampleParams(x, y, np.zeros(n, bool), np.zeros((n, 3)), w, h)
    u = uniforms(seed, epoch, indices, SLOTS[spec.crop_mode])
    if spec.crop_mode == "random-resized":
        win_w, win_h, fitted = random_resized_size(u[:, SLOT_TRIES], height, width)
    else:
        side = res or spec.crop
        win_w, win_h, fitted = np.full(n, side), np.full(n, side), np.ones(n, bool)
    x = np.where(fitted, np.minimum((u[:, SLOT_X] * (width - win_w + 1)).astype(np.int64), width - win_w),
                 (width - win_w) // 2)
    y = np.where(fitted, np.minimum((u[:, SLOT_Y] * (height - win_h + 1)).astype(np.int64), height - win_h),
                 (height - win_h) // 2)
    mirror = u[:, SLOT_MIRROR] < spec.flip
    pairs = u[:, SLOT_ALPHA]
    radius = np.sqrt(-2.0 * np.log1p(-pairs[:, 0::2]))
    alpha = spec.lighting * radius * np.cos(2.0 * np.pi * pairs[:, 1::2])
    return SampleParams(x, y, mirror, alpha, win_w.astype(np.int64), win_h.astype(np.int64))


def resized_shape(spec: AugmentSpec, height, width):
    """(H', W'): the image resized to a shorter side of val_resize, as torchvision's Resize."""
    height, width = np.asarray(height, np.int64), np.asarray(width, np.int64)
    short, long = np.minimum(height, width), np.maximum(height, width)
    new_long = (spec.val_resize * long) // short
    tall = width <= height
    return np.where(tall, new_long, spec.val_resize), np.where(tall, spec.val_resize, new_long)


def eval_window(spec: AugmentSpec, height, width, corner: str = "centre"):
    """(x, y, w, h) of the evaluation window of H x W images (see the module docstring); with
    ``corner`` one of the paper's ten-crop corners ("tl", "tr", "bl", "br") instead of the centre."""
    crop = spec.crop
    if spec.val_resize is None:
        new_h, new_w = np.asarray(height, np.int64), np.asarray(width, np.int64)
    else:
        new_h, new_w = resized_shape(spec, height, width)
    if corner == "centre":
        left, top = np.rint((new_w - crop) / 2), np.rint((new_h - crop) / 2)
        if spec.val_resize is None:  # the integer centre of today's shards: (S - crop) // 2
            left, top = (new_w - crop) // 2, (new_h - crop) // 2
    else:
        left = np.zeros_like(new_w) if corner[1] == "l" else new_w - crop
        top = np.zeros_like(new_h) if corner[0] == "t" else new_h - crop
    if spec.val_resize is None:
        side = np.full(np.shape(new_w), crop, dtype=np.int64)
        return left.astype(np.int64), top.astype(np.int64), side, side.copy()
    scale_x, scale_y = np.asarray(width) / new_w, np.asarray(height) / new_h
    return left * scale_x, top * scale_y, crop * scale_x, crop * scale_y


def random_resized_size(u: np.ndarray, height: np.ndarray, width: np.ndarray):
    """(width, height, fitted) of RandomResizedCrop windows from 20 uniforms a sample (ten
    tries) on images of ``height`` x ``width``; ``fitted`` is false where no try fitted and the
    window is the centred fallback."""
    height, width = height[:, None], width[:, None]
    area = height * width * (MIN_AREA + (1 - MIN_AREA) * u[:, 0::2])  # [B, 10]
    ratio = np.exp(np.log(ASPECTS[0]) + np.log(ASPECTS[1] / ASPECTS[0]) * u[:, 1::2])
    w = np.rint(np.sqrt(area * ratio)).astype(np.int64)
    h = np.rint(np.sqrt(area / ratio)).astype(np.int64)
    fits = (w <= width) & (h <= height) & (w > 0) & (h > 0)
    first = np.argmax(fits, axis=1)
    rows = np.arange(len(u))
    fitted = fits[rows, first]
    height, width = height[:, 0], width[:, 0]
    # The fallback: the whole image, clamped to the aspect range (torchvision's rule).
    in_ratio = width / height
    fall_w = np.where(in_ratio > ASPECTS[1], np.rint(height * ASPECTS[1]), width).astype(np.int64)
    fall_h = np.where(in_ratio < ASPECTS[0], np.rint(width / ASPECTS[0]), height).astype(np.int64)
    return (np.where(fitted, w[rows, first], fall_w), np.where(fitted, h[rows, first], fall_h), fitted)


TEN_CORNERS = ("tl", "tr", "bl", "br", "centre")  # the paper's five windows; the other five mirror them


def ten_crop_windows(spec: AugmentSpec, height: int, width: int) -> list[tuple]:
    """(x, y, w, h) of the paper's five windows of an H x W image: top-left, top-right,
    bottom-left, bottom-right, centre (their mirrors are the other five views); with val_resize,
    of the image resized as for validation."""
    return [tuple(np.asarray(v).item() for v in eval_window(spec, height, width, corner)) for corner in TEN_CORNERS]
