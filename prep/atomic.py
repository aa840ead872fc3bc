"""Outputs appear whole or not at all (temporary name, then rename); one writer per folder."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import uuid

from prep.errors import OutputError

TMP_MARK = ".tmp-"  # temporary files are NAME.tmp-<random>; a resumed run deletes leftovers


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path next to ``path``; on success fsync it and rename it to ``path``.

    On any exception the temporary file is removed and ``path`` is left as it was, so a reader
    (or a resumed run) never sees half a file. rename(2) within one folder is atomic on POSIX.
    The temporary name is unique, so two writers of the same file never share one.
    """
    path = os.fspath(path)
    tmp = f"{path}{TMP_MARK}{uuid.uuid4().hex[:12]}"
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def no_space(error: BaseException) -> bool:
    """Whether ``error`` says the disk (or the quota) is full; libraries that wrap the error
    (libhdf5, torch) keep only the text."""
    return getattr(error, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "No space left" in str(error)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)


_held_locks: set[int] = set()  # descriptors of the folder locks this process holds


@contextlib.contextmanager
def locked_folder(folder, what: str = "imgprep"):
    """Hold an exclusive lock on ``folder`` (created if needed): a second concurrent writer is
    refused with one line instead of interleaving its files with ours. The kernel drops the
    lock when the last descriptor of it closes, so a holder that dies, even by kill -9, frees
    it, provided its worker processes do not keep a copy: they call ``release_inherited_locks``."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise OutputError(f"output folder {folder} is a file; choose a folder")
    try:
        os.makedirs(folder, exist_ok=True)
        fd = os.open(folder, os.O_RDONLY)
    except OSError as error:
        raise OutputError(f"cannot create output folder {folder}: {error.strerror or error}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise OutputError(f"another {what} is writing to {folder}; wait for it or choose another folder") from None
    _held_locks.add(fd)
    try:
        if not os.access(folder, os.W_OK):
            raise OutputError(f"output folder {folder} is not writable")
        yield
    finally:
        _held_locks.discard(fd)
        os.close(fd)


def release_inherited_locks() -> None:
    """In a forked worker: close the copies of the parent's folder locks. Closing a copy does
    not unlock (the parent's descriptor still holds the lock); it only stops this worker from
    holding the folder locked after the parent is gone."""
    for fd in list(_held_locks):
        with contextlib.suppress(OSError):
            os.close(fd)
    _held_locks.clear()
