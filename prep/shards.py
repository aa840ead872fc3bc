"""The shard format (versions 1 and 2): writer, manifest, and the checked reader other stages use.

    SHARDS/manifest.json          format, version, options, classes, per split its shards
    SHARDS/rejects.jsonl          one {"split", "path", "reason"} line per file left out
    SHARDS/<split>/<split>-NNNNN.h5

Each .h5 holds ``labels`` int16 [n], ``keys`` UTF-8 [n] (source path relative to the source
root) and its pixels as its storage kind lays them out (``prep.encodings``: square raw images
one uncompressed chunk each, aspect-kept raw images as one contiguous run of bytes, or JPEG
blobs); attributes ``format`` = "imgprep-shard", ``version``, ``split``, ``encoding``, ``size``
(version 2 adds ``policy`` and ``max_aspect``). Square shards (policies crop and squash) are
version 1, aspect-kept ones (policy keep) version 2. No timestamps are stored, so the same input
gives the same bytes. Readers check format and version once on open, read only what is stored
inside a shard (no external storage, links or virtual datasets), and turn any damage into one
sentence naming the shard.
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import hashlib
import itertools
import json
import math
import os
from pathlib import Path

import h5py
import numpy as np

from prep.atomic import atomic_path, atomic_write_text, no_space
from prep.encodings import ENCODINGS, KEEP_ASPECT, storage_for
from prep.errors import ShardFormatError

SHARD_FORMAT = "imgprep-shard"  # attribute of every .h5
MANIFEST_FORMAT = "imgprep-shards"  # "format" of manifest.json
VERSION = 1  # square shards (policies crop and squash)
KEEP_VERSION = 2  # aspect-kept shards: each image has its own height and width
VERSIONS = (VERSION, KEEP_VERSION)
MANIFEST = "manifest.json"
REJECTS = "rejects.jsonl"
STATS = "stats.json"  # written by imgprep pca-stats (prep.stats)
MEAN_IMAGE = "stats-mean.npy"  # float64 [S, S, 3], named by stats.json


def format_version(policy: str) -> int:
    return KEEP_VERSION if policy == KEEP_ASPECT else VERSION


def longest_side(size: int, policy: str, max_aspect: float | None) -> int:
    """The longest side an image of such shards may have: S for square ones, else
    floor(max_aspect * S)."""
    return size if policy != KEEP_ASPECT else int(math.floor(max_aspect * size + 1e-9))


# ----------------------------------------------------------------------------- writing


def write_shard(path, split: str, options, labels, keys, encoded) -> None:
    """Write one shard atomically. ``options``: the run's ShardOptions (size, policy, encoding,
    max_aspect); ``encoded``: what ``storage_for(...).encode`` made of each image."""
    n = len(labels)
    storage = storage_for(options.encoding, options.policy)
    with atomic_path(path) as tmp, disk_full_as_os_error(path):
        with h5py.File(tmp, "w") as f:
            f.attrs["format"] = SHARD_FORMAT
            f.attrs["version"] = format_version(options.policy)
            f.attrs["split"] = split
            f.attrs["encoding"] = options.encoding
            f.attrs["size"] = options.size
            if options.policy == KEEP_ASPECT:
                f.attrs["policy"] = options.policy
                f.attrs["max_aspect"] = float(options.max_aspect)
            # track_times=False: HDF5 would otherwise stamp each dataset with its creation time.
            f.create_dataset("labels", data=np.asarray(labels, dtype=np.int16), track_times=False)
            f.create_dataset("keys", data=list(keys), dtype=h5py.string_dtype("utf-8"), track_times=False)
            storage.write(f, encoded, n, options.size)


@contextlib.contextmanager
def disk_full_as_os_error(path):
    """A full disk met by libhdf5 as the OSError every writer's caller handles. h5py raises most
    failed writes as OSError, but one that libhdf5 meets while closing the file (flushing its
    metadata) comes as RuntimeError ("Can't decrement id ref count (file write failed ...
    errno = 28 ...)"): seen once in a full-disk test, where the shard job then stopped with a
    worker's traceback instead of its one line."""
    try:
        yield
    except RuntimeError as error:
        if no_space(error):
            raise OSError(errno.ENOSPC, f"No space left on device (writing {path})") from None
        raise


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


