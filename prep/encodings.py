"""How a shard stores its pixels: one class per kind of storage, and the only module that knows them.

    encoding "raw", square shards (policies crop and squash; format version 1)
        images   uint8 [n, S, S, 3], one uncompressed chunk an image: chunk i is image i's bytes
    encoding "raw", aspect-kept shards (policy keep; format version 2)
        pixels   uint8 [total], contiguous: image i is pixels[offsets[i] : offsets[i + 1]], [h_i, w_i, 3]
        offsets  int64 [n + 1];  sizes int32 [n, 2], (h_i, w_i)
    encoding "jpeg" (any policy)
        jpeg     variable-length uint8 [n], a baseline JPEG (4:2:0) an image
        sizes    int32 [n, 2], (h_i, w_i) (aspect-kept shards only: square ones are all S x S)

Raw images of either layout are read through a memory map of the file at their byte offsets (no
HDF5 call, no decode: a view). Each kind writes a shard's pixel datasets (``write``), opens them
for reading (``open`` -> ``StoredImages``: image i as stored, decoded, its size) and adds a
shard's pixels to the exact integer sums of ``imgprep pca-stats`` (``StoredImages.add_to_sums``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import h5py
import numpy as np

from prep import ENCODINGS, KEEP_ASPECT  # noqa: F401  (the manifest's options["encoding"]; re-exported)
from prep.errors import ShardFormatError


class StoredImages(Protocol):
    """The images of one open shard file, as stored."""

    sizes: np.ndarray  # int32 [n, 2]: (height, width) of each image

    def stored(self, i: int) -> np.ndarray:
        """Image i as stored, without a copy: a read-only [h, w, 3] view (raw) or the JPEG bytes."""

    def stored_many(self, indices: np.ndarray) -> list[np.ndarray]:
        """``stored`` of several images at once (JPEG: one HDF5 read per shard file)."""

    def image(self, i: int) -> np.ndarray:
        """Image i decoded: a private uint8 [h, w, 3] RGB array."""

    def add_to_sums(self, indices: np.ndarray, sums: "PixelSums") -> None:
        """Add the pixels of images ``indices`` to ``sums`` (``imgprep pca-stats``)."""

    def close(self) -> None: ...


class Encoding(Protocol):
    """One kind of storage: how a shard's images are encoded, written and opened."""

    name: str  # "raw" or "jpeg"
    compressed: bool  # stored images are encoded bytes that a reader decodes (DALI: a decoder op)

    def encode(self, image: np.ndarray, quality: int) -> np.ndarray:
        """What the shard holds of one resized RGB image (in the shard worker)."""

    def write(self, h5: h5py.File, encoded: list, count: int, size: int) -> None:
        """Write the pixel datasets of ``count`` encoded images of side (or shorter side) ``size``."""

    def open(self, h5: h5py.File, path: Path, size: int, max_side: int) -> StoredImages:
        """The images of an open shard, checked; ``max_side``: the longest side an image may have."""


class PixelSums:
    """Exact integer sums over pixels x in {0..255}^3: count, per-channel sums, the six second
    moments (RR GG BB RG RB GB) and, for square shards, the per-position sum (the mean image)."""

    def __init__(self, size: int | None):
        self.images = 0
        self.pixels = 0
        self.channels = [0, 0, 0]
        self.moments = [0] * 6
        self.positions = np.zeros((size, size, 3), np.int64) if size else None

    def add(self, other: "PixelSums") -> "PixelSums":
        self.images += other.images
        self.pixels += other.pixels
        self.channels = [a + b for a, b in zip(self.channels, other.channels)]
        self.moments = [a + b for a, b in zip(self.moments, other.moments)]
        if self.positions is not None:
            self.positions += other.positions
        return self


# Per-position sums are kept in uint32 a flush at a time: 2^32 / 255 > 16 M images; flush far earlier.
FLUSH_EVERY = 1 << 16


