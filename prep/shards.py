"""The shard format (version 1): writer, manifest, and the checked reader other stages use.

    SHARDS/manifest.json          format, version, options, classes, per split its shards
    SHARDS/rejects.jsonl          one {"split", "path", "reason"} line per file left out
    SHARDS/<split>/<split>-NNNNN.h5

Each .h5 holds ``labels`` int16 [n], ``keys`` UTF-8 [n] (source path relative to the source
root), and pixels as ``images`` uint8 [n, S, S, 3] RGB, one uncompressed chunk per image
(encoding "raw") or ``jpeg`` variable-length uint8 [n] (encoding "jpeg"); attributes
``format`` = "imgprep-shard", ``version``, ``split``, ``encoding``, ``size``. No timestamps are
stored, so the same input gives the same bytes. Readers check format and version once on open.
"""

from __future__ import annotations

import bisect
import errno
import hashlib
import itertools
import json
import os
from pathlib import Path

import h5py
import numpy as np

from prep.atomic import atomic_path, atomic_write_text
from prep.errors import ShardFormatError

SHARD_FORMAT = "imgprep-shard"  # attribute of every .h5
MANIFEST_FORMAT = "imgprep-shards"  # "format" of manifest.json
VERSION = 1
MANIFEST = "manifest.json"
REJECTS = "rejects.jsonl"
STATS = "stats.json"  # written by imgprep pca-stats (prep.stats)
MEAN_IMAGE = "stats-mean.npy"  # float64 [S, S, 3], named by stats.json


# ----------------------------------------------------------------------------- writing


def write_shard(path, split: str, size: int, encoding: str, labels, keys, pixels) -> None:
    """Write one shard atomically. ``pixels``: uint8 [n, S, S, 3] (raw) or n byte arrays (jpeg)."""
    n = len(labels)
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            f.attrs["format"] = SHARD_FORMAT
            f.attrs["version"] = VERSION
            f.attrs["split"] = split
            f.attrs["encoding"] = encoding
            f.attrs["size"] = size
            # track_times=False: HDF5 would otherwise stamp each dataset with its creation time.
            f.create_dataset("labels", data=np.asarray(labels, dtype=np.int16), track_times=False)
            f.create_dataset("keys", data=list(keys), dtype=h5py.string_dtype("utf-8"), track_times=False)
            if encoding == "raw":
                # One image per chunk, uncompressed: a chunk is the image's raw bytes at a known
                # offset, so a reader can memory-map it without going through HDF5.
                images = f.create_dataset(
                    "images", shape=(n, size, size, 3), dtype=np.uint8,
                    chunks=(1, size, size, 3), track_times=False,
                )
                images[...] = pixels
            else:
                blobs = f.create_dataset("jpeg", shape=(n,), dtype=h5py.vlen_dtype(np.uint8), track_times=False)
                for i, blob in enumerate(pixels):
                    blobs[i] = blob


