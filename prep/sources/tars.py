"""What the tar layouts share (ILSVRC-2012, webdataset, Hugging Face's archives): reading one
member's bytes at the offset a scan recorded, listing members up to any damage, keeping the
last of two members of one name, and the checks a member passes before its bytes are read.

A tar is a run of 512-byte headers, each followed by its member's bytes. Once a scan has read
the headers, one seek and one read give any member's bytes: nothing is ever extracted, and
member names are only checked and used in keys, never as paths.
"""

from __future__ import annotations

import os
import tarfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from prep.errors import BadImage, SourceError
from prep.remote import folder_at, image_bytes, is_url, object_at
from prep.sources.common import ReadsImagesAlone, Reject, file_too_large, is_image_name, is_utf8, not_an_image, open_regular, printable

DUPLICATE = "duplicate member name: a later member of the same name replaces this one"
NOT_REGULAR = "not a regular file (link, device or sparse file)"


@dataclass(frozen=True)
class ArchiveReader(ReadsImagesAlone):
    """Reads one image from its tar by the offset the scan recorded; picklable."""

    archives: dict  # archive name -> absolute path of the (uncompressed) tar
    index: dict  # key -> (archive name, byte offset of the member's data, size in bytes)

    def read(self, key: str, max_bytes: int) -> bytes:
        archive, offset, size = self.index[key]
        if size > max_bytes:  # refused before reading a byte of it
            raise BadImage(file_too_large(size, max_bytes))
        where = self.archives[archive]
        if is_url(where):  # a tar in a bucket: one range request
            data = image_bytes(*object_at(where), offset, offset + size)
        else:
            with open_regular(where) as f:
                f.seek(offset)
                data = f.read(size)
        if len(data) < size:  # the tar was cut short after its header was read
            raise BadImage(f"truncated: the archive ends {size - len(data):,} bytes before the end of this file")
        return data


def open_archive(where: str):
    """A tar (or a gzip'd one) to read forward: a file, or an object read in large range
    requests (a listing seeks over each member's data, so the requests stream the tar once)."""
    if not is_url(where):
        return open(where, "rb")
    remote, name = object_at(where)
    return remote.fs.open(remote.at(name), "rb", block_size=1 << 24, cache_type="readahead")


def split_files(root, split_of) -> list[tuple[str, Path | str]]:
    """(split, path) of the regular files directly in ``root`` to which ``split_of(name)`` gives
    a split (others: None), sorted by name; at a URL, (split, the object's URL)."""
    if is_url(str(root)):
        names = sorted(name for name in folder_at(str(root)).listed() if "/" not in name)
        return [(split_of(name), f"{root}/{name}") for name in names if split_of(name)]
    try:
        entries = sorted(os.scandir(root), key=lambda e: e.name)
    except OSError:  # not a folder, or unreadable: detection says no, and the tree's scan says why
        return []
    return [(split_of(e.name), Path(e.path)) for e in entries if split_of(e.name) and e.is_file()]


def holds_training_tars(root, files: list) -> bool:
    """Detection of a layout of tars directly in SRC: training ``files`` and no train/ folder, so
    a tree that happens to hold such a file stays a tree."""
    if is_url(str(root)):
        folder = any(name.startswith("train/") for name in folder_at(str(root)).listed())
    else:
        folder = (root / "train").is_dir()
    return not folder and any(split == "train" for split, _ in files)


def refuse_val_labels(root: Path, val_labels, labelled_by: str) -> None:
    """Layouts that label every image themselves refuse --val-labels rather than ignore it."""
    if val_labels is not None:
        raise SourceError(f"--val-labels does not apply to {root}: {labelled_by}")


def plain_names(members: list) -> list:
    """``members`` with a leading ``./`` taken off each name (what ``tar -C DIR -cf x.tar .``
    writes), and that ``.`` folder itself left out: keys and labels are those of the extracted tree."""
    for member in members:
        while member.name.startswith("./"):
            member.name = member.name[2:]
    return [m for m in members if m.name not in ("", ".")]


def list_members(fileobj, on_member=None) -> tuple[list, Exception | None]:
    """The members of the tar in (seekable) ``fileobj`` up to any damage, and that damage (or
    None): the members listed before it are still good, and one damaged tar must not stop a scan.
    ``on_member(member)``, if given, is called as each header is passed, so that a small member
    can be read on the way: a tar in a bucket is then read forward once, never twice.

    tarfile raises only for damage in the first header; at a later one it stops as quietly as at
    the end. So where it stopped is looked at: a tar ends with a block of 512 zero bytes.
    """
    members, damage = [], None
    try:
        archive = tarfile.open(fileobj=fileobj, mode="r:")
        for member in archive:
            members.append(member)
            if on_member is not None:
                on_member(member)
    except tarfile.TarError as error:
        damage = error
    else:
        fileobj.seek(archive.offset)
        if fileobj.read(tarfile.BLOCKSIZE) != bytes(tarfile.BLOCKSIZE):
            damage = tarfile.ReadError(f"no valid member header at byte {archive.offset:,} (truncated or damaged)")
    return plain_names(members), damage


def last_of_each_name(members: list, split: str, prefix: str, rejects: list) -> list:
    """``members`` less those that a later member of the same name replaces; each is a reject
    (its path: ``prefix`` + its name).

    A tar may hold one name twice (``tar -r`` appends an updated file). Extraction keeps the
    last, and so do we: an archive and its extracted tree give the same shards, and no member is
    dropped without a word.
    """
    last = {m.name: m for m in members if not m.isdir()}
    kept = []
    for member in members:
        if member.isdir() or last[member.name] is member:
            kept.append(member)
        else:
            rejects.append(Reject(split, f"{prefix}{printable(member.name)}", DUPLICATE))
    return kept


def member_problem(member) -> str | None:
    """Why the bytes of a (non-folder) member cannot be read as a file of its own, or None."""
    path = PurePosixPath(member.name)
    if not member.isfile() or member.issparse():  # a sparse member's bytes are not where offset says
        return NOT_REGULAR
    if path.is_absolute() or ".." in path.parts:
        return "unsafe member name"
    if not is_utf8(member.name):  # keys are UTF-8 in the shards; tar names are any bytes
        return "file name is not valid UTF-8"
    return None


def image_member_problem(member, inside: str) -> str | None:
    """Why a member of ``inside`` (say "a per-class tar") cannot be an image, or None."""
    if member.isdir():
        return f"a folder inside {inside}"
    reason = member_problem(member)
    if reason:
        return reason
    if PurePosixPath(member.name).suffix.lower() == ".tar":
        return f"a nested archive inside {inside}; not read"
    if not is_image_name(member.name):
        return not_an_image(member.name)
    return None