def _square_sums(buffer: np.ndarray, offsets: np.ndarray, size: int, sums: PixelSums) -> None:
    """Add square images ``buffer[offset : offset + S*S*3]`` (HWC) to ``sums``, compiled."""
    from prep.pixelsums import accumulate

    nbytes = size * size * 3
    positions = np.zeros(nbytes, dtype=np.uint32)
    moments = np.zeros(6, dtype=np.uint64)
    accumulate(buffer, offsets, nbytes, positions, moments)
    sums.positions += positions.reshape(size, size, 3)
    sums.channels = [a + int(b) for a, b in zip(sums.channels, positions.reshape(-1, 3).sum(axis=0, dtype=np.int64))]
    sums.moments = [a + int(b) for a, b in zip(sums.moments, moments)]
    sums.images += len(offsets)
    sums.pixels += len(offsets) * size * size


def _pixel_sums(buffer: np.ndarray, starts: np.ndarray, lengths: np.ndarray, sums: PixelSums) -> None:
    """Add images of any size, ``buffer[start : start + length]`` (HWC), to ``sums``, compiled."""
    from prep.pixelsums import accumulate_pixels

    totals = np.zeros(9, dtype=np.uint64)  # R G B, then RR GG BB RG RB GB
    accumulate_pixels(buffer, starts, lengths, totals)
    sums.channels = [a + int(b) for a, b in zip(sums.channels, totals[:3])]
    sums.moments = [a + int(b) for a, b in zip(sums.moments, totals[3:])]
    sums.images += len(starts)
    sums.pixels += int(lengths.sum()) // 3


def _memory_map(path: Path) -> np.ndarray:
    # A plain ndarray over the map: slicing it costs a fraction of slicing an np.memmap.
    return np.memmap(path, dtype=np.uint8, mode="r").view(np.ndarray)


# ----------------------------------------------------------------------------- raw, square


class RawSquare:
    name, compressed = "raw", False

    def encode(self, image: np.ndarray, quality: int) -> np.ndarray:
        return image

    def write(self, h5: h5py.File, encoded: list, count: int, size: int) -> None:
        # One image per chunk, uncompressed: a chunk is the image's raw bytes at a known offset,
        # so a reader can memory-map it without going through HDF5.
        images = h5.create_dataset("images", shape=(count, size, size, 3), dtype=np.uint8,
                                   chunks=(1, size, size, 3), track_times=False)
        for i, image in enumerate(encoded[:count]):  # chunk by chunk: no second copy of the shard in memory
            images[i] = image

    def open(self, h5: h5py.File, path: Path, size: int, max_side: int) -> "RawSquareImages":
        return RawSquareImages(h5, path, size)


class RawSquareImages:
    def __init__(self, h5: h5py.File, path: Path, size: int):
        self.path, self.size = path, size
        images = h5["images"]
        if images.shape[1:] != (size, size, 3) or images.dtype != np.uint8:
            raise ShardFormatError(f"shard {path} holds images of shape {images.shape[1:]}, not ({size}, {size}, 3)")
        self.offsets = raw_chunk_offsets(images, path)
        self.sizes = np.full((len(self.offsets), 2), size, dtype=np.int32)
        self.map = _memory_map(path)
        if len(self.offsets) and self.offsets.max() + size * size * 3 > len(self.map):
            raise ShardFormatError(f"shard {path} is truncated: its images run past the end of the file")

    def stored(self, i: int) -> np.ndarray:
        start = self.offsets[i]
        return self.map[start : start + self.size * self.size * 3].reshape(self.size, self.size, 3)

    def stored_many(self, indices) -> list[np.ndarray]:
        return [self.stored(i) for i in indices]

    def image(self, i: int) -> np.ndarray:
        return np.array(self.stored(i))

    def add_to_sums(self, indices, sums: PixelSums) -> None:
        for start in range(0, len(indices), FLUSH_EVERY):
            _square_sums(self.map, self.offsets[indices[start : start + FLUSH_EVERY]], self.size, sums)

    def close(self) -> None:
        self.map = None  # unmapped once no view of it is left (DALI may still hold one)


def raw_chunk_offsets(images: h5py.Dataset, path) -> np.ndarray:
    """Byte offset in the file of each image's chunk (uncompressed, one image per chunk)."""
    n, size = images.shape[0], images.shape[1]
    offsets = np.full(n, -1, dtype=np.int64)

    def record(info):
        if info.filter_mask != 0 or info.size != size * size * 3:
            raise ShardFormatError(f"shard {path} stores images compressed or in foreign chunks")
        offsets[info.chunk_offset[0]] = info.byte_offset

    if images.chunks != (1, size, size, 3) or images.compression is not None:
        raise ShardFormatError(f"shard {path} stores images compressed or in foreign chunks")
    images.id.chunk_iter(record)
    if (offsets < 0).any():
        raise ShardFormatError(f"shard {path} is incomplete: {int((offsets < 0).sum())} images have no data")
    return offsets


