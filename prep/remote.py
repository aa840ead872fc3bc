"""Folders in object storage: ``s3://bucket/prefix`` or any other fsspec URL.

Only this module talks to fsspec. Credentials and endpoints come from where users already set
them (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE``, ``AWS_ENDPOINT_URL`` for
S3-compatible stores such as MinIO, Ceph or R2, fsspec's own configuration); nothing here writes
them anywhere, and every error is one line naming the URL with any secret taken out.

Failures are bounded: S3 requests time out (connect 10 s, read 60 s) and are retried with
botocore's standard backoff a few times (a dropped connection, a 503), so a missing bucket, a
refused credential or a wrong endpoint is one line within about a minute, never a loop.
"""

from __future__ import annotations

import errno
import os
import re
from contextlib import contextmanager
from pathlib import Path

from prep.errors import BadImage, ImgprepError, PrepError

URL = re.compile(r"^(?P<protocol>[a-zA-Z][a-zA-Z0-9+.-]*)://")
S3_OPTIONS = {"config_kwargs": {"connect_timeout": 10, "read_timeout": 60,
                                "retries": {"max_attempts": 4, "mode": "standard"}}}
S3FS_RETRIES = 2  # s3fs retries some errors itself, on top of botocore's: bound both
SECRETS = ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "AWS_SESSION_TOKEN")


class RemoteError(PrepError):
    """Object storage refused or failed a request (one line naming the URL)."""


def is_url(value) -> bool:
    """A URL of a remote store (``file://`` and plain paths are local)."""
    match = URL.match(value) if isinstance(value, str) else None  # a Path cannot hold "://"
    return bool(match) and match["protocol"].lower() != "file"


def as_url(value) -> str | None:
    """``value`` as a folder URL without a trailing slash, or None for a local path."""
    return value.rstrip("/") if is_url(value) else None


def redacted(text: str) -> str:
    """``text`` without user:password in URLs nor the values of the credential variables."""
    text = re.sub(r"://[^/@\s]+@", "://***@", text)
    for name in SECRETS:
        value = os.environ.get(name)
        if value and len(value) >= 4:
            text = text.replace(value, "***")
    return text


@contextmanager
def remote_errors(what: str):
    """Turn whatever the store's client raises into one RemoteError line: ``what`` names the URL."""
    try:
        yield
    except ImgprepError:
        raise
    except FileNotFoundError as error:
        raise RemoteError(redacted(f"{what}: not found ({error})")) from None
    except PermissionError as error:
        raise RemoteError(redacted(f"{what}: permission denied ({error}); check the credentials "
                                   "(AWS_ACCESS_KEY_ID, AWS_PROFILE) and the bucket's policy")) from None
    except Exception as error:  # botocore, aiohttp and fsspec each raise their own kinds
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise RemoteError(redacted(f"{what}: {type(error).__name__}: {reason}")) from None


