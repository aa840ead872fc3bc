"""Find the images of a source dataset and their labels.

Layouts understood (SRC is the folder given to ``imgprep shard``); the ILSVRC-2012 archives
(``prep.archives``) and Kaggle's ``SRC/ILSVRC/Data/CLS-LOC`` folder with
``SRC/LOC_val_solution.csv`` are recognised too::

    SRC/train/<wnid>/<image>          one folder per class; the class list comes from here
    SRC/val/<wnid>/<image>            the same layout for validation, or
    SRC/val/<image> + --val-labels F  a flat folder with a file of "filename wnid" lines (or CSV)
    SRC/LOC_synset_mapping.txt        optional "wnid name" lines (also synset_words.txt, words.txt)

Class indices follow the sorted folder names of ``train/`` (for ImageNet: sorted WordNet ids,
index 0 = n01440764, the torchvision convention). Nothing here opens an image: files whose
extension is not an image's, or that sit outside a class folder, become rejects, and so do
names that are not UTF-8 (keys are UTF-8 text) and links that loop or lead to a folder.
"""

from __future__ import annotations

import csv
import errno
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from prep.errors import BadImage, SourceError

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
)
NAME_FILES = ("LOC_synset_mapping.txt", "synset_words.txt", "words.txt")
MAX_CLASSES = 32767  # labels are stored as int16
SPLITS = ("train", "val")
NOT_REGULAR = "not a regular file (device, pipe, socket or broken link)"


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


@dataclass(frozen=True)
class TreeReader:
    """Reads the bytes of one image of an extracted tree; picklable, so workers get their own."""

    root: str

    def read(self, key: str, max_bytes: int) -> bytes:
        """``key`` comes from our own scan, never from user input, so joining it is safe. The
        file may have changed since the scan: it must still be regular, and at most
        ``max_bytes`` are read."""
        with open(os.path.join(self.root, key), "rb") as f:
            status = os.fstat(f.fileno())
            if not stat.S_ISREG(status.st_mode):
                raise BadImage("not a regular file")
            # The size first: a sparse 10 GB file costs nothing to stat and a lot to read.
            if status.st_size > max_bytes:
                raise BadImage(file_too_large(status.st_size, max_bytes))
            data = f.read(max_bytes + 1)  # + 1: a file still growing is caught too
            if len(data) > max_bytes:
                raise BadImage(f"file too large: it grew past the cap of {max_bytes:,} bytes while read")
            return data


def file_too_large(size: int, max_bytes: int) -> str:
    return f"file too large: {size:,} bytes, over the cap of {max_bytes:,}"


@dataclass(frozen=True)
class Dataset:
    """What a source holds: classes, and per split the (key, label) pairs sorted by key."""

    root: str
    classes: tuple[ClassInfo, ...]
    splits: dict[str, tuple[tuple[str, int], ...]]
    rejects: tuple[Reject, ...] = field(default=())
    reader: TreeReader | None = None

    @property
    def wnid_to_index(self) -> dict[str, int]:
        return {c.wnid: c.index for c in self.classes}


def scan_source(root: str | os.PathLike, val_labels: str | os.PathLike | None = None) -> Dataset:
    """Any layout we know: the ILSVRC-2012 archives, Kaggle's ILSVRC folder, or a plain tree."""
    root = Path(root).expanduser()
    from prep.archives import is_ilsvrc_archive, scan_archives

    if is_ilsvrc_archive(root):
        return scan_archives(root, val_labels)
    kaggle = root / "ILSVRC" / "Data" / "CLS-LOC"
    if (kaggle / "train").is_dir():
        solution = root / "LOC_val_solution.csv"
        if val_labels is None and solution.is_file() and (kaggle / "val").is_dir():
            val_labels = solution
        return scan_tree(kaggle, val_labels, names_root=root)
    return scan_tree(root, val_labels)


