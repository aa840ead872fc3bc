"""ILSVRC-2012 as downloaded: images read straight out of the archives, labels from the devkit.

    SRC/ILSVRC2012_img_train.tar        a tar of 1000 per-class tars, n01440764.tar ...
    SRC/ILSVRC2012_img_val.tar          50,000 flat JPEGs, ILSVRC2012_val_00000001.JPEG ...
    SRC/ILSVRC2012_devkit_t12.tar.gz    data/meta.mat, data/ILSVRC2012_validation_ground_truth.txt

Nothing is extracted. A scan reads only the tar headers and records where each member's bytes
lie (archive, offset, size); workers then read those bytes with one seek and one read. Member
names are keys, never paths: an image gets the key it would have in the extracted tree
(``train/<wnid>/<name>``, ``val/<name>``), so an archive and its extracted tree give
byte-identical shards; a name held twice keeps its last member, as extraction does, and the
earlier one is a reject.

Validation labels: the ground-truth file lists one ILSVRC2012_ID per validation image, in
file-name order; meta.mat maps ILSVRC2012_ID to WordNet id. Those ids are *not* our class
indices (sorted wnids, the torchvision convention): the wnid is the bridge.
"""

from __future__ import annotations

import io
import tarfile
import zlib
from pathlib import PurePosixPath

from prep.errors import SourceError
from prep.sources.common import (Dataset, Reject, file_in, is_source_file, is_utf8, label_flat_files, make_classes, printable,
                                 read_class_names, read_source_file, read_val_labels, source_root)
from prep.sources.tars import ArchiveReader, image_member_problem, last_of_each_name, list_members, open_archive, plain_names

TRAIN_TAR = "ILSVRC2012_img_train.tar"
VAL_TAR = "ILSVRC2012_img_val.tar"
DEVKIT = "ILSVRC2012_devkit_t12.tar.gz"
DEVKIT_HINT = f"download {DEVKIT} again, or remove it and give --val-labels FILE"


class _Window(io.RawIOBase):
    """bytes [start, start + size) of an open file, as a seekable file (an inner tar)."""

    def __init__(self, file, start: int, size: int):
        self.file, self.start, self.size, self.position = file, start, size, 0

    def readable(self):
        return True

    def seekable(self):
        return True

    def tell(self):
        return self.position

    def seek(self, offset, whence=io.SEEK_SET):
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.position, io.SEEK_END: self.size}[whence]
        self.position = max(0, min(self.size, base + offset))
        return self.position

    def readinto(self, buffer):
        count = min(len(buffer), self.size - self.position)
        self.file.seek(self.start + self.position)
        data = self.file.read(count)
        buffer[: len(data)] = data
        self.position += len(data)
        return len(data)


def is_ilsvrc_archive(root) -> bool:
    return is_source_file(file_in(root, TRAIN_TAR))


def scan_archives(root, val_labels=None) -> Dataset:
    """``root``: a folder, or a URL (each tar listed by streaming it forward once, the devkit
    downloaded; each image then read with one range request)."""
    root = source_root(root)
    train_tar, val_tar = file_in(root, TRAIN_TAR), file_in(root, VAL_TAR)
    index, rejects, items_by_wnid = {}, [], {}
    with open_archive(str(train_tar)) as f:
        try:
            _scan_train(f, index, rejects, items_by_wnid)
        except tarfile.TarError as error:
            raise SourceError(f"{train_tar} is not a readable tar: {error}") from None
    if not items_by_wnid:
        raise SourceError(f"{train_tar} holds no per-class tars (expected n01440764.tar ...)")
    devkit = _read_devkit(root)
    classes = make_classes(items_by_wnid, devkit["names"] if devkit else read_class_names(root), train_tar)
    label_of = {c.wnid: c.index for c in classes}
    splits = {"train": tuple(sorted((key, label_of[w]) for w, keys in items_by_wnid.items() for key in keys))}
    archives = {"train": str(train_tar)}
    if is_source_file(val_tar):
        archives["val"] = str(val_tar)
        splits["val"] = _scan_val(root, val_labels, devkit, classes, index, rejects)
    return Dataset(str(root), classes, splits, tuple(rejects), ArchiveReader(archives, index))


def _scan_train(f, index, rejects, items_by_wnid) -> None:
    """The training archive open in ``f``. Each per-class tar is listed when the outer listing
    reaches it (a tar in a bucket is read forward once); what it holds counts once the whole
    listing shows that no later member of the same name replaces it."""
    found = {}  # member -> (index, rejects, items_by_wnid) of that member alone
    for member in tarfile.open(fileobj=f, mode="r:"):
        if plain_names([member]):  # not the "./" folder
            found[member] = ({}, [], {})
            _index_class_tar(f, member, *found[member])
    for member in last_of_each_name(list(found), "train", "train/", rejects):
        its_index, its_rejects, its_items = found[member]
        index.update(its_index)
        rejects += its_rejects
        for wnid, keys in its_items.items():
            items_by_wnid.setdefault(wnid, []).extend(keys)