class Remote:
    """A folder at ``url``. Cheap to pickle (the URL only): each process makes its own client."""

    def __init__(self, url: str):
        self.url = str(url).rstrip("/")
        self._fs = None
        self._pid = None
        self._listed = None  # listed(): the whole folder, listed once

    def __getstate__(self):
        return {"url": self.url, "_fs": None, "_pid": None, "_listed": None}

    @property
    def fs(self):
        if self._fs is None or self._pid != os.getpid():  # clients hold sockets and threads: not across forks
            with remote_errors(self.url):
                import fsspec

                protocol = URL.match(self.url)["protocol"].lower()
                options = S3_OPTIONS if protocol in ("s3", "s3a") else {}
                self._fs = fsspec.filesystem(protocol, skip_instance_cache=True, **options)
                if hasattr(self._fs, "retries"):
                    self._fs.retries = S3FS_RETRIES
            self._pid = os.getpid()
        return self._fs

    def at(self, name: str) -> str:
        return f"{self.url}/{name}"

    def exists(self, name: str) -> bool:
        with remote_errors(self.at(name)):
            return self.fs.exists(self.at(name))

    def read_bytes(self, name: str) -> bytes:
        with remote_errors(self.at(name)):
            return self.fs.cat_file(self.at(name))

    def read_optional(self, name: str) -> bytes | None:
        """Object ``name``'s bytes, or None when there is none (one request either way)."""
        with remote_errors(self.at(name)):
            try:
                return self.fs.cat_file(self.at(name))
            except FileNotFoundError:
                return None

    def listing(self, folder: str = "") -> dict[str, int]:
        """Bytes of every object under ``folder``, by name relative to this folder (one listing)."""
        return {name: int(entry["size"]) for name, entry in self._found(folder).items()}

    def stamps(self) -> dict[str, str]:
        """What changes when an object is replaced, for every object of the folder (one listing):
        its size and ETag (or its time, on stores without ETags), by name."""
        return {name: f"{entry.get('size')}:{entry.get('ETag') or entry.get('mtime') or entry.get('LastModified')}"
                for name, entry in self._found().items()}

    def _found(self, folder: str = "") -> dict[str, dict]:
        """fsspec's details of every object under ``folder``, by name relative to this folder."""
        where = self.at(folder) if folder else self.url
        with remote_errors(where):
            found = self.fs.find(where, detail=True, withdirs=False)
        bare = self.url.split("://", 1)[1] + "/"
        return {name.split(bare, 1)[-1]: entry for name, entry in found.items()}

    def listed(self) -> dict[str, int]:
        """``listing()`` of the whole folder, made once for this object (see ``folder_at``); a
        folder inside one this process has listed takes its part of that listing (a listing holds
        every object below its folder), so a layout inside SRC costs no second listing."""
        if self._listed is None:
            self._listed = self._part_of_listed_folder()
        if self._listed is None:
            self._listed = self.listing()
        return self._listed

    def _part_of_listed_folder(self) -> dict[str, int] | None:
        for url, folder in _FOLDERS.items():
            if folder is not self and folder._listed is not None and self.url.startswith(url + "/"):
                inside = self.url[len(url) + 1 :] + "/"
                return {name[len(inside) :]: size for name, size in folder._listed.items() if name.startswith(inside)}
        return None

    def modified_ns(self, name: str) -> int:
        """When object ``name`` was last written, in ns since 1970 (one request); 0 for a store
        that does not say."""
        with remote_errors(self.at(name)):
            info = self.fs.info(self.at(name))
        when = info.get("LastModified") or info.get("mtime") or info.get("last_modified") or 0
        return int((when.timestamp() if hasattr(when, "timestamp") else float(when)) * 1e9)

    def write_bytes(self, name: str, data: bytes) -> None:
        """One PUT: readers see the old object or the whole new one, never a part."""
        with remote_errors(self.at(name)):
            self.fs.pipe_file(self.at(name), data)

    def download(self, name: str, out, on_bytes=None, block: int = 1 << 22) -> None:
        """Stream object ``name`` into the open binary file ``out``."""
        with remote_errors(self.at(name)):
            with self.fs.open(self.at(name), "rb", block_size=block) as source:
                while chunk := source.read(block):
                    out.write(chunk)
                    if on_bytes:
                        on_bytes(chunk)

    def upload(self, local: Path, name: str) -> None:
        """Upload ``local`` whole as ``name`` (S3 shows an object only once its upload completed)."""
        with remote_errors(self.at(name)):
            self.fs.put_file(str(local), self.at(name))

    def remove(self, name: str) -> None:
        with remote_errors(self.at(name)):
            self.fs.rm_file(self.at(name))

    def check_reachable(self) -> None:
        """One line now, rather than later, if the bucket is missing, refused or unreachable."""
        with remote_errors(self.url):
            bucket = self.url.split("://", 1)[1].split("/", 1)[0]
            self.fs.ls(f"{URL.match(self.url)[0]}{bucket}", detail=False, refresh=True)


_FOLDERS: dict[str, Remote] = {}  # URL -> this process's Remote for it


def folder_at(url: str) -> Remote:
    """This process's one Remote for ``url``: its client is made once (and again after a fork),
    and its ``listed()`` serves every layout's detection and scan of a source, which starts with
    ``forget_listings()`` so that a later scan sees the bucket as it is then."""
    return _FOLDERS.setdefault(str(url).rstrip("/"), Remote(url))


def object_at(url: str) -> tuple[Remote, str]:
    """(this process's Remote for the folder holding object ``url``, the object's name in it)."""
    folder, name = str(url).rsplit("/", 1)
    return folder_at(folder), name


def forget_listings() -> None:
    for remote in _FOLDERS.values():
        remote._listed = None
        if remote._fs is not None and hasattr(remote._fs, "invalidate_cache"):
            remote._fs.invalidate_cache()  # the client's own record of the folder too


def image_bytes(remote: Remote, name: str, start: int = 0, end: int | None = None) -> bytes:
    """Bytes ``start`` to ``end`` of object ``name``, read for a shard worker: an object gone is
    ``BadImage`` (a reject), any other failure an OSError that may pass (``prep.build`` tries
    again, and stops the job when many in a row fail)."""
    try:
        return remote.fs.cat_file(remote.at(name), start=start, end=end)
    except FileNotFoundError:
        raise BadImage("no longer in the bucket (removed after the scan)") from None
    except Exception as error:  # the store's client raises its own kinds
        raise OSError(errno.EIO, redacted(f"{type(error).__name__}: {error}")) from None