def sha256_file(path, on_bytes=None, block: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            digest.update(chunk)
            if on_bytes:
                on_bytes(len(chunk))
    return digest.hexdigest()


def write_manifest(root, manifest: dict) -> None:
    atomic_write_text(Path(root) / MANIFEST, json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")


# ----------------------------------------------------------------------------- reading


def read_document(path: Path, document_format: str, error, what: str, hint: str = "") -> dict:
    """The JSON object in ``path`` whose "format" is ``document_format``, else ``error`` saying
    the file is not valid JSON or not ``what``; ``hint`` ends either message."""
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as failure:
        raise error(f"{path} is not valid JSON ({failure}){hint}") from None
    if not isinstance(document, dict) or document.get("format") != document_format:
        raise error(f"{path} is not {what} (format is not '{document_format}'){hint}")
    return document


def shard_entries(manifest: dict, split: str | None = None) -> list[dict]:
    """The manifest's shard entries ({file, count, sha256}) of ``split``, or of every split in
    manifest order."""
    splits = [split] if split is not None else list(manifest["splits"])
    return [entry for name in splits for entry in manifest["splits"][name]["shards"]]


def read_manifest(root) -> dict:
    """The manifest of a shard folder, after checking it is ours and a version we read."""
    path = Path(root) / MANIFEST
    if not Path(root).is_dir():
        raise ShardFormatError(f"shard folder {root} does not exist (make one with 'imgprep shard SRC')")
    if not path.is_file():
        raise ShardFormatError(f"{root} is not a shard folder: it has no {MANIFEST} (make one with 'imgprep shard SRC')")
    manifest = read_document(path, MANIFEST_FORMAT, ShardFormatError, "an imgprep manifest")
    if manifest.get("version") != VERSION:
        raise ShardFormatError(
            f"{path} has format version {manifest.get('version')}; this imgprep reads version {VERSION}"
        )
    problem = manifest_problem(manifest)
    if problem:
        raise ShardFormatError(f"{path} is damaged: {problem} (rebuild the folder with 'imgprep shard ... --overwrite')")
    return manifest


def manifest_problem(manifest: dict) -> str | None:
    """What is missing or malformed among the fields readers use, or None."""
    options = manifest.get("options")
    if not isinstance(options, dict):
        return "it has no 'options'"
    if not isinstance(options.get("size"), int) or options.get("encoding") not in ("raw", "jpeg"):
        return "its options lack a size or an encoding"
    classes = manifest.get("classes")
    if not isinstance(classes, list) or not all(isinstance(c, dict) and "wnid" in c for c in classes):
        return "it has no list of classes"
    splits = manifest.get("splits")
    if not isinstance(splits, dict):
        return "it has no 'splits'"
    for name, split in splits.items():
        shards = split.get("shards") if isinstance(split, dict) else None
        if not isinstance(shards, list):
            return f"split '{name}' has no list of shards"
        for entry in shards:
            if not (isinstance(entry, dict) and isinstance(entry.get("file"), str) and isinstance(entry.get("count"), int)):
                return f"a shard of split '{name}' lacks its file or count"
            if Path(entry["file"]).is_absolute() or ".." in Path(entry["file"]).parts:
                return f"shard path {entry['file']!r} points outside the folder"
    return None


def read_rejects(root) -> list[dict]:
    """rejects.jsonl as a list of {"split", "path", "reason", ...}; one clear error if damaged."""
    path = Path(root) / REJECTS
    if not path.is_file():
        return []
    rejects = []
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            reject = json.loads(line)
        except ValueError:
            reject = None
        if not isinstance(reject, dict) or not {"path", "reason"} <= set(reject):
            raise ShardFormatError(f"{path} line {number} is not an imgprep reject record")
        rejects.append(reject)
    return rejects


def open_shards(root) -> "ShardSet":
    """Open a shard folder made by ``imgprep shard`` (checks format and version)."""
    return ShardSet(root)


class ShardSet:
    """A shard folder: its manifest, classes and one reader per split."""

    def __init__(self, root):
        self.root = Path(root)
        self.manifest = read_manifest(self.root)
        self.options: dict = self.manifest["options"]
        self.size: int = self.options["size"]
        self.encoding: str = self.options["encoding"]
        self.classes: list[dict] = self.manifest["classes"]  # [{index, wnid, name}] in index order

    @property
    def splits(self) -> list[str]:
        return list(self.manifest["splits"])

    def split(self, name: str) -> "SplitReader":
        if name not in self.manifest["splits"]:
            raise ShardFormatError(f"{self.root} has no split '{name}' (it has: {', '.join(self.splits)})")
        return SplitReader(self, name)


class SplitReader:
    """All images of one split by global index: ``reader[i] -> (image HWC uint8, label)``.

    Files open lazily and reopen after a fork, so a reader may be handed to worker processes.
    """

    def __init__(self, shard_set: ShardSet, split: str):
        self.root = shard_set.root
        self.split = split
        self.size = shard_set.size
        self.encoding = shard_set.encoding
        entries = shard_entries(shard_set.manifest, split)
        self.files = [entry["file"] for entry in entries]
        self.starts = [0, *itertools.accumulate(int(e["count"]) for e in entries)]
        allow_open_files(len(self.files) + 64)
        self._open: dict[int, ShardFile] = {}
        self._pid = os.getpid()
        self._labels: np.ndarray | None = None

    def __len__(self) -> int:
        return self.starts[-1]

    def locate(self, index: int) -> tuple[int, int]:
        """(file number, index within that file) of global ``index``."""
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for split '{self.split}' of {len(self)} images")
        file_no = bisect.bisect_right(self.starts, index) - 1
        return file_no, index - self.starts[file_no]

    def locate_many(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``locate`` for an array of global indices: (file numbers, indices within the files)."""
        indices = np.asarray(indices, dtype=np.int64)
        if len(indices) and (indices.min() < 0 or indices.max() >= len(self)):
            raise IndexError(f"indices out of range for split '{self.split}' of {len(self)} images")
        starts = np.asarray(self.starts, dtype=np.int64)
        file_nos = np.searchsorted(starts, indices, side="right") - 1
        return file_nos, indices - starts[file_nos]

    def shard_file(self, file_no: int) -> "ShardFile":
        if os.getpid() != self._pid:  # a forked child must not share HDF5 handles
            self._open, self._pid = {}, os.getpid()
        if file_no not in self._open:
            self._open[file_no] = ShardFile(self.root / self.files[file_no], self.split, self.encoding, self.size)
        return self._open[file_no]

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        file_no, local = self.locate(index)
        shard = self.shard_file(file_no)
        return shard.image(local), int(shard.labels[local])

    def stored(self, index: int) -> tuple[np.ndarray, int]:
        """(image as stored, label) without decoding or copying: for raw shards a read-only
        [S, S, 3] view into the file, for jpeg shards the encoded bytes (uint8 [k])."""
        file_no, local = self.locate(index)
        shard = self.shard_file(file_no)
        return shard.stored(local), int(shard.labels[local])

    def stored_many(self, indices) -> list[np.ndarray]:
        """``stored`` images of many samples, one call a batch: views into the memory maps (raw),
        or the JPEG bytes, read with one HDF5 call per shard file (jpeg)."""
        file_nos, locals_ = self.locate_many(indices)
        if self.encoding == "raw":
            return [self.shard_file(int(f)).stored(int(i)) for f, i in zip(file_nos.tolist(), locals_.tolist())]
        out: list = [None] * len(file_nos)
        for file_no in np.unique(file_nos).tolist():
            where = np.flatnonzero(file_nos == file_no)
            wanted, back = np.unique(locals_[where], return_inverse=True)  # h5py wants increasing indices
            blobs = self.shard_file(file_no).blobs[wanted]
            for position, k in zip(where.tolist(), back.reshape(-1).tolist()):
                out[position] = blobs[k]
        return out

    def gather(self, indices, out: np.ndarray) -> np.ndarray:
        """Decoded images of ``indices`` copied into ``out`` (uint8 [len(indices), S, S, 3]): for
        raw shards one memory copy an image out of the page cache."""
        if self.encoding == "raw":
            for row, image in enumerate(self.stored_many(indices)):
                out[row] = image
        else:
            file_nos, locals_ = self.locate_many(indices)
            for row, (f, i) in enumerate(zip(file_nos.tolist(), locals_.tolist())):
                out[row] = self.shard_file(f).image(i)
        return out

    def key(self, index: int) -> str:
        file_no, local = self.locate(index)
        return self.shard_file(file_no).key(local)

    @property
    def labels(self) -> np.ndarray:
        """Labels of the whole split, int64 [n], in index order (read once, then kept)."""
        if self._labels is None:
            parts = [self.shard_file(i).labels for i in range(len(self.files))]
            self._labels = np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, dtype=np.int64)
        return self._labels

    def labels_of(self, indices) -> np.ndarray:
        """Labels (int64) of ``indices``, from the shard files that hold them (a worker reading
        their images has them open already), without reading every file's labels."""
        file_nos, locals_ = self.locate_many(indices)
        pairs = zip(file_nos.tolist(), locals_.tolist())  # a batch spans many files: one lookup a sample
        return np.fromiter((self.shard_file(f).labels[i] for f, i in pairs), dtype=np.int64, count=len(file_nos))

    def close(self) -> None:
        for shard in self._open.values():
            shard.close()
        self._open = {}


class ShardFile:
    """One .h5 shard, checked on open. Raw shards keep no HDF5 handle: their images are read
    through a memory map at the chunk offsets found on open (one file descriptor a shard)."""

    def __init__(self, path: Path, split: str, encoding: str, size: int):
        self.path, self.size, self.encoding = path, size, encoding
        self.h5 = self.map = None
        try:
            self.h5 = h5py.File(path, "r")
        except FileNotFoundError:
            raise ShardFormatError(f"shard {path} is missing (run 'imgprep verify' on the folder)") from None
        except OSError as error:
            if error.errno == errno.EMFILE:
                raise ShardFormatError(f"too many open files reading {path}: raise the limit (ulimit -n) "
                                       "or shard with a larger --shard-size") from None
            raise ShardFormatError(f"shard {path} cannot be opened as HDF5: {error}") from None
        try:
            self._check(split)
            self.labels = self.h5["labels"][:]
            if encoding == "raw":
                self.offsets = raw_chunk_offsets(self.h5["images"], path)
                # A plain ndarray over the map: slicing it costs a fraction of slicing an np.memmap.
                self.map = np.memmap(path, dtype=np.uint8, mode="r").view(np.ndarray)
                if len(self.offsets) and self.offsets.max() + size * size * 3 > len(self.map):
                    raise ShardFormatError(f"shard {path} is truncated: its images run past the end of the file")
                self.h5.close()
                self.h5 = None
            else:
                self.blobs = self.h5["jpeg"]
        except KeyError as error:
            self.close()
            raise ShardFormatError(f"shard {path} lacks a dataset: {error}") from None
        except BaseException:
            self.close()
            raise

    def _check(self, split: str) -> None:
        expected = {"format": SHARD_FORMAT, "version": VERSION, "split": split, "encoding": self.encoding,
                    "size": self.size}
        for name, value in expected.items():
            found = self.h5.attrs.get(name)
            found = found.item() if isinstance(found, np.generic) else found
            if found != value:
                raise ShardFormatError(f"shard {self.path} has {name}={found!r} where the manifest says {value!r}")

    def stored(self, local: int) -> np.ndarray:
        if self.encoding == "raw":
            start = self.offsets[local]
            return self.map[start : start + self.size * self.size * 3].reshape(self.size, self.size, 3)
        return self.blobs[local]

    def image(self, local: int) -> np.ndarray:
        """Decoded RGB uint8 [S, S, 3], a private copy."""
        if self.encoding == "raw":
            return np.array(self.stored(local))
        import simplejpeg

        try:
            image = simplejpeg.decode_jpeg(self.blobs[local].tobytes(), "RGB")
        except ValueError as error:
            raise ShardFormatError(f"shard {self.path}: image {local} is not a readable JPEG ({error})") from None
        if image.shape != (self.size, self.size, 3):  # callers rely on the size (pca-stats reads unchecked)
            raise ShardFormatError(f"shard {self.path}: image {local} is {image.shape}, not ({self.size}, "
                                   f"{self.size}, 3)")
        return image

    def key(self, local: int) -> str:
        if self.h5 is not None:
            return self.h5["keys"][local].decode("utf-8")
        with h5py.File(self.path, "r") as h5:  # raw shards keep no handle open
            return h5["keys"][local].decode("utf-8")

    def close(self) -> None:
        if self.h5 is not None:
            self.h5.close()
            self.h5 = None
        self.map = None  # unmapped once no view of it is left (DALI may still hold one)


def allow_open_files(needed: int) -> None:
    """Raise this process's soft limit on open files towards ``needed`` (within the hard limit):
    a reader keeps one descriptor per shard it has touched, and ImageNet has ~1,300 shards."""
    try:
        import resource
    except ImportError:  # not on this platform
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, target), hard))


def raw_chunk_offsets(images: h5py.Dataset, path) -> np.ndarray:
    """Byte offset in the file of each image's chunk (uncompressed, one image per chunk)."""
    n, size = images.shape[0], images.shape[1]
    offsets = np.full(n, -1, dtype=np.int64)

    def record(info):
        if info.filter_mask != 0 or info.size != size * size * 3:
            raise ShardFormatError(f"shard {path} stores images compressed or in foreign chunks")
        offsets[info.chunk_offset[0]] = info.byte_offset

    images.id.chunk_iter(record)
    if (offsets < 0).any():
        raise ShardFormatError(f"shard {path} is incomplete: {int((offsets < 0).sum())} images have no data")
    return offsets