def manifest_sha256(root) -> str:
    """SHA-256 of ROOT/manifest.json's bytes: which shards (and which of their versions) a
    result was made from. Statistics and checkpoints record it, and readers compare."""
    return hashlib.sha256((Path(root) / MANIFEST).read_bytes()).hexdigest()


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
    if manifest.get("version") not in VERSIONS:
        raise ShardFormatError(f"{path} has format version {manifest.get('version')}; this imgprep reads versions "
                               f"{' and '.join(map(str, VERSIONS))}")
    problem = manifest_problem(manifest)
    if problem:
        raise ShardFormatError(f"{path} is damaged: {problem} (rebuild the folder with 'imgprep shard ... --overwrite')")
    return manifest


MAX_SHARD_IMAGES = 1 << 31  # a count beyond this is damage, not data


def manifest_problem(manifest: dict) -> str | None:
    """What is missing or malformed among the fields readers use, or None."""
    options = manifest.get("options")
    if not isinstance(options, dict):
        return "it has no 'options'"
    if (not isinstance(options.get("size"), int) or isinstance(options.get("size"), bool) or options["size"] < 1
            or options.get("encoding") not in ENCODINGS):
        return "its options lack a size or an encoding"
    policy = options.get("policy", "crop")
    if format_version(policy) != manifest.get("version"):
        return f"policy {policy!r} does not go with format version {manifest.get('version')}"
    if policy == KEEP_ASPECT and not (isinstance(options.get("max_aspect"), (int, float))
                                      and 1 <= options["max_aspect"] <= 64):
        return "its options lack the max_aspect of aspect-kept images"
    classes = manifest.get("classes")
    if not isinstance(classes, list) or not classes or not all(
            isinstance(c, dict) and isinstance(c.get("wnid"), str) and isinstance(c.get("name"), str)
            for c in classes):
        return "it has no list of classes (each with a wnid and a name)"
    splits = manifest.get("splits")
    if not isinstance(splits, dict):
        return "it has no 'splits'"
    for name, split in splits.items():
        shards = split.get("shards") if isinstance(split, dict) else None
        if not isinstance(shards, list):
            return f"split '{name}' has no list of shards"
        for entry in shards:
            problem = _entry_problem(entry, name)
            if problem:
                return problem
    return None


def _entry_problem(entry, split: str) -> str | None:
    if not (isinstance(entry, dict) and isinstance(entry.get("file"), str) and isinstance(entry.get("count"), int)
            and not isinstance(entry["count"], bool)):
        return f"a shard of split '{split}' lacks its file or count"
    if not 0 <= entry["count"] < MAX_SHARD_IMAGES:
        return f"shard {entry['file']!r} has a count of {entry['count']}"
    if not (isinstance(entry.get("sha256"), str) and len(entry["sha256"]) == 64):
        return f"shard {entry['file']!r} has no sha256"
    if "\0" in entry["file"] or not entry["file"]:
        return f"shard path {entry['file']!r} is not a file name"
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


def open_shards(root, cache=None, cache_limit: int | None = None, cached_by=None) -> "ShardSet":
    """Open a shard folder made by ``imgprep shard`` (checks format and version). ``root`` may
    be a URL (``s3://bucket/prefix``): its shard files are then read through a local cache
    (``prep.cache``) in folder ``cache``, at most ``cache_limit`` bytes. ``cached_by``: the
    ShardCache whose local folder ``root`` is (loader workers reopen a parent's cached set)."""
    return ShardSet(root, cache, cache_limit, cached_by)


