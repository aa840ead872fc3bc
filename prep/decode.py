"""Bytes of any source image -> RGB uint8 array of shape (S, S, 3), or (h, w, 3) with the aspect kept.

The geometry (policy "crop", the paper's): scale so the shorter side is S, then take the
central S x S window. For a W x H source with W >= H::

    resized width   W' = max(S, round(W * S / H)),  height S
    window left     (W' - S) // 2            (top 0; the same with the axes swapped)

Policy "squash" (Caffe's warp) resizes both sides to S and keeps no aspect ratio. Policy "keep"
scales the shorter side to S as "crop" does and keeps the whole width, up to a cap: the window is
min(W', L) x S with L = floor(max_aspect * S), centred the same way, so a 3000 x 300 panorama
becomes 512 x 256 at the default max_aspect 2 instead of one sample ten times the others.

Resampling is antialiased bicubic (the filter is widened by the reduction factor, as PIL does),
run by torch's vectorised uint8 kernel: about 4x faster than Pillow's own resize and within
~0.1 dB of it. A JPEG much larger than the target is first reduced in the DCT domain by a
power of two (libjpeg-turbo scaled IDCT), but never below twice the target's shorter side:
DCT reduction alone aliases on fine texture, the bicubic pass after it does not.

A source longer than 4:1 is first cut to its central 4:1 part (policy "crop"; "keep": beyond
max(8, 2 max_aspect):1, to that central part): the rest would be cropped away, and resizing it whole could need
gigabytes for a thin strip.

Colour: every source ends as RGB. Greyscale is repeated, palettes expanded, alpha dropped
(as ``PIL.Image.convert("RGB")`` and torchvision do), CMYK converted by Pillow, 16-bit samples
reduced to their high byte. EXIF orientation is ignored, as it was when ImageNet was labelled.
The file type is sniffed from its bytes, so a PNG named ``.JPEG`` decodes as a PNG.

Memory: a header is checked before any pixel is decoded. width x height must be within
--max-pixels, and the samples at their own depth within what an 8-bit RGB image at that cap
holds decoded (4 bytes a pixel), so a 16-bit RGB image (6 bytes) may have two thirds as many.
"""

from __future__ import annotations

import contextlib
import io
import math
import re

import numpy as np
import simplejpeg
import torch
from PIL import Image, UnidentifiedImageError

from prep import KEEP_ASPECT
from prep.errors import BadImage

JPEG_MAGIC = b"\xff\xd8\xff"
JPEG_END = b"\xff\xd9"
# libjpeg warnings that leave every pixel decoded (stray bytes between segments, a quirky SOS
# header some cameras write); any other warning means missing or damaged image data.
BENIGN_JPEG_WARNINGS = ("extraneous bytes before marker", "Invalid SOS parameters")
# Raster formats only: no EPS/PDF (Pillow would call Ghostscript on them) or other exotica.
PILLOW_FORMATS = ("JPEG", "PNG", "GIF", "BMP", "TIFF", "WEBP", "PPM")  # JPEG covers MPO
MAX_ASPECT = 4  # policy "crop": a longer source is first cut to its central 4:1 part
KEEP_CUT = 8  # policy "keep": the same beyond 8:1 (or 2 max_aspect), where only a strip survives
# Decoded bytes a pixel of an 8-bit RGB image takes as decoders hold it: RGBX (simplejpeg) or
# Pillow's 32-bit pixels. No image may decode to more than --max-pixels of those.
HELD_BYTES_PER_PIXEL = 4
# A raw mode naming 16- or 32-bit samples, with their byte order: "RGB;16B", "I;16L", "F;32F".
# (Packed 5-6-5 pixels, "BGR;16", have no order letter and 8 bits or fewer a sample.)
WIDE_SAMPLES = re.compile(r";(16|32)[BLNSF]")
GREY_BAND_PIXELS = 1 << 16  # wide greyscale is reduced to 8 bits this many pixels at a time


def decode_resize(data: bytes, size: int, policy: str, max_pixels: int, max_aspect: float = 2.0) -> np.ndarray:
    """Decode ``data`` and return it resized per ``policy`` as uint8 RGB: (size, size, 3), or
    (h, w, 3) with the shorter side ``size`` for "keep"; BadImage if unusable."""
    if not data:
        raise BadImage("empty file")
    decoded = decode_jpeg(data, size, max_pixels) if data.startswith(JPEG_MAGIC) else None
    if decoded is None:  # not a JPEG, or one libjpeg-turbo cannot colour-convert (CMYK)
        pixels = decode_with_pil(data, max_pixels)
        return resize_image(pixels, size, policy, max_aspect)
    pixels, source_wh = decoded
    return resize_image(pixels, size, policy, max_aspect, source_wh)


