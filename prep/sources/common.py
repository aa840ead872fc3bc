"""What every source layout shares: the types a scan returns, names and checks of files, class
lists, validation label files, and the loop that labels a flat validation set.

A layout module scans its source without opening an image and returns a ``Dataset``: classes in
index order, per split the (key, label) pairs sorted by key, the rejects with their reasons, and
a picklable ``reader`` (a ``SourceReader``) whose ``read(key, max_bytes)`` returns one image's
bytes in a worker.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from prep.errors import SourceError

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
)
NAME_FILES = ("LOC_synset_mapping.txt", "synset_words.txt", "words.txt")
MAX_CLASSES = 32767  # labels are stored as int16
SPLITS = ("train", "val")


@dataclass(frozen=True)
class ClassInfo:
    index: int
    wnid: str
    name: str


@dataclass(frozen=True)
class Reject:
    split: str
    path: str  # relative to the source root, '/'-separated
    reason: str


class SourceReader(Protocol):
    """How the shard job reads a layout's images. Pickled to each worker, so it holds no open
    file (or drops it in ``__getstate__``)."""

    def read(self, key: str, max_bytes: int) -> bytes:
        """The bytes of image ``key`` (a key of the scan); ``BadImage`` if it cannot be read or
        is larger than ``max_bytes`` (refused before it is read whole)."""

    def unit(self, key: str) -> str | None:
        """The unit read together with ``key`` (a parquet row group), which the plan keeps in
        one or two shards; None: images are read one by one."""

    def prepare(self, journal: Path, workers: int, progress: bool) -> None:
        """Work before any image is read, under the output folder's lock (gzip'd tars are
        decompressed into ``journal``, removed when the run completes)."""


class ReadsImagesAlone:
    """The ``unit`` and ``prepare`` of a reader that reads each image by itself and needs no
    preparation (a tree's files, a tar's members)."""

    def unit(self, key: str) -> str | None:
        return None

    def prepare(self, journal: Path, workers: int, progress: bool) -> None:
        return None


@dataclass(frozen=True)
class Dataset:
    """What a source holds: classes, and per split the (key, label) pairs sorted by key."""

    root: str
    classes: tuple[ClassInfo, ...]
    splits: dict[str, tuple[tuple[str, int], ...]]
    rejects: tuple[Reject, ...] = field(default=())
    reader: SourceReader | None = None


def make_classes(wnids, names: dict[str, str], where) -> tuple[ClassInfo, ...]:
    """Classes in index order from the sorted ``wnids`` (for ImageNet: index 0 = n01440764, the
    torchvision convention); ``where`` names the source in errors."""
    wnids = sorted(wnids)
    if not wnids:
        raise SourceError(f"{where} has no classes")
    if len(wnids) > MAX_CLASSES:
        raise SourceError(f"{where} has {len(wnids)} classes; at most {MAX_CLASSES} fit int16 labels")
    return tuple(ClassInfo(i, w, names.get(w, "")) for i, w in enumerate(wnids))


def file_too_large(size: int, max_bytes: int) -> str:
    return f"file too large: {size:,} bytes, over the cap of {max_bytes:,}"


def open_regular(path: str):
    """``path`` opened for reading, if it is (still) a regular file; else BadImage. Opened without
    blocking: a FIFO put in a file's place after the scan would block a plain open for ever."""
    import stat

    from prep.errors import BadImage

    f = open(os.open(path, os.O_RDONLY | os.O_NONBLOCK), "rb")
    if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
        f.close()
        raise BadImage("not a regular file")
    return f


def is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def not_an_image(name: str) -> str:
    ext = os.path.splitext(name)[1]
    return f"not an image file (extension '{ext}')" if ext else "not an image file (no extension)"


def is_utf8(name: str) -> bool:
    """False for a name holding bytes that are not UTF-8 (Python keeps them as lone surrogates):
    keys are UTF-8 strings in the shards, in the plan's hashes and in rejects.jsonl."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def printable(name: str) -> str:
    """``name`` as valid UTF-8 text for keys and reasons: a byte that is not UTF-8 is written as a
    backslash escape, so the name b"bad\\xff.JPEG" reads bad\\xff.JPEG."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def source_root(root) -> Path | str:
    """A source given on the command line: a URL without its trailing slash, or the absolute
    path of a folder."""
    from prep.remote import as_url

    return as_url(str(root)) or Path(root).expanduser().resolve()


def file_in(root, name: str) -> Path | str:
    """File ``name`` directly in ``root``: a path, or the object's URL in a bucket's folder."""
    from prep.remote import is_url

    return f"{root}/{name}" if is_url(str(root)) else Path(root) / name


def is_source_file(where) -> bool:
    """A regular file, or an object in its folder's one listing (``prep.remote.folder_at``)."""
    from prep.remote import is_url, object_at

    if is_url(where):
        remote, name = object_at(where)
        return name in remote.listed()
    return Path(where).is_file()


def read_source_file(where) -> bytes:
    """The whole of a small file or object (a devkit, a synset list)."""
    from prep.remote import is_url, object_at

    if is_url(where):
        remote, name = object_at(where)
        return remote.read_bytes(name)
    return Path(where).read_bytes()


