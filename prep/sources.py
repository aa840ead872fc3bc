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
extension is not an image's, or that sit outside a class folder, become rejects.
"""

from __future__ import annotations

import csv
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
            data = f.read(max_bytes + 1)
            if status.st_size > max_bytes or len(data) > max_bytes:
                raise BadImage(f"file too large: over {max_bytes:,} bytes")
            return data


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
    wnids = sorted(entry.name for entry in os.scandir(train_dir) if entry.is_dir())
    if not wnids:
        raise SourceError(f"{train_dir} has no class folders (expected {train_dir}/<class>/<images>)")
    if len(wnids) > MAX_CLASSES:
        raise SourceError(f"{train_dir} has {len(wnids)} classes; at most {MAX_CLASSES} fit int16 labels")
    names = read_class_names(Path(names_root) if names_root else root)
    classes = tuple(ClassInfo(i, w, names.get(w, "")) for i, w in enumerate(wnids))
    index = {c.wnid: c.index for c in classes}

    rejects: list[Reject] = []
    splits = {"train": _scan_class_folders(root, "train", index, rejects)}
    val_dir = root / "val"
    if val_labels is not None and not val_dir.is_dir():
        raise SourceError(f"--val-labels was given but {root} has no val/ folder")
    if val_dir.is_dir():
        if val_labels is not None:
            labels = read_val_labels(val_labels)
            splits["val"] = _scan_flat_folder(root, "val", labels, index, rejects)
        elif any(entry.is_dir() for entry in os.scandir(val_dir)):
            splits["val"] = _scan_class_folders(root, "val", index, rejects)
        elif any(is_image_name(e.name) for e in os.scandir(val_dir)):
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


def read_val_labels(path: str | os.PathLike) -> dict[str, str]:
    """Map validation file name (with and without extension) -> wnid.

    Accepts whitespace-separated ``filename wnid`` lines or a CSV whose first two columns are
    the file name and a field starting with the wnid (Kaggle's ``LOC_val_solution.csv`` puts
    boxes after it). A header line does no harm: no image is named like its first field.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise SourceError(f"validation labels file {path} does not exist")
    text = path.read_text(encoding="utf-8", errors="replace")
    rows = csv.reader(text.splitlines()) if "," in text.split("\n", 1)[0] else (
        line.split() for line in text.splitlines()
    )
    labels: dict[str, str] = {}
    for row in rows:
        if len(row) < 2 or not row[1].split():
            continue
        filename, wnid = row[0].strip(), row[1].split()[0]
        labels[filename] = wnid
        labels.setdefault(os.path.splitext(filename)[0], wnid)
    if not labels:
        raise SourceError(f"{path} has no 'filename wnid' lines")
    return labels


def is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _extension_reason(name: str) -> str:
    ext = os.path.splitext(name)[1]
    return f"not an image file (extension '{ext}')" if ext else "not an image file (no extension)"


def _walk_files(folder: Path, root: Path, split: str, rejects: list[Reject]):
    """Yield '/'-separated paths relative to ``root`` of the regular files below ``folder``,
    sorted. Anything else (a device, a pipe, a broken link, an unreadable folder) is a reject:
    reading /dev/zero or a FIFO named .JPEG would never end."""
    rel = folder.relative_to(root).as_posix()
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError as error:
        rejects.append(Reject(split, rel, f"unreadable folder: {error.strerror or error}"))
        return
    for entry in entries:
        if entry.is_dir(follow_symlinks=False):
            yield from _walk_files(Path(entry.path), root, split, rejects)
        elif entry.is_file():  # follows links: a link to a regular file is one
            yield f"{rel}/{entry.name}"
        else:
            rejects.append(Reject(split, f"{rel}/{entry.name}", "not a regular file (device, pipe, socket or "
                                                               "broken link)"))


def _scan_class_folders(root: Path, split: str, index: dict[str, int], rejects: list[Reject]):
    items = []
    for entry in sorted(os.scandir(root / split), key=lambda e: e.name):
        if not entry.is_dir():
            rejects.append(Reject(split, f"{split}/{entry.name}", "not inside a class folder"))
            continue
        label = index.get(entry.name)
        for key in _walk_files(Path(entry.path), root, split, rejects):
            if not is_image_name(key):
                rejects.append(Reject(split, key, _extension_reason(key)))
            elif label is None:
                rejects.append(Reject(split, key, f"class folder '{entry.name}' is not in train/"))
            else:
                items.append((key, label))
    return tuple(items)


def _scan_flat_folder(root, split, labels: dict[str, str], index: dict[str, int], rejects):
    items = []
    for key in _walk_files(root / split, root, split, rejects):
        name = key.split("/", 1)[1]
        wnid = labels.get(name) or labels.get(os.path.splitext(name)[0])
        if not is_image_name(key):
            rejects.append(Reject(split, key, _extension_reason(key)))
        elif wnid is None:
            rejects.append(Reject(split, key, "no label for this file in the validation labels"))
        elif wnid not in index:
            rejects.append(Reject(split, key, f"label '{wnid}' is not a class in train/"))
        else:
            items.append((key, index[wnid]))
    return tuple(items)