def _index_class_tar(f, member, index, rejects, items_by_wnid) -> None:
    """Record the images of one per-class tar inside the training archive."""
    name = PurePosixPath(member.name)
    if member.isdir():
        return
    if not member.isfile() or name.suffix != ".tar" or len(name.parts) != 1 or not is_utf8(member.name):
        rejects.append(Reject("train", f"train/{printable(member.name)}",
                              "not a per-class tar (n01440764.tar ...); not read"))
        return
    wnid = name.stem
    keys = items_by_wnid.setdefault(wnid, [])
    images, error = list_members(_Window(f, member.offset_data, member.size))  # those before any damage are kept
    for image in last_of_each_name(images, "train", f"train/{wnid}/", rejects):
        key = f"train/{wnid}/{printable(image.name)}"
        reason = image_member_problem(image, "a per-class tar")
        if reason:
            rejects.append(Reject("train", key, reason))
        else:
            index[key] = ("train", member.offset_data + image.offset_data, image.size)
            keys.append(key)
    if error is not None:
        rejects.append(Reject("train", f"train/{member.name}", f"unreadable per-class tar: {error}"))


def _scan_val(root, val_labels, devkit, classes, index, rejects) -> tuple:
    """The flat validation archive, labelled by --val-labels or by the devkit."""
    val_tar = file_in(root, VAL_TAR)
    members = []
    with open_archive(str(val_tar)) as f:
        try:
            listed = plain_names(tarfile.open(fileobj=f, mode="r:").getmembers())
            for member in last_of_each_name(listed, "val", "val/", rejects):
                key = f"val/{printable(member.name)}"
                reason = image_member_problem(member, "the validation tar") if not member.isdir() else None
                if reason:
                    rejects.append(Reject("val", key, reason))
                elif member.isfile():
                    index[key] = ("val", member.offset_data, member.size)
                    members.append(member.name)
        except tarfile.TarError as error:
            raise SourceError(f"{val_tar} is not a readable tar: {error}") from None
    members.sort()
    if val_labels is not None:
        labels = read_val_labels(val_labels)
        found = {m: labels.lookup(m) for m in members}  # m -> (wnid, why its labels conflict)
    elif devkit is not None:
        if len(devkit["ground_truth"]) != len(members):
            raise SourceError(f"the devkit's ground truth has {len(devkit['ground_truth'])} labels for "
                              f"{len(members)} images in {val_tar}")
        found = {m: (devkit["wnid_of_id"].get(i), None) for m, i in zip(members, devkit["ground_truth"])}
    else:
        raise SourceError(f"{val_tar} holds a flat validation set without labels: add {DEVKIT} to {root}, "
                          "or give --val-labels FILE")
    source = "the validation labels" if val_labels is not None else "the devkit"
    return label_flat_files("val", {f"val/{m}": found[m] for m in members}, classes, rejects, source,
                            "of the training archive")


def _read_devkit(root) -> dict | None:
    """{"names": wnid -> words, "wnid_of_id": ILSVRC2012_ID -> wnid, "ground_truth": [ids]} or None.

    A damaged devkit is one SourceError naming the file and what in it is wrong: scipy and
    tarfile each have many ways to say "not readable", none of them a sentence for a user.
    """
    path = file_in(root, DEVKIT)
    if not is_source_file(path):
        return None
    meta, truth = _devkit_members(path)
    synsets = _devkit_synsets(path, meta)
    try:
        ground_truth = [int(line) for line in truth.decode().split()]
    except (UnicodeDecodeError, ValueError) as error:
        raise SourceError(f"{path}: data/ILSVRC2012_validation_ground_truth.txt cannot be read ({error}); "
                          f"{DEVKIT_HINT}") from None
    return {**synsets, "ground_truth": ground_truth}


def _devkit_members(path) -> tuple[bytes, bytes]:
    """The bytes of meta.mat and of the validation ground truth (the devkit read whole: 2.5 MB)."""
    try:
        with tarfile.open(fileobj=io.BytesIO(read_source_file(path)), mode="r:gz") as devkit:
            files = {PurePosixPath(m.name).name: m for m in devkit.getmembers() if m.isfile()}
            missing = [n for n in ("meta.mat", "ILSVRC2012_validation_ground_truth.txt") if n not in files]
            if missing:
                raise SourceError(f"{path} has no {' or '.join(missing)}; add the ILSVRC2012 devkit, "
                                  "or give --val-labels FILE")
            meta = devkit.extractfile(files["meta.mat"]).read()
            truth = devkit.extractfile(files["ILSVRC2012_validation_ground_truth.txt"]).read()
    except (tarfile.TarError, OSError, EOFError, zlib.error) as error:  # EOFError: a truncated gzip
        raise SourceError(f"{path}: the archive cannot be read ({error or type(error).__name__}); "
                          f"{DEVKIT_HINT}") from None
    return meta, truth


def _devkit_synsets(path, meta: bytes) -> dict:
    """wnid -> words and ILSVRC2012_ID -> wnid of the leaf synsets (the 1000 classes) in meta.mat."""
    import scipy.io
    from scipy.io.matlab import MatReadError

    try:
        synsets = scipy.io.loadmat(io.BytesIO(meta), squeeze_me=True)["synsets"]
        leaves = [s for s in synsets if int(s["num_children"]) == 0]
        return {
            "names": {str(s["WNID"]): str(s["words"]) for s in leaves},
            "wnid_of_id": {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in leaves},
        }
    # empty, zero-filled, truncated, another format, a v7.3 (HDF5) file, or a table without our fields
    except (MatReadError, OSError, ValueError, zlib.error, NotImplementedError, TypeError, IndexError) as error:
        reason = str(error) or type(error).__name__
    except KeyError as error:
        reason = f"no {error} table or field"
    raise SourceError(f"{path}: data/meta.mat cannot be read ({reason}); {DEVKIT_HINT}")