def decode_jpeg(data: bytes, size: int, max_pixels: int):
    """(RGBX pixels, (width, height) before reduction) of a JPEG, or None to use Pillow.

    The image is DCT-reduced by 2, 4 or 8 while its shorter side stays >= 2 * size.
    """
    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:
        return None  # let Pillow try (and name the problem if it fails too)
    check_pixel_count(width, height, max_pixels)
    if colorspace in ("CMYK", "YCCK"):
        # libjpeg-turbo checks the data as strictly as any JPEG; Pillow, which knows Adobe's
        # inverted CMYK, converts the colours.
        strict_jpeg(lambda payload, strict: simplejpeg.decode_jpeg(payload, "CMYK", strict=strict), data)
        return None
    reduction = 1
    while reduction < 8 and min(width, height) >= 2 * size * reduction * 2:
        reduction *= 2
    # simplejpeg picks the smallest scale k/8 meeting both minimums: exactly 1/reduction here.
    min_h, min_w = math.ceil(height / reduction), math.ceil(width / reduction)

    def decode(payload: bytes, strict: bool) -> np.ndarray:
        return simplejpeg.decode_jpeg(payload, "RGBX", min_height=min_h, min_width=min_w, strict=strict)

    return strict_jpeg(decode, data), (width, height)


def strict_jpeg(decode, data: bytes) -> np.ndarray:
    """``decode(data, strict)`` under our rule: reject any libjpeg warning but a benign one, and
    repair only a missing end-of-image marker."""
    try:
        return decode(data, True)
    except ValueError as error:
        message = str(error)
    if "Premature end" in message:
        try:  # complete image data with only the end-of-image marker missing is repairable
            return decode(data + JPEG_END, True)
        except ValueError:
            raise BadImage("truncated JPEG (image data ends early)") from None
    if any(benign in message for benign in BENIGN_JPEG_WARNINGS):
        return decode(data, False)
    raise BadImage(f"corrupt JPEG: {message}")


def decode_with_pil(data: bytes, max_pixels: int) -> np.ndarray:
    """RGB pixels of anything Pillow reads (PNG, GIF, BMP, TIFF, WebP, CMYK JPEG); first frame."""
    with _pillow_bomb_check_off():
        try:
            image = Image.open(io.BytesIO(data), formats=PILLOW_FORMATS)
        except UnidentifiedImageError:
            raise BadImage("not an image (unrecognised file format)") from None
        except Exception as error:  # Pillow raises many types on malformed headers
            raise BadImage(f"cannot read image header: {error}") from None
    check_pixel_count(image.width, image.height, max_pixels)
    check_decoded_bytes(image, max_pixels)
    try:
        image.load()
        return to_rgb(image)
    except Exception as error:  # truncated or corrupt data: OSError, SyntaxError, ValueError...
        raise BadImage(f"cannot decode {image.format or 'image'}: {error}") from None


