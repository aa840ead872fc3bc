"""The CPU's last step of a batch, compiled: uint8 windows [B, r, r, 3] (HWC, already mirrored)
-> normalised float32 planes [B, 3, r, r], in one pass (kept apart: importing numba takes time).

    out[b, c, i, j] = (float32(window[b, i, j, c]) - shift[b, c]) / scale[c]
    out[b, c, i, j] = (float32(window[b, i, j, c]) - M[y_b + i, x_b + j', c]) + offset[b, c]
                      (mean-image; j' = r - 1 - j where window b was mirrored, else j)

with shift = mean - offset and scale = std for per-channel normalisation, shift = -offset and
scale = 1 for none: the same float32 operations, in the same order, as ``torch_ops.finish``'s
``sub_`` then ``div_``, so the values are identical to the last bit. torch does it as three passes
(a converting copy that also interleaves, then the two in-place ops), 130-175 us an image at 224
on one core of this VM; this loop reads each plane's bytes with a stride of 3 and writes the
plane in order, which LLVM vectorises: 45-75 us, close to the cost of writing 600 KB.

The mean-image pass reads the mean image M (float32, as planes [3, S, S]) where each window
lies, mirrored with it, in place of torch's cut of a mirrored float window (a copy of 600 KB an
image, 250 us) and its three passes (250 us): the same float32 ``sub_`` then ``add_``, to the
last bit, in 75-95 us.
"""

import numpy as np

from prep.compiled import compiled


@compiled
def normalise_planes(windows, shift, scale, out):  # pragma: no cover - compiled
    """windows uint8 [B, r, r, 3] C-contiguous; shift float32 [B, 3]; scale float32 [3];
    out float32 [B, 3, r, r] C-contiguous."""
    batch, height, width, _ = windows.shape
    pixels = height * width
    for b in range(batch):
        interleaved = windows[b].reshape(pixels * 3)
        for c in range(3):
            plane = out[b, c].reshape(pixels)
            offset, divisor = shift[b, c], scale[c]
            for p in range(pixels):  # the literal stride 3 is what lets LLVM vectorise this loop
                plane[p] = (np.float32(interleaved[3 * p + c]) - offset) / divisor


@compiled
def subtract_mean_planes(windows, mean_planes, top, left, mirror, offsets, out):  # pragma: no cover - compiled
    """windows uint8 [B, r, r, 3] C-contiguous, already mirrored; mean_planes float32 [3, S, S]
    C-contiguous (M's planes: each row read in order, or backwards for a mirrored window); top,
    left int64 [B]: each window's corner in M; mirror bool [B]; offsets float32 [B, 3]; out
    float32 [B, 3, r, r] C-contiguous."""
    batch, side = windows.shape[0], windows.shape[1]
    for b in range(batch):
        for c in range(3):
            offset = offsets[b, c]
            for i in range(side):
                pixels = windows[b, i].reshape(side * 3)
                means = mean_planes[c, top[b] + i]
                plane = out[b, c, i]
                if mirror[b]:
                    last = left[b] + side - 1
                    for j in range(side):
                        plane[j] = (np.float32(pixels[3 * j + c]) - means[last - j]) + offset
                else:
                    start = left[b]
                    for j in range(side):
                        plane[j] = (np.float32(pixels[3 * j + c]) - means[start + j]) + offset