class ShardSet:
    """A shard folder (local, or a URL read through a local cache): its manifest, classes and
    one reader per split."""

    def __init__(self, root, cache=None, cache_limit: int | None = None, cached_by=None):
        from prep.remote import is_url

        self.url = str(root) if is_url(root) else None
        self.cache = cached_by
        if self.url is not None and cached_by is None:
            from prep.cache import ShardCache

            self.cache = ShardCache(self.url, cache, cache_limit)
            root = self.cache.prepare()
        self.root = Path(root)
        self.manifest = read_manifest(self.root)
        self.options: dict = self.manifest["options"]
        self.size: int = self.options["size"]  # S: the side of square images, the shorter side of kept ones
        self.encoding: str = self.options["encoding"]
        self.policy: str = self.options.get("policy", "crop")
        self.square: bool = self.policy != KEEP_ASPECT  # every image S x S
        self.max_side: int = longest_side(self.size, self.policy, self.options.get("max_aspect"))
        self.storage = storage_for(self.encoding, self.policy)
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
        self.size, self.square, self.max_side = shard_set.size, shard_set.square, shard_set.max_side
        self.encoding, self.storage = shard_set.encoding, shard_set.storage
        self.version, self.classes = shard_set.manifest["version"], len(shard_set.classes)
        entries = shard_entries(shard_set.manifest, split)
        self.files = [entry["file"] for entry in entries]
        self.counts = [int(e["count"]) for e in entries]
        self.starts = [0, *itertools.accumulate(self.counts)]
        self.cache, self.window, self.max_open = shard_set.cache, None, len(self.files)
        if self.cache is not None:
            self.sha256s = [entry.get("sha256") for entry in entries]
            self.file_bytes = list(self.cache.sizes(self.files).values())
            self.window = cache_window(self.file_bytes, self.cache.limit)
            # Few files held at a time, whatever the split: every reader of every process on the
            # node shares the limit (views handed out stay valid after a close: the map lives on).
            self.max_open = 2 if self.cache.limit is not None else len(self.files)
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
        shard = self._open.get(file_no)
        if shard is not None:
            if self.max_open < len(self.files):  # a bounded cache: the most recently used is last
                self._open[file_no] = self._open.pop(file_no)
            return shard
        while len(self._open) >= self.max_open:  # a cached folder: leave room for the next files
            self._open.pop(next(iter(self._open))).close()
        held = None
        if self.cache is not None:
            held = self.cache.fetch(self.files[file_no], self.sha256s[file_no], self.file_bytes[file_no],
                                    release=self.close)
        try:
            shard = ShardFile(self.root / self.files[file_no], self.split, self, self.counts[file_no])
        except BaseException:
            if held is not None:
                held.close()
            raise
        shard.held = held
        self._open[file_no] = shard
        return shard

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        file_no, local = self.locate(index)
        shard = self.shard_file(file_no)
        return shard.images.image(local), int(shard.labels[local])

    def stored(self, index: int) -> tuple[np.ndarray, int]:
        """(image as stored, label) without decoding or copying: for raw shards a read-only
        [h, w, 3] view into the file, for jpeg shards the encoded bytes (uint8 [k])."""
        file_no, local = self.locate(index)
        shard = self.shard_file(file_no)
        return shard.images.stored(local), int(shard.labels[local])

    def _by_file(self, indices, read) -> list:
        """``read(shard file, its local indices)`` for each file ``indices`` touch, put back in order."""
        file_nos, locals_ = self.locate_many(indices)
        out: list = [None] * len(file_nos)
        for file_no, where in file_groups(file_nos):
            for position, value in zip(where.tolist(), read(self.shard_file(file_no), locals_[where])):
                out[position] = value
        return out

    def stored_many(self, indices) -> list[np.ndarray]:
        """``stored`` images of many samples, one call a batch: views into the memory maps (raw),
        or the JPEG bytes, read with one HDF5 call per shard file (jpeg)."""
        return self._by_file(indices, lambda shard, locals_: shard.images.stored_many(locals_))

    def decode_stored(self, index: int, stored: np.ndarray) -> np.ndarray:
        """Image ``index`` from what ``stored_many`` returned for it: the view itself (raw), or
        the JPEG decoded after its header was checked."""
        if not self.storage.compressed:
            return stored
        file_no, local = self.locate(index)
        return self.shard_file(file_no).images.decode(stored, local)

    def windows_stored(self, indices, stored: list[np.ndarray], boxes: list[tuple[int, int, int, int]]) -> list[np.ndarray]:
        """Window ``boxes[b]`` = (x, y, w, h), whole pixels, of image ``indices[b]`` from what
        ``stored_many`` returned for it: a view (raw), or only that window decoded, the batch's
        JPEGs in one call (``prep.encodings.decode_jpeg_windows``)."""
        if not self.storage.compressed:
            return [image[y : y + h, x : x + w] for image, (x, y, w, h) in zip(stored, boxes)]
        from prep.encodings import decode_jpeg_windows

        windows = decode_jpeg_windows(stored, boxes)
        for index, window in zip(np.asarray(indices).tolist(), windows):
            if window is None:
                file_no, local = self.locate(index)
                raise ShardFormatError(f"shard {self.shard_file(file_no).path}: image {local} is not a readable "
                                       "JPEG (imgprep verify)")
        return windows

    def shapes_of(self, indices) -> np.ndarray:
        """(height, width) of each of ``indices``, int64 [len, 2], from the shards' size tables."""
        if self.square:
            return np.full((len(indices), 2), self.size, dtype=np.int64)
        parts = self._by_file(indices, lambda shard, locals_: shard.images.sizes[locals_])
        return np.array(parts, dtype=np.int64).reshape(-1, 2)

    def gather(self, indices, out: np.ndarray) -> np.ndarray:
        """Decoded images of ``indices`` copied into ``out`` (uint8 [len(indices), S, S, 3]) of a
        square split: for raw shards one memory copy an image out of the page cache."""
        for row, (index, image) in enumerate(zip(np.asarray(indices).tolist(), self.stored_many(indices))):
            out[row] = self.decode_stored(index, image)
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
        if self.max_open >= len(self.files):  # every file stays open: a lookup a sample is cheapest
            pairs = zip(file_nos.tolist(), locals_.tolist())  # (2x faster than by file at ~1 sample a file)
            return np.fromiter((self.shard_file(f).labels[i] for f, i in pairs), dtype=np.int64, count=len(file_nos))
        labels = np.empty(len(file_nos), dtype=np.int64)
        for file_no, where in file_groups(file_nos):  # file by file: a bounded cache keeps few open
            labels[where] = self.shard_file(file_no).labels[locals_[where]]
        return labels

    @property
    def bounded(self) -> bool:
        """Whether the files come from a cache too small to keep them all open (see ``let_go``)."""
        return self.max_open < len(self.files)

    def let_go(self) -> None:
        """Close the files of a bounded cache once a batch's images are copied out of them: a
        reader between batches then keeps no file from eviction, so the idle workers of several
        ranks cannot fill a node's cache with files nobody reads. (Raw images handed on as views
        of the memory maps must be copied first.)"""
        if self.bounded:
            self.close()

    def close(self) -> None:
        for shard in self._open.values():
            shard.close()
        self._open = {}


