"""Hugging Face's original ImageNet-1k archives (the ``imagenet-1k`` dataset's data/ folder).

    SRC/train_images_0.tar.gz ... train_images_4.tar.gz    n01440764_10026_n01440764.JPEG ...
    SRC/val_images.tar.gz                                  ILSVRC2012_val_00000001_n01751748.JPEG ...

Each member is a flat JPEG whose name ends in ``_<wnid>``: that wnid is its label. Classes are
the sorted wnids of the training archives (so ImageNet-1k's give the usual indices); a name
without a wnid, or a validation wnid that no training image has, is a reject. Names come from
a synset file in SRC, if any. ``test_images.tar.gz`` has no labels and is not read. An image's
key is ``<archive name>/<member name>``.

gzip cannot be read at an offset, so these archives cost more than plain tars:
1. the scan streams each archive once, recording each member's offset and size in the
   *uncompressed* tar (and the tar's whole size);
2. before the shard tasks run, the job calls ``prepare``: each archive is decompressed once
   into ``OUT/.partial/staged/<name>.tar`` (several at a time, one process each), and workers
   read images at their offsets there, as in the ILSVRC tars.
The staged tars take as much room in OUT as the archives themselves (about 150 GB for
ImageNet-1k) until the run completes and the journal, with them, is removed. A staged tar is
written under a temporary name, renamed when whole, and stamped with its archive's mtime: a
rerun keeps one whose size and stamp match, and never trusts a temporary one. Ray workers read
the staged tars at the same paths, on storage every worker sees (as OUT must be).
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import multiprocessing
import os
import re
import shutil
import tarfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from prep.atomic import TMP_MARK, atomic_path, no_space
from prep.errors import OutputError, PrepError, SourceError
from prep.remote import is_url, object_at, remote_errors
from prep.sources.common import Dataset, Reject, label_flat_files, make_classes, printable, read_class_names, source_root
from prep.sources.tars import (ArchiveReader, holds_training_tars, image_member_problem, last_of_each_name, open_archive,
                               plain_names, refuse_val_labels, split_files)

TRAIN_ARCHIVE = re.compile(r"train_images_\d+\.tar\.gz")
VAL_ARCHIVE = "val_images.tar.gz"
WNID_IN_NAME = re.compile(r".+_(n\d{8})")  # the file name's stem ends in _<wnid>
NO_WNID = "its name (expected <name>_<wnid>.JPEG, as in n01440764_10026_n01440764.JPEG)"
CHUNK = 1 << 20  # bytes read from a gzip stream at a time
HINT = "download it again"


def archive_files(root) -> list[tuple[str, Path | str]]:
    """(split, path) of the archives in ``root``, sorted by name."""
    return split_files(root, _split_of)


def _split_of(name: str) -> str | None:
    return "train" if TRAIN_ARCHIVE.fullmatch(name) else "val" if name == VAL_ARCHIVE else None


def is_hf_archives(root) -> bool:
    return holds_training_tars(root, archive_files(root))


def scan_hf_archives(root, val_labels=None) -> Dataset:
    """``root``: a folder, or a URL (each archive streamed once to list it, and once more to
    stage it on this machine's disk)."""
    root = source_root(root)
    refuse_val_labels(root, val_labels, "its archives name each image's class")
    index, rejects, found, gzips = {}, [], {"train": {}, "val": {}}, {}
    files = archive_files(root)
    listed = _list_archives(files)
    for split, path, members, tar_size in listed:
        name = _name(path)
        gzips[name] = (str(path), tar_size)
        for member in last_of_each_name(members, split, f"{name}/", rejects):
            key = f"{name}/{member.name}"
            reason = None if member.isdir() else image_member_problem(member, "the archive")
            if reason:
                rejects.append(Reject(split, f"{name}/{printable(member.name)}", reason))
            elif not member.isdir():
                index[key] = (name, member.offset_data, member.size)
                match = WNID_IN_NAME.fullmatch(PurePosixPath(member.name).stem)
                found[split][key] = (match.group(1) if match else None, None)
    wnids = {wnid for wnid, _ in found["train"].values() if wnid}
    classes = make_classes(wnids, read_class_names(root), f"{root}/train_images_*.tar.gz")
    splits = {split: label_flat_files(split, found[split], classes, rejects, NO_WNID, "of the training archives")
              for split in ("train", "val") if found[split]}
    return Dataset(str(root), classes, splits, tuple(rejects), StagedArchives({}, index, gzips))


def _list_archives(files: list) -> list:
    """(split, path, members, size of the tar inside) of each archive, listed in parallel (one
    process an archive, up to a process a core): inflating is CPU work, minutes for ImageNet."""
    from prep.pool import WorkerPool, usable_cores

    def died(tasks) -> SourceError:
        return SourceError(f"a process died while listing {' or '.join(map(str, tasks))} (out of memory?)")

    listed = {}
    with WorkerPool(min(len(files), usable_cores())) as pool:
        # a bar on a terminal, nothing in logs and tests
        bar = functools.partial(_bar, sum(_size(path) for _, path in files), "list", enabled=None)
        for path, members_and_size in pool.run(_stream_members, [path for _, path in files], bar=bar, died=died):
            listed[path] = members_and_size
            pool.bar.update(_size(path))
    return [(split, path, *listed[path]) for split, path in files]


def _stream_members(path) -> tuple[list, int]:
    """The members of a gzip'd tar, listed by streaming it once, and the size of the tar inside.
    Offsets are in the uncompressed tar. Damage of any kind is one error naming the file: unlike
    a plain tar, nothing after it can be found."""
    members = []
    with _read_errors(path):
        try:
            with open_archive(str(path)) as raw, gzip.GzipFile(fileobj=raw) as stream:
                for member in tarfile.open(fileobj=stream, mode="r|", bufsize=CHUNK):
                    member.tarfile = None  # the open archive stays here: the member goes back to the parent
                    members.append(member)
                while stream.read(CHUNK):  # past the end-of-archive blocks: the whole size, and gzip's CRC check
                    pass
                return plain_names(members), stream.tell()  # "./NAME" as NAME, as for plain tars
        except (OSError, EOFError, zlib.error, tarfile.TarError) as error:  # OSError: BadGzipFile, the disk or the store
            raise SourceError(f"{path} cannot be read as a gzip'd tar ({error or type(error).__name__}); "
                              f"{HINT}") from None


def _name(path) -> str:
    return str(path).rsplit("/", 1)[-1]


def _size(path) -> int:
    """Bytes of an archive: a file's, or its object's in the bucket folder's one listing."""
    if is_url(str(path)):
        remote, name = object_at(str(path))
        return remote.listed()[name]
    return os.stat(path).st_size


def _mtime_ns(path) -> int:
    """When an archive was last written: the stamp a staged tar carries, to tell whether the
    archive it came from has been replaced since."""
    if is_url(str(path)):
        remote, name = object_at(str(path))
        return remote.modified_ns(name)
    return os.stat(path).st_mtime_ns


def _read_errors(path):
    """Failures of the store under an archive in a bucket as one line naming it; a file's are the
    caller's to word."""
    return remote_errors(str(path)) if is_url(str(path)) else contextlib.nullcontext()


# ----------------------------------------------------------------------------- staging


@dataclass(frozen=True)
class StagedArchives(ArchiveReader):
    """An ArchiveReader whose tars are the gzip'd archives decompressed by ``prepare``; picklable."""

    gzips: dict = field(default_factory=dict)  # archive name -> (path of the .tar.gz, bytes of the tar inside)

    def prepare(self, journal: Path, workers: int, progress: bool) -> None:
        """Called by the job under OUT's lock before any task reads: decompress into ``journal``
        (OUT/.partial, removed with the staged tars when the run completes)."""
        self.archives.update(stage_archives(self.gzips, Path(journal) / "staged", workers, progress))


def stage_archives(gzips: dict, folder: Path, workers: int, progress: bool) -> dict:
    """Archive name -> path of its staged tar in ``folder``, decompressing those not yet there,
    up to ``workers`` at a time (one process each: inflating is CPU work)."""
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob(f"*{TMP_MARK}*"):  # half written when a run stopped: never trusted
        stale.unlink()
    staged = {name: folder / name.removesuffix(".gz") for name in gzips}
    todo = [(source, str(staged[name]), size) for name, (source, size) in gzips.items()
            if not _is_staged(source, staged[name], size)]
    if todo:
        _check_room(folder, sum(size for _, _, size in todo))
        _decompress(todo, workers, progress)
    return {name: str(path) for name, path in staged.items()}


def _decompress(todo: list, workers: int, progress: bool) -> None:
    """Run ``_stage`` on each (archive, staged tar, size) of ``todo`` in a process pool."""
    from prep.pool import WorkerPool

    def died(tasks) -> PrepError:
        return PrepError(f"a process died while decompressing {' or '.join(t[0] for t in tasks)} (out of memory?); "
                         "the archives finished are kept: rerun the same command to resume")

    written = multiprocessing.Value("q", 0)  # bytes written by every worker so far, for the bar
    with WorkerPool(workers, _start_stager, (written,)) as pool:
        try:
            bar = functools.partial(_bar, sum(size for _, _, size in todo), "decompress", progress)
            for _ in pool.run(_stage, todo, poll=lambda: pool.bar.update(written.value - pool.bar.n), bar=bar,
                              died=died):
                pass
        except KeyboardInterrupt:
            raise PrepError("interrupted; the archives finished are kept: rerun the same command to resume") from None


def _is_staged(source: str, staged: Path, size: int) -> bool:
    """A previous run's staged tar is kept when whole (its size) and from this very archive (the
    archive's mtime, stamped on it when it was made)."""
    try:
        return staged.stat().st_size == size and staged.stat().st_mtime_ns == _mtime_ns(source)
    except FileNotFoundError:
        return False


def _check_room(folder: Path, needed: int) -> None:
    free = shutil.disk_usage(folder).free
    if needed > free:
        raise OutputError(f"{folder} needs {needed / 1e9:.1f} GB free for the decompressed archives (removed when "
                          f"the run completes) and has {free / 1e9:.1f} GB; free space or choose another --out")


def _bar(total: int, what: str, enabled: bool | None):
    """A tqdm bar over bytes; ``enabled`` None: on a terminal only."""
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, desc=what, disable=None if enabled is None else not enabled,
                dynamic_ncols=True)