# ----------------------------------------------------------------------------- raw, aspect kept


class RawKeep:
    name, compressed = "raw", False

    def encode(self, image: np.ndarray, quality: int) -> np.ndarray:
        return image

    def write(self, h5: h5py.File, encoded: list, count: int, size: int) -> None:
        sizes = np.array([image.shape[:2] for image in encoded[:count]], dtype=np.int32).reshape(-1, 2)
        offsets = np.concatenate([[0], np.cumsum(sizes[:, 0].astype(np.int64) * sizes[:, 1] * 3)])
        h5.create_dataset("sizes", data=sizes, track_times=False)
        h5.create_dataset("offsets", data=offsets, track_times=False)
        # Contiguous and uncompressed: the images are one run of bytes at a known file offset.
        pixels = h5.create_dataset("pixels", shape=(int(offsets[-1]),), dtype=np.uint8, track_times=False)
        for image, start, end in zip(encoded[:count], offsets[:-1], offsets[1:]):
            pixels[start:end] = np.ascontiguousarray(image).reshape(-1)

    def open(self, h5: h5py.File, path: Path, size: int, max_side: int) -> "RawKeepImages":
        return RawKeepImages(h5, path, size, max_side)


class RawKeepImages:
    def __init__(self, h5: h5py.File, path: Path, size: int, max_side: int):
        self.path = path
        self.sizes = checked_sizes(h5, path, size, max_side)
        self.offsets = h5["offsets"][:].astype(np.int64)
        pixels = h5["pixels"]
        lengths = self.sizes[:, 0].astype(np.int64) * self.sizes[:, 1] * 3
        if (pixels.dtype != np.uint8 or pixels.ndim != 1 or self.offsets.shape != (len(self.sizes) + 1,)
                or self.offsets[0] != 0 or not np.array_equal(np.diff(self.offsets), lengths)
                or self.offsets[-1] != pixels.shape[0]):
            raise ShardFormatError(f"shard {path} is damaged: its pixel offsets do not match the image sizes "
                                   "(imgprep verify)")
        base = pixels.id.get_offset() if pixels.shape[0] else 0
        if base is None or pixels.chunks is not None or pixels.compression is not None:
            raise ShardFormatError(f"shard {path} stores its pixels chunked or compressed, not in one run of bytes")
        self.starts = self.offsets[:-1] + base
        self.map = _memory_map(path) if pixels.shape[0] else np.zeros(0, np.uint8)
        if pixels.shape[0] and base + self.offsets[-1] > len(self.map):
            raise ShardFormatError(f"shard {path} is truncated: its images run past the end of the file")

    def stored(self, i: int) -> np.ndarray:
        height, width = self.sizes[i]
        start = self.starts[i]
        return self.map[start : start + height * width * 3].reshape(height, width, 3)

    def stored_many(self, indices) -> list[np.ndarray]:
        return [self.stored(i) for i in indices]

    def image(self, i: int) -> np.ndarray:
        return np.array(self.stored(i))

    def add_to_sums(self, indices, sums: PixelSums) -> None:
        indices = np.asarray(indices, dtype=np.int64)
        lengths = self.sizes[indices, 0].astype(np.int64) * self.sizes[indices, 1] * 3
        _pixel_sums(self.map, self.starts[indices], lengths, sums)

    def close(self) -> None:
        self.map = None


def checked_sizes(h5: h5py.File, path: Path, size: int, max_side: int) -> np.ndarray:
    """The ``sizes`` dataset of an aspect-kept shard: (h, w) with the shorter side ``size`` and the
    longer at most ``max_side``."""
    sizes = h5["sizes"]
    if sizes.ndim != 2 or sizes.shape[1] != 2:
        raise ShardFormatError(f"shard {path} is damaged: 'sizes' is not [n, 2] (imgprep verify)")
    sizes = sizes[:].astype(np.int32)
    if len(sizes) and (sizes.min(axis=1).min() != size or sizes.min(axis=1).max() != size
                       or sizes.max() > max_side):
        raise ShardFormatError(f"shard {path} is damaged: its image sizes are not {size} on the shorter side and "
                               f"at most {max_side} on the longer (imgprep verify)")
    return sizes


