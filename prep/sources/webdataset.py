"""Webdataset tars (timm's ImageNet on the Hugging Face Hub), read in place.

    SRC/imagenet1k-train-0000.tar ...        any *-train-*.tar
    SRC/imagenet1k-validation-00.tar ...     any *-validation-*.tar or *-val-*.tar (the val split)

A webdataset tar holds samples: the members that share a key, the member's path up to the
first "." of its file name (``n01440764_10026.jpg``, ``n01440764_10026.cls`` and
``n01440764_10026.json`` are one sample, key ``n01440764_10026``). A sample here is one image
member (``.jpg``, ``.jpeg``, ``.png`` or ``.webp``) and its label in ``.cls``, the class index
as ASCII digits; other members (``.json``...) are not read. Like the ILSVRC archives, nothing
is extracted: the scan reads the tar headers and the tiny ``.cls`` members, and workers read
each image at its offset. An image's key is ``<tar file name>/<member name>``.

Classes are the integers 0 to the largest label. When that makes exactly ImageNet-1k's 1000,
their wnids are ImageNet-1k's (the labels follow the sorted wnids, as our class indices do);
otherwise a class's wnid is its index written in decimal. The samples' ``.json`` is not a
reliable source of class names (copies on the Hub hold a file name, label and size, and no
name), so names come only from a synset file in SRC, as for a tree.
"""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath

from prep.errors import SourceError
from prep.sources.common import MAX_CLASSES, Dataset, Reject, printable, read_class_names, source_root
from prep.sources.imagenet1k import numbered_classes
from prep.sources.tars import (ArchiveReader, holds_training_tars, last_of_each_name, list_members,
                               member_problem, open_archive, refuse_val_labels, split_files)

TAR_NAME = re.compile(r".+-(train|validation|val)-.+\.tar")
SPLIT_OF = {"train": "train", "validation": "val", "val": "val"}
IMAGE_FIELDS = ("jpg", "jpeg", "png", "webp")
LABEL_FIELD = "cls"
LABEL_TEXT = re.compile(rb"\s*(-?[0-9]+)\s*")  # ASCII digits only
MAX_LABEL_BYTES = 64  # a longer .cls is not a class index, and is not read


def tar_files(root) -> list[tuple[str, Path | str]]:
    """(split, path) of the webdataset tars directly in ``root``, sorted by name."""
    return split_files(root, _split_of)


def _split_of(name: str) -> str | None:
    match = TAR_NAME.fullmatch(name)
    return SPLIT_OF[match.group(1)] if match else None


def is_webdataset(root) -> bool:
    return holds_training_tars(root, tar_files(root))


def scan_webdataset(root, val_labels=None) -> Dataset:
    """``root``: a folder, or a URL (each tar listed, its labels read on the way, by streaming it
    once; each image then read with one range request)."""
    root = source_root(root)
    refuse_val_labels(root, val_labels, "its webdataset tars label every image (.cls)")
    index, rejects, splits, archives = {}, [], {}, {}
    for split, path in tar_files(root):
        name = str(path).rsplit("/", 1)[1]
        archives[name] = str(path)
        items = splits.setdefault(split, [])
        for key, (offset, size), label in _scan_tar(str(path), name, split, rejects):
            index[key] = (name, offset, size)
            items.append((key, label))
    labels = [label for items in splits.values() for _, label in items]
    if not labels:
        raise SourceError(f"no sample of the webdataset tars in {root} has both an image and a label (.cls)")
    classes = numbered_classes([str(i) for i in range(max(labels) + 1)], read_class_names(root), root)
    return Dataset(str(root), classes, {s: tuple(sorted(items)) for s, items in splits.items()}, tuple(rejects),
                   ArchiveReader(archives, index))


def _scan_tar(path: str, name: str, split: str, rejects: list):
    """Yield (key, (offset, size), label) for each usable sample of one tar (a file, or an
    object at a URL); the rest are rejects."""
    prefix = f"{name}/"
    labels: dict[int, bytes] = {}  # offset of a short .cls member's bytes -> those bytes

    def read_label(member) -> None:  # while the listing passes it: each tar is read forward once
        if member.size <= MAX_LABEL_BYTES and _field(member) == LABEL_FIELD:
            f.seek(member.offset_data)
            labels[member.offset_data] = f.read(member.size)

    with open_archive(path) as f:
        members, error = list_members(f, read_label)
        samples: dict[str, list] = {}  # sample key -> its members, in tar order
        for member in last_of_each_name(members, split, prefix, rejects):
            reason = None if member.isdir() else member_problem(member)
            if reason:
                rejects.append(Reject(split, prefix + printable(member.name), reason))
            elif not member.isdir():
                samples.setdefault(_sample_key(member.name), []).append(member)
        for sample, parts in samples.items():
            image, reason = _sample_image(parts)
            if reason is None:
                label, reason = _label(labels, [m for m in parts if _field(m) == LABEL_FIELD])
            if reason:
                rejects.append(Reject(split, prefix + (image.name if image else sample or parts[0].name), reason))
            else:
                yield prefix + image.name, (image.offset_data, image.size), label
    if error is not None:
        rejects.append(Reject(split, name, f"unreadable tar: {error}; the samples before the damage are read"))


def _sample_key(name: str) -> str:
    """A member's sample: its path up to the first "." of its file name (the webdataset key)."""
    folder, slash, file = name.rpartition("/")
    return folder + slash + file.partition(".")[0]


def _field(member) -> str:
    """What a member is to its sample: its file name after the first ".", in lower case."""
    return PurePosixPath(member.name).name.partition(".")[2].lower()


def _sample_image(parts: list) -> tuple[object, str | None]:
    """(the sample's image member, None), or (None, why the sample has no usable image)."""
    images = [m for m in parts if _field(m) in IMAGE_FIELDS]
    if not images:
        return None, "a sample without an image (no .jpg, .jpeg, .png or .webp member)"
    if len(images) > 1:
        names = " and ".join(PurePosixPath(m.name).name for m in images)
        return None, f"two images in one sample ({names}): which one the label is for is unknown"
    return images[0], None


def _label(labels: dict[int, bytes], members: list) -> tuple[int | None, str | None]:
    """(label, None) from a sample's .cls member (its bytes in ``labels`` by offset, when short
    enough to be read), or (None, why)."""
    if len(members) != 1:
        return None, "two .cls members in one sample" if members else "no label: the sample has no .cls member"
    member = members[0]
    data = labels.get(member.offset_data, b"")
    match = LABEL_TEXT.fullmatch(data) if len(data) == member.size else None
    if match is None:
        shown = repr(data) if member.size <= MAX_LABEL_BYTES else f"{member.size:,} bytes"
        return None, f"the .cls member is not an integer: {shown}"
    label = int(match.group(1))
    if label < 0:
        return None, f"label {label} in the .cls member is negative"
    if label >= MAX_CLASSES:
        return None, f"label {label} in the .cls member is over {MAX_CLASSES - 1}, the largest int16 label"
    return label, None
