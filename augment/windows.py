"""Windows cut and resized in uint8, where the images are read (loader workers, the preview).

For sample b with window (x_b, y_b, w_b, h_b) in its stored H x W image and output side r:

    window_b = image_b[y_b : y_b + h_b, x_b : x_b + w_b]             a view, no copy
    out_b    = window_b                                              when w_b = h_b = r
             = resize(window_b, r x r)                               otherwise

``resize`` is antialiased bilinear interpolation (PIL's triangle filter widened by the
reduction factor, torchvision's ``antialias=True``), in uint8 with pixel centres aligned: torch's
vectorised uint8 kernel where the window shrinks along either axis, OpenCV's bilinear where it
only grows (there the two filters are the same, and OpenCV's is three times faster). The mirror,
the lighting and the normalisation come later, on the device, in float (``augment.torch_ops``).

Evaluation windows at a val_resize may start and end between pixels (torchvision's Resize then
CenterCrop, as one window): Pillow's antialiased bilinear resamples those, placing the box to the
fraction of a pixel.

JPEG shards are decoded here first, after the blob's header was checked against the stored size:
only each window's region where the window is whole pixels (``window_sources``), the whole
image otherwise (libjpeg-turbo either way).
"""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np

from augment.params import SampleParams, ten_crop_windows
from augment.spec import AugmentSpec


def quiet_threads(parent_pid: int) -> None:
    """One thread each for torch and OpenCV in a loader worker: the workers are the parallelism,
    and a thread pool per worker would only fight them for the cores. Not in the loader's own
    process (a loader without workers): its threads are the model's."""
    import os

    if os.getpid() == parent_pid:
        return
    import cv2
    import torch

    torch.set_num_threads(1)
    cv2.setNumThreads(1)


def resize_into(window: np.ndarray, out: np.ndarray) -> None:
    """``window`` (h, w, 3) uint8 resized into ``out`` (r, r, 3) uint8 (see the module docstring)."""
    height, width = window.shape[:2]
    side = out.shape[0]
    if height == side and width == side:
        out[...] = window
    elif height <= side and width <= side:
        import cv2

        cv2.resize(window, (side, side), dst=out, interpolation=cv2.INTER_LINEAR)
    else:
        shrink_into(window, out)


def shrink_into(window: np.ndarray, out: np.ndarray) -> None:
    """torch's antialiased bilinear uint8 kernel from ``window`` straight into ``out``
    (``prep.decode.resize_interleaved_into``: no planar copy to interleave back)."""
    from prep.decode import resize_interleaved_into

    with warnings.catch_warnings():  # a read-only view of the shard's memory map: only read here
        warnings.simplefilter("ignore", UserWarning)
        resize_interleaved_into(np.ascontiguousarray(window), out, "bilinear")


def resize_box_into(image: np.ndarray, box: tuple, out: np.ndarray) -> None:
    """The window ``box`` = (x, y, w, h) of ``image``, whole or fractional pixels, resized into
    ``out``. Fractional boxes (evaluation at val_resize, torchvision's geometry) are resampled by
    Pillow's antialiased bilinear filter, which places a box to the fraction of a pixel."""
    x, y, w, h = box
    if all(float(v).is_integer() for v in box):
        x, y, w, h = int(x), int(y), int(w), int(h)
        resize_into(image[y : y + h, x : x + w], out)
        return
    from PIL import Image

    picture = Image.fromarray(np.ascontiguousarray(image))
    out[...] = np.asarray(picture.resize(out.shape[1::-1], Image.BILINEAR, box=(x, y, x + w, y + h)))


def cut_windows(images: list[np.ndarray], params: SampleParams, side: int, out: np.ndarray) -> np.ndarray:
    """The window of each decoded image (h, w, 3) resized into ``out`` [B, side, side, 3]."""
    for b, image in enumerate(images):
        resize_box_into(image, (params.x[b], params.y[b], params.width[b], params.height[b]), out[b])
    return out


def cut_ten(images: list[np.ndarray], spec: AugmentSpec, out: np.ndarray) -> np.ndarray:
    """The paper's ten views of each image into ``out`` [B, 10, crop, crop, 3]: the five
    windows (``params.ten_crop_windows``), then their mirror images."""
    for b, image in enumerate(images):
        for k, box in enumerate(ten_crop_windows(spec, *image.shape[:2])):
            resize_box_into(image, box, out[b, k])
            out[b, 5 + k] = out[b, k, :, ::-1]
    return out


def decoded(reader, indices, stored: list[np.ndarray]) -> list[np.ndarray]:
    """The images ``stored_many`` gave for ``indices``, decoded where the shards hold JPEGs."""
    return [reader.decode_stored(int(i), image) for i, image in zip(indices, stored)]


def window_sources(reader, indices, stored: list[np.ndarray], params: SampleParams) -> tuple[list, SampleParams]:
    """What ``cut_windows`` needs of the images ``stored_many`` gave for ``indices``, and the
    windows' places in it. A window of whole pixels comes alone, placed at (0, 0): a view of a raw
    image, or from a JPEG only that region decoded (``SplitReader.windows_stored``). A window
    between pixels (evaluation at val_resize) needs its neighbours: its image comes whole. The
    pixels cut are the same either way."""
    boxes = np.stack([params.x, params.y, params.width, params.height], axis=1)
    whole = (boxes == np.round(boxes)).all(axis=1)
    if not whole.any():
        return decoded(reader, indices, stored), params
    windows = iter(reader.windows_stored(np.asarray(indices)[whole], [s for s, w in zip(stored, whole) if w],
                                         boxes[whole].astype(np.int64).tolist()))
    sources = [next(windows) if w else reader.decode_stored(int(i), s) for i, s, w in zip(indices, stored, whole)]
    return sources, dataclasses.replace(params, x=np.where(whole, 0, params.x), y=np.where(whole, 0, params.y))