def scan_tree(root: str | os.PathLike, val_labels: str | os.PathLike | None = None,
              names_root: str | os.PathLike | None = None) -> Dataset:
    """Scan an extracted ImageNet-style tree; raises SourceError when the layout is unusable.

    ``names_root`` is where to look for the synset-names file, when not in ``root`` (Kaggle).
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise SourceError(f"source folder {root} does not exist or is not a folder")
    root = root.resolve()
    train_dir = root / "train"
    if not train_dir.is_dir():
        raise SourceError(f"{root} has no train/ folder (expected {root}/train/<class>/<images>)")
    rejects: list[Reject] = []
    train_folders = _class_folders(train_dir, "train", rejects)
    wnids = sorted(train_folders)
    if not wnids:
        raise SourceError(f"{train_dir} has no class folders (expected {train_dir}/<class>/<images>)")
    if len(wnids) > MAX_CLASSES:
        raise SourceError(f"{train_dir} has {len(wnids)} classes; at most {MAX_CLASSES} fit int16 labels")
    names = read_class_names(Path(names_root) if names_root else root)
    classes = tuple(ClassInfo(i, w, names.get(w, "")) for i, w in enumerate(wnids))
    index = {c.wnid: c.index for c in classes}

    splits = {"train": _scan_class_folders(root, "train", train_folders, index, rejects)}
    val_dir = root / "val"
    if val_labels is not None and not val_dir.is_dir():
        raise SourceError(f"--val-labels was given but {root} has no val/ folder")
    if val_dir.is_dir():
        entries = _list_folder(val_dir)
        if val_labels is not None:
            labels = read_val_labels(val_labels)
            splits["val"] = _scan_flat_folder(root, "val", labels, index, rejects)
        elif any(_kind(entry)[0] in ("folder", "folder link") for entry in entries):
            splits["val"] = _scan_class_folders(root, "val", _class_folders(val_dir, "val", rejects), index, rejects)
        elif any(is_image_name(entry.name) for entry in entries):
            raise SourceError(
                f"{val_dir} holds images but no class folders: give --val-labels FILE "
                "(lines 'filename wnid', or a CSV with those two columns)"
            )
    if not any(splits.values()):
        raise SourceError(f"no image files found under {root}")
    return Dataset(str(root), classes, splits, tuple(rejects), TreeReader(str(root)))


def read_class_names(root: Path) -> dict[str, str]:
    """wnid -> human-readable name from the first synset file found in ``root``."""
    for name in NAME_FILES:
        path = root / name
        if path.is_file():
            names = {}
            for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
                parts = line.strip().split(None, 1)
                if parts:
                    names[parts[0]] = parts[1].strip() if len(parts) > 1 else ""
            return names
    return {}


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
    """Map validation file name (with and without extension) -> wnid.

    Accepts whitespace-separated ``filename wnid`` lines or a CSV whose first two columns are
    the file name and a field starting with the wnid (Kaggle's ``LOC_val_solution.csv`` puts
    boxes after it). A header line does no harm: no image is named like its first field.
    The same line twice is harmless; one name with two different wnids goes to ``conflicts``.
    """
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


def is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


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


def _extension_reason(name: str) -> str:
    ext = os.path.splitext(name)[1]
    return f"not an image file (extension '{ext}')" if ext else "not an image file (no extension)"


def _name_reason(kind: str) -> str:
    if kind in ("folder", "folder link"):
        return "folder name is not valid UTF-8; its files are not read"
    return "file name is not valid UTF-8"


def _list_folder(folder: Path) -> list[os.DirEntry]:
    """The entries of a top-level folder (train/, val/), sorted by name."""
    try:
        return sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError as error:
        raise SourceError(f"cannot read {folder}: {error.strerror or error}") from None


def _kind(entry: os.DirEntry) -> tuple[str, str]:
    """("file" | "folder" | "folder link", "") for an entry we can use, else ("reject", why).

    A link to a regular file is a file. Links to folders are told apart: callers choose whether
    to follow them. A link that cannot be followed (a loop, a missing target) is a reject, never
    an exception: one bad entry must not stop the scan of a million good ones.
    """
    try:
        if entry.is_symlink():
            mode = entry.stat().st_mode  # follows the link
            if stat.S_ISDIR(mode):
                return "folder link", ""
            return ("file", "") if stat.S_ISREG(mode) else ("reject", NOT_REGULAR)
        if entry.is_dir(follow_symlinks=False):
            return "folder", ""
        return ("file", "") if entry.is_file(follow_symlinks=False) else ("reject", NOT_REGULAR)
    except OSError as error:
        if error.errno == errno.ELOOP:
            return "reject", "symlink loop"
        if error.errno == errno.ENOENT:  # a link to nothing
            return "reject", NOT_REGULAR
        return "reject", f"cannot be read: {error.strerror or error}"


def _class_folders(split_dir: Path, split: str, rejects: list[Reject]) -> dict[str, Path]:
    """Class name -> folder, for the class folders of ``split_dir``; anything else is a reject.

    Links to folders are followed here (a class may live on another disk), except links to
    ``split_dir`` or above it: a class holding the whole split would read every image twice.
    """
    folders = {}
    for entry in _list_folder(split_dir):
        key = f"{split}/{printable(entry.name)}"
        kind, reason = _kind(entry)
        if kind == "reject":
            rejects.append(Reject(split, key, reason))
        elif kind == "file":
            rejects.append(Reject(split, key, "not inside a class folder"))
        elif not is_utf8(entry.name):
            rejects.append(Reject(split, key, _name_reason(kind)))
        elif kind == "folder link" and _is_at_or_above(Path(os.path.realpath(entry.path)), split_dir):
            rejects.append(Reject(split, key, "a link to a folder above it (a cycle)"))
        else:
            folders[entry.name] = Path(entry.path)
    return folders


def _is_at_or_above(target: Path, folder: Path) -> bool:
    folder = folder.resolve()
    return target == folder or target in folder.parents


def _walk_files(folder: Path, root: Path, split: str, rejects: list[Reject]):
    """Yield '/'-separated paths relative to ``root`` of the regular files below ``folder``,
    sorted. Anything else (a device, a pipe, a broken link, a link loop, an unreadable folder, a
    name that is not UTF-8) is a reject: reading /dev/zero or a FIFO named .JPEG would never end.
    Links to folders are not followed, so no cycle of links can make the walk endless."""
    rel = folder.relative_to(root).as_posix()
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError as error:
        rejects.append(Reject(split, rel, f"unreadable folder: {error.strerror or error}"))
        return
    for entry in entries:
        key = f"{rel}/{printable(entry.name)}"
        kind, reason = _kind(entry)
        if kind == "reject":
            rejects.append(Reject(split, key, reason))
        elif not is_utf8(entry.name):
            rejects.append(Reject(split, key, _name_reason(kind)))
        elif kind == "folder":
            yield from _walk_files(Path(entry.path), root, split, rejects)
        elif kind == "folder link":
            rejects.append(Reject(split, key, "a link to a folder; not followed"))
        else:
            yield key


def _scan_class_folders(root: Path, split: str, folders: dict[str, Path], index: dict[str, int],
                        rejects: list[Reject]):
    items = []
    for name, folder in sorted(folders.items()):
        label = index.get(name)
        for key in _walk_files(folder, root, split, rejects):
            if not is_image_name(key):
                rejects.append(Reject(split, key, _extension_reason(key)))
            elif label is None:
                rejects.append(Reject(split, key, f"class folder '{name}' is not in train/"))
            else:
                items.append((key, label))
    return tuple(items)


def _scan_flat_folder(root, split, labels: ValLabels, index: dict[str, int], rejects):
    items = []
    for key in _walk_files(root / split, root, split, rejects):
        wnid, conflict = labels.lookup(key.split("/", 1)[1])
        if not is_image_name(key):
            rejects.append(Reject(split, key, _extension_reason(key)))
        elif conflict:
            rejects.append(Reject(split, key, conflict))
        elif wnid is None:
            rejects.append(Reject(split, key, "no label for this file in the validation labels"))
        elif wnid not in index:
            rejects.append(Reject(split, key, f"label '{wnid}' is not a class in train/"))
        else:
            items.append((key, index[wnid]))
    return tuple(items)