# What a damaged HDF5 header can raise from h5py while a shard is opened and checked.
DAMAGE = (OSError, KeyError, ValueError, IndexError, OverflowError, UnicodeDecodeError, RuntimeError, TypeError,
          AttributeError)


class ShardFile:
    """One .h5 shard, checked on open against the manifest (attributes, image count, labels
    within the class count) and for anything stored outside it. Raw shards keep no HDF5 handle:
    their images are read through a memory map (one file descriptor a shard)."""

    def __init__(self, path: Path, split: str, reader: "SplitReader", count: int | None = None):
        self.path, self.size = path, reader.size
        self.h5 = self.images = self.held = None
        try:
            self.h5 = h5py.File(path, "r")
        except FileNotFoundError:
            raise ShardFormatError(f"shard {path} is missing (run 'imgprep verify' on the folder)") from None
        except OSError as error:
            if error.errno == errno.EMFILE:
                raise ShardFormatError(f"too many open files reading {path}: raise the limit (ulimit -n) "
                                       "or shard with a larger --shard-size") from None
            raise ShardFormatError(f"shard {path} cannot be opened as HDF5: {error} (imgprep verify)") from None
        try:
            self._check(split, reader)
            file_bytes = os.path.getsize(path)
            for name in self.h5:
                inside_only(self.h5, name, path, file_bytes)
            if count is not None and self.h5["labels"].shape != (count,):  # before reading any of it
                raise ShardFormatError(f"shard {path} holds {self.h5['labels'].shape} labels where the manifest "
                                       f"says {count} images (imgprep verify)")
            self.labels = self.h5["labels"][:]
            self._check_labels(reader.classes, count)
            self.images = reader.storage.open(self.h5, path, reader.size, reader.max_side)
            if len(self.images.sizes) != len(self.labels):
                raise ShardFormatError(f"shard {path} is damaged: {len(self.images.sizes)} images for "
                                       f"{len(self.labels)} labels (imgprep verify)")
            if not reader.storage.compressed:  # its images are read through the memory map
                self.h5.close()
                self.h5 = None
        except ShardFormatError:
            self.close()
            raise
        except DAMAGE as error:
            self.close()
            raise ShardFormatError(f"{path} is damaged: {type(error).__name__}: {error} (imgprep verify)") from None
        except BaseException:
            self.close()
            raise

    def _check(self, split: str, reader: "SplitReader") -> None:
        expected = {"format": SHARD_FORMAT, "version": reader.version, "split": split, "encoding": reader.encoding,
                    "size": self.size}
        for name, value in expected.items():
            found = self.h5.attrs.get(name)
            found = found.item() if isinstance(found, np.generic) else found
            found = found.decode("utf-8", "replace") if isinstance(found, bytes) else found
            if found != value:
                raise ShardFormatError(f"shard {self.path} has {name}={found!r} where the manifest says {value!r} "
                                       "(imgprep verify)")

    def _check_labels(self, classes: int, count: int | None) -> None:
        if self.labels.ndim != 1 or (count is not None and len(self.labels) != count):
            raise ShardFormatError(f"shard {self.path} holds {len(self.labels)} images where the manifest says "
                                   f"{count} (imgprep verify)")
        if len(self.labels) and (self.labels.min() < 0 or self.labels.max() >= classes):
            raise ShardFormatError(f"shard {self.path} has labels from {self.labels.min()} to {self.labels.max()}, "
                                   f"outside the {classes} classes of its manifest (imgprep verify)")

    def key(self, local: int) -> str:
        try:
            if self.h5 is not None:
                return self.h5["keys"][local].decode("utf-8")
            with h5py.File(self.path, "r") as h5:  # raw shards keep no handle open
                return h5["keys"][local].decode("utf-8")
        except DAMAGE as error:
            raise ShardFormatError(f"{self.path} is damaged: {type(error).__name__}: {error} (imgprep verify)") from None

    def close(self) -> None:
        if self.images is not None:
            self.images.close()
        if self.h5 is not None:
            self.h5.close()
            self.h5 = None
        if self.held is not None:  # a cached file: it may be evicted now
            self.held.close()
            self.held = None