# ----------------------------------------------------------------------------- jpeg


class Jpeg:
    name, compressed = "jpeg", True

    def __init__(self, square: bool):
        self.square = square

    def encode(self, image: np.ndarray, quality: int) -> np.ndarray:
        """4:2:0 at ``quality``; the same image always gives the same bytes."""
        import simplejpeg

        data = simplejpeg.encode_jpeg(np.ascontiguousarray(image), quality=quality, colorspace="RGB",
                                      colorsubsampling="420")
        return np.frombuffer(data, dtype=np.uint8)

    def write(self, h5: h5py.File, encoded: list, count: int, size: int) -> None:
        if not self.square:
            sizes = [_jpeg_size(blob) for blob in encoded[:count]]
            h5.create_dataset("sizes", data=np.array(sizes, dtype=np.int32).reshape(-1, 2), track_times=False)
        blobs = h5.create_dataset("jpeg", shape=(count,), dtype=h5py.vlen_dtype(np.uint8), track_times=False)
        for i, blob in enumerate(encoded[:count]):
            blobs[i] = blob

    def open(self, h5: h5py.File, path: Path, size: int, max_side: int) -> "JpegImages":
        return JpegImages(h5, path, size, max_side, self.square)


def _jpeg_size(blob: np.ndarray) -> tuple[int, int]:
    import simplejpeg

    height, width, _, _ = simplejpeg.decode_jpeg_header(blob.tobytes())
    return height, width


class JpegImages:
    def __init__(self, h5: h5py.File, path: Path, size: int, max_side: int, square: bool):
        self.path = path
        self.blobs = h5["jpeg"]
        if square:
            self.sizes = np.full((len(self.blobs), 2), size, dtype=np.int32)
        else:
            self.sizes = checked_sizes(h5, path, size, max_side)
        if len(self.sizes) != len(self.blobs):
            raise ShardFormatError(f"shard {path} is damaged: {len(self.sizes)} sizes for {len(self.blobs)} images "
                                   "(imgprep verify)")

    def stored(self, i: int) -> np.ndarray:
        blob = self.blobs[i]
        self.check_header(blob, i)
        return blob

    def stored_many(self, indices) -> list[np.ndarray]:
        """The blobs, each header checked: they go to a decoder (DALI's) that would take any size."""
        indices = np.asarray(indices, dtype=np.int64)
        wanted, back = np.unique(indices, return_inverse=True)  # h5py wants increasing indices
        blobs = self.blobs[wanted] if len(wanted) else []
        for blob, i in zip(blobs, wanted.tolist()):
            self.check_header(blob, i)
        return [blobs[k] for k in back.reshape(-1).tolist()]

    def check_header(self, blob: np.ndarray, i: int) -> None:
        """Refuse blob ``i`` unless its JPEG header declares the stored size: one that declares
        another (or an enormous one) is refused before any pixel is decoded."""
        import simplejpeg

        expected = tuple(int(v) for v in self.sizes[i])
        try:
            height, width, _, _ = simplejpeg.decode_jpeg_header(blob)  # reads the array in place
        except ValueError as error:
            raise ShardFormatError(f"shard {self.path}: image {i} is not a readable JPEG ({error})") from None
        if (height, width) != expected:
            raise ShardFormatError(f"shard {self.path}: image {i} is a {width}x{height} JPEG where the shard "
                                   f"holds {expected[1]}x{expected[0]} images (imgprep verify)")

    def image(self, i: int) -> np.ndarray:
        return self.decode(self.stored(i), i)

    def decode(self, blob: np.ndarray, i: int) -> np.ndarray:
        """Blob ``i``, as ``stored`` or ``stored_many`` gave it (its header checked there),
        decoded to RGB."""
        import simplejpeg

        try:
            return simplejpeg.decode_jpeg(blob, "RGB")
        except ValueError as error:
            raise ShardFormatError(f"shard {self.path}: image {i} is not a readable JPEG ({error})") from None

    def add_to_sums(self, indices, sums: PixelSums) -> None:
        for i in indices:  # decoded one at a time: a batch of decoded images would not be smaller
            pixels = self.image(int(i)).reshape(-1)
            if sums.positions is not None:
                _square_sums(pixels, np.zeros(1, np.int64), int(self.sizes[i, 0]), sums)
            else:
                _pixel_sums(pixels, np.zeros(1, np.int64), np.array([pixels.size], np.int64), sums)

    def close(self) -> None:
        self.blobs = None


