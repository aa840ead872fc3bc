"""A local cache of a remote shard folder: whole shard files, checked, shared, bounded.

    CACHE/<name of the URL>/manifest.json      fetched again on every open (a few kB)
    CACHE/<name of the URL>/stats.json ...     when the folder has them
    CACHE/<name of the URL>/train/train-00000.h5  downloaded whole, sha256-checked, then renamed in

A reader asks ``fetch(file)`` for a shard and gets a ``Held`` file: the local path plus a shared
lock on it, kept while the shard is open. Every process of a node (ranks, loader workers) uses the
same folder, and the locks make that safe:

- ``FILE.lock`` exclusive while FILE is looked for and downloaded: a second process wanting FILE
  waits and then finds it there, so no file is downloaded twice and nobody reads a half-written one (the
  download goes to a temporary name, is hashed on the way, and is renamed in only if its sha256 is
  the manifest's; a mismatch is downloaded once more, then one line naming the object);
- ``FILE.use`` shared while FILE is open somewhere (taken before looking for it, so a file
  found is never evicted before it is used): eviction tries to take it exclusively without
  waiting, so a file in use or being downloaded is never removed;
- ``.room.lock`` exclusive while a process makes room: it removes the least recently used files
  not in use until the new file fits under the limit, and reserves the new file's size at once (the
  temporary file is made that long), so the folder's bytes never exceed the limit.

Only ``os.close`` ever releases a lock (no LOCK_UN): a forked child holds copies of its parent's
descriptors, and unlocking one of those would unlock the parent's.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import time
from pathlib import Path

from prep.atomic import TMP_MARK
from prep.errors import PrepError
from prep.remote import Remote

SMALL_FILES = ("manifest.json", "rejects.jsonl", "stats.json", "stats-mean.npy")  # fetched fresh on each open
ROOM_WAIT_S = 120  # how long a download waits for files in use to be released
DOWNLOADS = ".downloads"  # one "FILE BYTES" line per completed download, by any process
LOCKS = (".lock", ".use")  # FILE.lock: downloading it; FILE.use: shared by every process using it
DOWNLOAD_TRIES = 2  # an object whose sha256 is wrong is downloaded once more


class CacheError(PrepError):
    """The cache cannot hold what is asked of it."""


def default_cache_folder() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "imgprep"


def folder_name(url: str) -> str:
    """A readable file name for ``url`` plus a short hash (two URLs never share a folder)."""
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", url.split("://", 1)[-1]).strip("_")[-80:]
    return f"{readable}-{hashlib.sha256(url.encode()).hexdigest()[:10]}"


# Room locks held now by this process. A child forked meanwhile (by another thread) closes its
# copies at once: a flock belongs to the open file, so a child keeping a copy would keep the
# whole node's cache locked for as long as it lives.
_ROOM_LOCKS: set[int] = set()


def _close_room_locks_in_child() -> None:
    for descriptor in list(_ROOM_LOCKS):
        try:
            os.close(descriptor)
        except OSError:
            pass
    _ROOM_LOCKS.clear()


_FORK_HOOK: list = []  # registered on first use, not at import


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's
        return True
    return True


class Held:
    """A cached shard file and the shared lock that keeps it from eviction while it is open."""

    def __init__(self, path: Path, descriptor: int):
        self.path, self._descriptor = path, descriptor

    def close(self) -> None:
        if self._descriptor is not None:
            os.close(self._descriptor)
            self._descriptor = None

    def __del__(self):
        self.close()


class ShardCache:
    """The local copy of the shard folder at ``url``: see the module docstring. Picklable (paths
    and the URL), so loader workers get one."""

    def __init__(self, url: str, folder=None, limit: int | None = None):
        self.remote = Remote(url)
        self.url = self.remote.url
        self.root = Path(folder or default_cache_folder()).expanduser().absolute() / folder_name(self.url)
        self.limit = limit
        self.downloaded = 0  # bytes this process downloaded (benchmarks read it)
        self.known_sizes: dict[str, int] = {}  # remote file -> bytes, listed once, pickled to workers

    # ------------------------------------------------------------------ the folder's small files

    def prepare(self) -> Path:
        """Fetch the manifest (and statistics when present) afresh; return the local folder."""
        manifest = self.remote.read_bytes("manifest.json")  # before anything is made here for it
        self.root.mkdir(parents=True, exist_ok=True)
        self._remove_leftovers()
        for name in SMALL_FILES:
            data = manifest if name == "manifest.json" else self.remote.read_optional(name)
            if data is None:
                (self.root / name).unlink(missing_ok=True)  # gone remotely: not to be used stale
                continue
            tmp = self.root / f"{name}{TMP_MARK}{os.getpid()}"
            tmp.write_bytes(data)
            os.replace(tmp, self.root / name)
        return self.root

    def _remove_leftovers(self) -> None:
        """Temporary files of downloads whose process is gone (killed): they would count forever."""
        for tmp in self.root.rglob(f"*{TMP_MARK}*"):
            pid = tmp.name.rsplit(TMP_MARK, 1)[1]
            if pid.isdigit() and not process_alive(int(pid)):
                tmp.unlink(missing_ok=True)

    def sizes(self, files: list[str]) -> dict[str, int]:
        """Bytes of each remote shard file (one listing a folder, once)."""
        if all(f in self.known_sizes for f in files):
            return {f: self.known_sizes[f] for f in files}
        found = self.known_sizes
        for folder in sorted({str(Path(f).parent) for f in files}):
            found.update(self.remote.listing(folder))
        missing = [f for f in files if f not in found]
        if missing:
            raise CacheError(f"{self.remote.at(missing[0])}: not found in the bucket (the manifest names it)")
        return {f: found[f] for f in files}

    # ------------------------------------------------------------------ shard files

    def fetch(self, name: str, sha256: str, size: int, release=None) -> Held:
        """The cached file ``name`` (downloading it if needed), held open against eviction.
        ``release()``: lets go of the caller's other held files, called before waiting for room."""
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        use = os.open(f"{path}.use", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(use, fcntl.LOCK_SH)  # from now on nobody evicts it
            download = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(download, fcntl.LOCK_EX)  # waits while another process downloads it
                if path.exists() and path.stat().st_size == size:
                    os.utime(path)  # least recently used is by modification time
                else:
                    self._download(name, path, sha256, size, release)
            finally:
                os.close(download)
        except BaseException:
            os.close(use)
            raise
        return Held(path, use)

    def _download(self, name: str, path: Path, sha256: str, size: int, release=None) -> None:
        for attempt in range(DOWNLOAD_TRIES):
            tmp = Path(f"{path}{TMP_MARK}{os.getpid()}")
            self._reserve(tmp, size, release)
            try:
                digest = hashlib.sha256()
                with open(tmp, "r+b") as out:
                    self.remote.download(name, out, on_bytes=digest.update)
                    out.truncate()
                got = os.path.getsize(tmp)
                if digest.hexdigest() == sha256 and got == size:
                    with self._room():  # renamed while nobody counts: the bytes are never seen twice
                        os.replace(tmp, path)
                        with open(self.root / DOWNLOADS, "a") as log:  # every process's downloads, for benchmarks
                            log.write(f"{name} {size}\n")
                    self.downloaded += size
                    return
            finally:
                tmp.unlink(missing_ok=True)
        raise CacheError(f"{self.remote.at(name)}: its sha256 is not the manifest's, downloaded {DOWNLOAD_TRIES} "
                         "times (a damaged object or a changed folder: imgprep verify)")

    def _reserve(self, tmp: Path, size: int, release=None) -> None:
        """Make room for ``size`` more bytes under the limit, and take them (a file that long).
        When the files in use leave no room, the caller's own are released first (an idle reader
        holding files must not starve the others), then it waits for other processes'."""
        deadline = time.monotonic() + ROOM_WAIT_S
        while True:
            with self._room():
                if self.limit is None or self._free_up_to(self.limit - size):
                    with open(tmp, "wb") as f:
                        f.truncate(size)  # counted by the next process that makes room
                    return
            if release is not None:
                release()
                release = None
                continue
            if self.limit is not None and size > self.limit:
                raise CacheError(f"a shard of {size:,} bytes does not fit the cache limit of {self.limit:,} bytes")
            if time.monotonic() > deadline:
                raise CacheError(f"the cache {self.root} stays full of shards in use ({self.limit:,}-byte limit): "
                                 "raise --cache-limit, or use fewer loader workers")
            time.sleep(0.2)

    def _free_up_to(self, allowed: int) -> bool:
        """Remove least recently used files not in use until the folder holds at most ``allowed``
        bytes of shards (temporary files count); whether that was reached."""
        files = [p for p in self.root.rglob("*.h5*") if p.is_file() and not p.name.endswith(LOCKS)]
        total = sum(p.stat().st_size for p in files)
        for path in sorted((p for p in files if p.suffix == ".h5"), key=lambda p: p.stat().st_mtime):
            if total <= allowed:
                break
            descriptor = os.open(f"{path}.use", os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # in use, or being downloaded (a downloader holds it too)
                os.close(descriptor)
                continue
            try:
                size = path.stat().st_size
                path.unlink()
                total -= size
            except FileNotFoundError:
                pass
            finally:
                os.close(descriptor)
        return total <= allowed

    @contextlib.contextmanager
    def _room(self):
        """The folder's room lock: counting, reserving, evicting and renaming in happen under it."""
        if not _FORK_HOOK:
            os.register_at_fork(after_in_child=_close_room_locks_in_child)
            _FORK_HOOK.append(True)
        descriptor = os.open(self.root / ".room.lock", os.O_RDWR | os.O_CREAT, 0o644)
        _ROOM_LOCKS.add(descriptor)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX)
            yield
        finally:
            _ROOM_LOCKS.discard(descriptor)
            os.close(descriptor)

    def downloaded_bytes(self) -> int:
        """Bytes downloaded into this folder so far, by every process."""
        log = self.root / DOWNLOADS
        return sum(int(line.split()[-1]) for line in log.read_text().splitlines()) if log.exists() else 0

    def cached_bytes(self) -> int:
        """Bytes of shards (and reserved downloads) in the folder, counted under the room lock."""
        with self._room():
            return self._counted()

    def _counted(self) -> int:
        return sum(p.stat().st_size for p in self.root.rglob("*.h5*") if p.is_file() and not p.name.endswith(LOCKS))