def file_groups(file_nos: np.ndarray):
    """(file number, positions in ``file_nos`` holding it) for each file, in file order: one sort,
    not one comparison of the whole batch per file (a batch of ImageNet touches ~100 files)."""
    order = np.argsort(file_nos, kind="stable")
    ordered = file_nos[order]
    cuts = np.flatnonzero(ordered[1:] != ordered[:-1]) + 1
    for start, end in zip([0, *cuts.tolist()], [*cuts.tolist(), len(order)]):
        yield int(ordered[start]), order[start:end]


def cache_window(file_bytes: list[int], limit: int | None) -> int | None:
    """K, the shards a window of the shard-window order holds for a cache of ``limit`` bytes, or
    None when every file fits. A quarter of the cache: loader processes read the window a batch is
    in and the next one as they cross into it (and some run a batch or two ahead), and each
    reserves room for the file it downloads."""
    if limit is None or sum(file_bytes) <= limit:
        return None
    largest = max(file_bytes)
    if 4 * largest > limit:
        raise ShardFormatError(f"a cache limit of {limit:,} bytes is too small for shards of up to {largest:,} "
                               f"bytes: give at least {4 * largest:,}")
    return max(1, limit // largest // 4)


def inside_only(h5: h5py.File, name: str, path, file_bytes: int) -> None:
    """Refuse a dataset of ``h5`` whose bytes live outside the file: a soft or external link, a
    virtual dataset, or external raw storage would make a reader read another file. And one that
    declares more bytes than the whole file holds (damage: reading it would allocate them)."""
    link = h5.get(name, getlink=True)
    if link is None:  # listed by the group but not resolvable: a damaged header, not a link
        raise ShardFormatError(f"{path} is damaged: '{name}' is listed but cannot be read (imgprep verify)")
    if not isinstance(link, h5py.HardLink):
        raise ShardFormatError(f"shard {path}: '{name}' is a {type(link).__name__}, a link out of the shard; "
                               "shards hold all their data themselves (imgprep verify)")
    item = h5[name]
    if isinstance(item, h5py.Dataset) and (item.is_virtual or item.external):
        what = "a virtual dataset" if item.is_virtual else "stored in external files"
        raise ShardFormatError(f"shard {path}: '{name}' is {what}; shards hold all their data themselves "
                               "(imgprep verify)")
    if isinstance(item, h5py.Dataset) and item.size * item.dtype.itemsize > file_bytes:
        raise ShardFormatError(f"{path} is damaged: '{name}' declares {item.size:,} items, more than the "
                               f"{file_bytes:,}-byte file holds (imgprep verify)")


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