_written = None  # in a worker: the shared count of bytes written


def _start_stager(written) -> None:
    global _written
    _written = written


def _stage(task) -> None:
    """In a worker: decompress one archive into its staged tar, stamped with the archive's mtime."""
    source, target, size = task
    with _read_errors(source):
        _stage_one(source, target, size)


def _stage_one(source: str, target: str, size: int) -> None:
    try:
        with atomic_path(target) as tmp:
            with open_archive(source) as raw, gzip.GzipFile(fileobj=raw) as stream, open(tmp, "wb") as f:
                while chunk := stream.read(CHUNK):
                    f.write(chunk)
                    with _written.get_lock():
                        _written.value += len(chunk)
            if os.path.getsize(tmp) != size:
                raise SourceError(f"{source} holds a {os.path.getsize(tmp):,}-byte tar, not the {size:,} bytes the "
                                  "scan found: it changed since; rerun the command")
            mtime = _mtime_ns(source)
            os.utime(tmp, ns=(mtime, mtime))
    except (EOFError, zlib.error, gzip.BadGzipFile) as error:
        raise SourceError(f"{source} cannot be decompressed ({error or type(error).__name__}); {HINT}") from None
    except OSError as error:
        if no_space(error):
            raise OutputError(f"no space left decompressing {source} into {Path(target).parent}: it needs as much "
                              "free space as the archives; free space, then rerun the same command") from None
        raise SourceError(f"{source}: {error.strerror or error}") from None