def read_class_names(root) -> dict[str, str]:
    """wnid -> human-readable name from the first synset file found in ``root`` (a folder or a URL)."""
    for name in NAME_FILES:
        where = file_in(root, name)
        if is_source_file(where):
            return parse_class_names(read_source_file(where).decode("utf-8", "replace"))
    return {}


def parse_class_names(text: str) -> dict[str, str]:
    """wnid -> name from a synset file's lines 'wnid name, other name'."""
    names = {}
    for line in text.splitlines():
        parts = line.strip().split(None, 1)
        if parts:
            names[parts[0]] = parts[1].strip() if len(parts) > 1 else ""
    return names


class ValLabels(dict):
    """File name (with and without extension) -> wnid, from a validation labels file.

    ``conflicts`` maps each name the file gives two or more different wnids to those wnids:
    such a file has no trustworthy label, and taking the last line would hide the mistake.
    """

    def __init__(self):
        super().__init__()
        self.conflicts: dict[str, tuple[str, ...]] = {}

    def lookup(self, name: str) -> tuple[str | None, str | None]:
        """(wnid or None when unlabelled, None) or (None, why the labels conflict)."""
        for candidate in (name, os.path.splitext(name)[0]):
            if candidate in self.conflicts:
                wnids = " and ".join(self.conflicts[candidate])
                return None, f"conflicting labels for this file in the validation labels: {wnids}"
            if candidate in self:
                return self[candidate], None
        return None, None


def read_val_labels(path: str | os.PathLike) -> ValLabels:
    """Map validation file name (with and without extension) -> wnid, from a file or an object.

    Accepts whitespace-separated ``filename wnid`` lines or a CSV whose first two columns are
    the file name and a field starting with the wnid (Kaggle's ``LOC_val_solution.csv`` puts
    boxes after it). A header line does no harm: no image is named like its first field.
    The same line twice is harmless; one name with two different wnids goes to ``conflicts``.
    """
    from prep.remote import is_url, object_at

    if is_url(str(path)):  # an object: one request, no listing of its folder
        remote, name = object_at(str(path))
        data = remote.read_optional(name)
        if data is None:
            raise SourceError(f"validation labels file {path} does not exist")
        text = data.decode("utf-8", "replace")
    else:
        path = Path(path).expanduser()
        if not path.is_file():
            raise SourceError(f"validation labels file {path} does not exist")
        text = path.read_text(encoding="utf-8", errors="replace")
    rows = csv.reader(text.splitlines()) if "," in text.split("\n", 1)[0] else (
        line.split() for line in text.splitlines()
    )
    given: dict[str, list[str]] = {}  # file name -> its distinct wnids, in file order
    for row in rows:
        if len(row) < 2 or not row[1].split():
            continue
        wnids = given.setdefault(row[0].strip(), [])
        if row[1].split()[0] not in wnids:
            wnids.append(row[1].split()[0])
    if not given:
        raise SourceError(f"{path} has no 'filename wnid' lines")
    labels = ValLabels()
    for filename, wnids in given.items():
        if len(wnids) > 1:
            labels.conflicts[filename] = tuple(wnids)
        else:
            labels[filename] = wnids[0]
    for filename, wnids in given.items():  # then names without extension, never over one given as such
        stem = os.path.splitext(filename)[0]
        if len(wnids) == 1 and stem not in given:
            labels.setdefault(stem, wnids[0])
    return labels


def class_items(split: str, folder: str, keys, label: int | None, rejects: list[Reject]) -> list[tuple[str, int]]:
    """(key, label) of the image files ``keys`` of class folder ``folder`` (label None: a folder
    that is no class of train/); the other keys become rejects saying why."""
    items = []
    for key in keys:
        if not is_image_name(key):
            rejects.append(Reject(split, key, not_an_image(key)))
        elif label is None:
            rejects.append(Reject(split, key, f"class folder '{folder}' is not in train/"))
        else:
            items.append((key, label))
    return items


def label_flat_files(split: str, found: dict, classes: tuple[ClassInfo, ...], rejects: list[Reject],
                     labels_from: str, not_a_class: str) -> tuple[tuple[str, int], ...]:
    """(key, label) pairs sorted by key for a flat validation set whose labels come from a file.

    ``found`` maps each key to (wnid or None, why its labels conflict or None); keys without a
    usable label become rejects saying why: ``labels_from`` names where the labels come from
    ("the validation labels"), ``not_a_class`` ends the sentence for a wnid that is not a
    training class ("in train/").
    """
    index = {c.wnid: c.index for c in classes}
    items = []
    for key in sorted(found):
        wnid, conflict = found[key]
        if conflict:
            rejects.append(Reject(split, key, conflict))
        elif wnid is None:
            rejects.append(Reject(split, key, f"no label for this file in {labels_from}"))
        elif wnid not in index:
            rejects.append(Reject(split, key, f"label '{wnid}' is not a class {not_a_class}"))
        else:
            items.append((key, index[wnid]))
    return tuple(items)
