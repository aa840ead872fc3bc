"""Extracted trees: a folder per class, and Kaggle's ILSVRC layout.

    SRC/train/<wnid>/<image>          one folder per class; the class list comes from here
    SRC/val/<wnid>/<image>            the same layout for validation, or
    SRC/val/<image> + --val-labels F  a flat folder with a file of "filename wnid" lines (or CSV)
    SRC/LOC_synset_mapping.txt        optional "wnid name" lines (also synset_words.txt, words.txt)

Kaggle's download is the same tree under ``SRC/ILSVRC/Data/CLS-LOC`` with the validation labels
in ``SRC/LOC_val_solution.csv``, on disk or in a bucket (``s3://bucket/kaggle``).

Class indices follow the sorted folder names of ``train/``. Nothing here opens an image: files
whose extension is not an image's, or that sit outside a class folder, become rejects, and so do
names that are not UTF-8 (keys are UTF-8 text) and links that loop or lead to a folder.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from prep.errors import BadImage, SourceError
from prep.remote import folder_at, is_url
from prep.sources.common import (Dataset, class_items, ReadsImagesAlone, Reject, file_in, file_too_large, is_image_name,
                                 is_source_file, is_utf8, label_flat_files, make_classes, not_an_image, open_regular,
                                 printable, read_class_names, read_val_labels)

NOT_REGULAR = "not a regular file (device, pipe, socket or broken link)"


@dataclass(frozen=True)
class TreeReader(ReadsImagesAlone):
    """Reads the bytes of one image of an extracted tree; picklable, so workers get their own."""

    root: str

    def read(self, key: str, max_bytes: int) -> bytes:
        """``key`` comes from our own scan, never from user input, so joining it is safe. The
        file may have changed since the scan: it must still be regular, and at most
        ``max_bytes`` are read."""
        with open_regular(os.path.join(self.root, key)) as f:
            status = os.fstat(f.fileno())
            # The size first: a sparse 10 GB file costs nothing to stat and a lot to read.
            if status.st_size > max_bytes:
                raise BadImage(file_too_large(status.st_size, max_bytes))
            data = f.read(max_bytes + 1)  # + 1: a file still growing is caught too
            if len(data) > max_bytes:
                raise BadImage(f"file too large: it grew past the cap of {max_bytes:,} bytes while read")
            return data


KAGGLE_TREE = "ILSVRC/Data/CLS-LOC"  # Kaggle's extracted tree, inside its download's folder


def is_kaggle(root) -> bool:
    """Kaggle's ILSVRC folder on disk, or in a bucket (its one listing)."""
    if is_url(str(root)):
        return any(name.startswith(KAGGLE_TREE + "/train/") for name in folder_at(str(root)).listed())
    return (Path(root) / KAGGLE_TREE / "train").is_dir()


def scan_kaggle(root, val_labels=None) -> Dataset:
    """Kaggle's ILSVRC folder: the tree under ILSVRC/Data/CLS-LOC, labels and names beside it.
    In a bucket the tree is read as ``bucket_tree`` reads one, from the same listing."""
    tree, solution = file_in(root, KAGGLE_TREE), file_in(root, "LOC_val_solution.csv")
    if is_url(str(root)):
        from prep.sources.bucket_tree import scan_bucket_tree

        has_val = any(name.startswith(KAGGLE_TREE + "/val/") for name in folder_at(str(root)).listed())
        if val_labels is None and has_val and is_source_file(solution):
            val_labels = solution
        return scan_bucket_tree(tree, val_labels, names_root=root)
    if val_labels is None and solution.is_file() and (tree / "val").is_dir():
        val_labels = solution
    return scan_tree(tree, val_labels, names_root=root)


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
    if not train_folders:
        raise SourceError(f"{train_dir} has no class folders (expected {train_dir}/<class>/<images>)")
    classes = make_classes(train_folders, read_class_names(Path(names_root) if names_root else root), train_dir)
    index = {c.wnid: c.index for c in classes}

    splits = {"train": _scan_class_folders(root, "train", train_folders, index, rejects)}
    if splits["train"]:  # with no image at all, that is the error said below
        _refuse_empty_classes(train_dir, classes, splits["train"])
    val_dir = root / "val"
    if val_labels is not None and not val_dir.is_dir():
        raise SourceError(f"--val-labels was given but {root} has no val/ folder")
    if val_dir.is_dir():
        entries = _list_folder(val_dir)
        if val_labels is not None:
            labels = read_val_labels(val_labels)
            splits["val"] = _scan_flat_folder(root, "val", labels, classes, rejects)
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


def _refuse_empty_classes(train_dir: Path, classes, items) -> None:
    """A class folder without one image would still be a class and shift every label after it
    (published weights would then be scored against the wrong classes): refused, as
    torchvision's ImageFolder refuses it, naming the folders."""
    used = {label for _, label in items}
    empty = [c.wnid for c in classes if c.index not in used]
    if empty:
        shown = ", ".join(printable(name) for name in empty[:3]) + (f" and {len(empty) - 3} more" if len(empty) > 3 else "")
        raise SourceError(f"{train_dir} has class folders without images ({shown}): each would still take a label "
                          "and shift those after it; remove them, add their images, or, if one holds "
                          "imgprep's own output, put --out outside the source")


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
        elif entry.name.startswith("."):
            # .ipynb_checkpoints, .git, .Trash: taken as a class, it would shift every label after it.
            rejects.append(Reject(split, key, "a hidden folder, not a class; its files are not read"))
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
        items += class_items(split, name, _walk_files(folder, root, split, rejects), index.get(name), rejects)
    return tuple(items)


def _scan_flat_folder(root, split, labels, classes, rejects):
    found = {}
    for key in _walk_files(root / split, root, split, rejects):
        if is_image_name(key):
            found[key] = labels.lookup(key.split("/", 1)[1])
        else:
            rejects.append(Reject(split, key, not_an_image(key)))
    return label_flat_files(split, found, classes, rejects, "the validation labels", "in train/")