_WINDOW_DECODER = {}  # pid -> nvImageCodec's CPU decoder of that process (made after any fork)
JPEG_END = b"\xff\xd9"  # EOI: the two bytes every whole JPEG of ours ends with


def decode_jpeg_windows(blobs: list[np.ndarray], boxes: list[tuple[int, int, int, int]]) -> list[np.ndarray | None]:
    """Window (x, y, w, h), whole pixels, of each JPEG blob as RGB uint8 [h, w, 3]; None for a blob
    that cannot be decoded.

    Only what a window needs is decoded: libjpeg-turbo (through nvImageCodec, which comes with
    DALI) entropy-decodes the rows above the window without their inverse DCT and colour
    conversion, converts only the iMCU columns the window spans, and stops after its last row.
    The pixels are exactly those of the same region of the whole decoded image, upsampled chroma
    included (the tests compare them with simplejpeg's full decode). The batch is one call: per
    call, nvImageCodec's overhead is about what the window saves. Where nvImageCodec is missing
    (no DALI: not Linux), each image is decoded whole and cut, to the same pixels.
    """
    decoder = _window_decoder()
    if decoder is None:
        return [_whole_then_cut(blob, box) for blob, box in zip(blobs, boxes)]
    from nvidia import nvimgcodec

    complete = [bytes(blob[-2:]) == JPEG_END for blob in blobs]  # a cut-off blob: libjpeg would pad it silently
    regions = [nvimgcodec.CodeStream(blob).get_sub_code_stream(region=nvimgcodec.Region(start=(y, x), end=(y + h, x + w)))
               for blob, (x, y, w, h), ok in zip(blobs, boxes, complete) if ok]
    decoded = iter(decoder.decode(regions) if regions else [])
    return [(None if (image := next(decoded)) is None else np.asarray(image)) if ok else None for ok in complete]


def _window_decoder():
    """This process's nvImageCodec decoder on one CPU thread (loader workers are the
    parallelism), or None without nvImageCodec, or where it cannot start (said once a process:
    the whole images are decoded instead, to the same pixels)."""
    import os

    pid = os.getpid()
    if pid not in _WINDOW_DECODER:
        _WINDOW_DECODER[pid] = None
        try:
            from nvidia import nvimgcodec
        except ImportError:
            return None
        try:
            _WINDOW_DECODER[pid] = nvimgcodec.Decoder(device_id=nvimgcodec.NVIMGCODEC_DEVICE_CPU_ONLY,
                                                      max_num_cpu_threads=1,
                                                      backends=[nvimgcodec.Backend(nvimgcodec.BackendKind.CPU_ONLY)])
        except Exception as error:  # its own error types; the fallback gives the same pixels, slower
            import warnings

            warnings.warn(f"nvImageCodec's CPU decoder did not start ({error}); JPEG windows are cut from "
                          "whole decoded images", RuntimeWarning, stacklevel=2)
    return _WINDOW_DECODER[pid]


def _whole_then_cut(blob: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray | None:
    import simplejpeg

    x, y, w, h = box
    try:
        return simplejpeg.decode_jpeg(blob, "RGB")[y : y + h, x : x + w]
    except ValueError:
        return None


def storage_for(encoding: str, policy: str) -> Encoding:
    """The storage kind of shards of ``encoding`` made with ``policy``."""
    if encoding not in ENCODINGS:
        raise ShardFormatError(f"unknown encoding {encoding!r} (this imgprep knows {', '.join(ENCODINGS)})")
    square = policy != KEEP_ASPECT
    if encoding == "jpeg":
        return Jpeg(square)
    return RawSquare() if square else RawKeep()