def to_rgb(image: Image.Image) -> np.ndarray:
    """(H, W, 3) uint8 from any Pillow mode; 16-bit greyscale keeps its high byte."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        return high_byte_grey(np.asarray(image))
    return np.array(image.convert("RGB"))  # a writable copy: torch refuses read-only arrays


def high_byte_grey(grey: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 from 16- or 32-bit integer greyscale: ``clip(sample >> 8, 0, 255)`` in R, G, B.

    Computed a band of rows at a time: the whole image at once through int64 took 8 bytes a pixel
    for each temporary (1.9 GB for 100 megapixels), more than the 8-bit RGB the cap is set for.
    """
    rgb = np.empty((*grey.shape, 3), np.uint8)
    rows = max(1, GREY_BAND_PIXELS // max(1, grey.shape[1]))
    for top in range(0, grey.shape[0], rows):
        rgb[top : top + rows] = np.clip(grey[top : top + rows] >> 8, 0, 255)[:, :, None]
    return rgb


def check_pixel_count(width: int, height: int, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise BadImage(
            f"too large: {width}x{height} = {width * height:,} pixels exceeds the cap of {max_pixels:,}"
        )


def check_decoded_bytes(image: Image.Image, max_pixels: int) -> None:
    """Refuse, from the header, an image whose samples take more bytes than an 8-bit RGB image at
    the pixel cap: 16-bit RGB (6 bytes a pixel) may have two thirds of --max-pixels."""
    bits = sample_bits(image)
    needed = image.width * image.height * len(image.getbands()) * bits // 8
    allowed = HELD_BYTES_PER_PIXEL * max_pixels
    if needed > allowed:
        raise BadImage(f"too large: {image.width}x{image.height} {bits}-bit {image.mode} needs {needed:,} bytes "
                       f"decoded, over the {allowed:,} that the cap of {max_pixels:,} pixels allows")


def sample_bits(image: Image.Image) -> int:
    """Bits of one sample in the file, from the header. Pillow names a 16-bit RGB PNG or TIFF mode
    "RGB": only the raw mode of its first tile ("RGB;16B") tells the depth. A depth given some
    other way (a 16-bit PPM's maxval) counts as 8 bits: Pillow decodes those to 8 bits anyway."""
    args = image.tile[0][-1] if image.tile else ""
    rawmode = args if isinstance(args, str) else args[0] if args and isinstance(args[0], str) else ""
    wide = WIDE_SAMPLES.search(rawmode)
    if wide:
        return int(wide.group(1))
    return 32 if image.mode in ("I", "F") else 16 if image.mode.startswith("I;16") else 8


def output_geometry(width: int, height: int, size: int, policy: str,
                    max_aspect: float = 2.0) -> tuple[int, int, int, int, int, int]:
    """(resized width, resized height, window left, window top, window width, window height)
    for a width x height source (see the module docstring)."""
    if policy == "squash":
        return size, size, 0, 0, size, size
    if width >= height:
        resized_w, resized_h = max(size, round(width * size / height)), size
    else:
        resized_w, resized_h = size, max(size, round(height * size / width))
    longest = int(math.floor(max_aspect * size + 1e-9)) if policy == KEEP_ASPECT else size
    window_w, window_h = min(resized_w, longest), min(resized_h, longest)
    return resized_w, resized_h, (resized_w - window_w) // 2, (resized_h - window_h) // 2, window_w, window_h


def resize_image(pixels: np.ndarray, size: int, policy: str, max_aspect: float = 2.0, source_wh=None) -> np.ndarray:
    """Antialiased bicubic resize of (H, W, C) uint8 (C = 3 or 4) to RGB per ``policy``.

    ``source_wh`` is the size before any DCT reduction; geometry follows it so that a reduced
    decode lands on the same output grid as a full one (to the rounding of the reduced size).
    """
    height, width = pixels.shape[:2]
    source_wh = source_wh or (width, height)
    longest = max(KEEP_CUT, 2 * max_aspect) if policy == KEEP_ASPECT else MAX_ASPECT
    if policy != "squash" and max(source_wh) > longest * min(source_wh):
        pixels, source_wh = central_part(pixels, source_wh, longest)
    resized_w, resized_h, left, top, window_w, window_h = output_geometry(*source_wh, size, policy, max_aspect)
    resized = np.empty((resized_h, resized_w, pixels.shape[2]), np.uint8)
    resize_interleaved_into(pixels, resized, "bicubic")
    return np.ascontiguousarray(resized[top : top + window_h, left : left + window_w, :3])


def resize_interleaved_into(pixels: np.ndarray, out: np.ndarray, mode: str) -> None:
    """(h, w, C) uint8 resized into ``out`` (H, W, C) uint8 by torch's antialiased ``mode``
    ("bilinear" or "bicubic") uint8 kernel, both viewed as (1, C, h, w) over their interleaved
    memory: the channels-last layout that kernel is vectorised for. The kernel writes ``out`` in
    place; F.interpolate would return planar memory, and interleaving that back cost as much as
    the resize itself (a 500 x 375 photo to 341 x 256: 590 us against 280, the same pixels)."""
    source = torch.from_numpy(pixels).permute(2, 0, 1)[None]
    target = torch.from_numpy(out).permute(2, 0, 1)[None]
    kernel = {"bilinear": torch.ops.aten._upsample_bilinear2d_aa, "bicubic": torch.ops.aten._upsample_bicubic2d_aa}[mode]
    kernel.out(source, list(out.shape[:2]), False, None, None, out=target)


def central_part(pixels: np.ndarray, source_wh, ratio: float = MAX_ASPECT) -> tuple[np.ndarray, tuple[int, int]]:
    """The central ``ratio``:1 part of a longer image (and its size in source pixels).

    Only the centre survives the window anyway, and resizing the whole of a 1 x 100,000 strip to
    a shorter side of 256 would take gigabytes; the window moves by at most half a pixel.
    """
    height, width = pixels.shape[:2]
    (source_w, source_h), scale = source_wh, width / source_wh[0]  # decoded pixels per source pixel
    if source_w > source_h:
        keep = round(ratio * source_h)
        start = round((source_w - keep) / 2 * scale)
        return pixels[:, start : start + max(1, round(keep * scale))], (keep, source_h)
    keep = round(ratio * source_w)
    start = round((source_h - keep) / 2 * scale)
    return pixels[start : start + max(1, round(keep * scale))], (source_w, keep)


@contextlib.contextmanager
def _pillow_bomb_check_off():
    """Our own ``max_pixels`` cap replaces Pillow's fixed one (which would refuse >179 MP)."""
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved
