"""Where a run's files live: OUT on disk, or OUT at a URL (``--out s3://bucket/runs/alexnet``).

A run always writes into a local folder, ``local_folder(out, cache)``: OUT itself, or for a URL
a staging folder under the cache folder (``<cache>/runs/<the URL's name>``). With a URL, rank
0's ``RunUpload.publish()`` runs after each save and uploads the files that changed since the
last one, each whole as one object (an S3 object appears only once its upload has completed, so
a reader sees the old file or the new one, never a part): the TensorBoard events,
metrics.jsonl, curves.png, wandb-run-id, best.pt, and last.pt last, the state a resume starts
from. ``fetch_run`` brings those files back into the staging folder for ``--resume URL`` (once a
node: the processes of a node take turns under a lock, and a file is downloaded only when the
bucket's object differs from the copy there).

W&B's own folder (OUT/wandb) is not uploaded: online, W&B keeps the run; offline, ``wandb
sync`` reads it from the staging folder.
"""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

from prep.atomic import atomic_path
from prep.errors import ImgprepError
from prep.remote import Remote, as_url, is_url

LAST, BEST = "last.pt", "best.pt"  # train.checkpoint's names (that module imports torch)
PUBLISHED = ("metrics.jsonl", "curves.png", "wandb-run-id", BEST, LAST)  # in upload order, after tensorboard/
EVENTS = "tensorboard"
FETCHED = ".fetched.json"  # name -> the bucket's stamp of the object last downloaded as it


def local_folder(out: str, cache: str | None = None) -> Path:
    """The folder the run writes to: OUT, or a URL's staging folder under ``cache``."""
    if not is_url(out):
        return Path(out)
    from prep.cache import default_cache_folder, folder_name

    return Path(cache or default_cache_folder()) / "runs" / folder_name(as_url(out))


def shown(out: str, name: str) -> str:
    """How a message names file ``name`` of run OUT (a URL stays a URL)."""
    return f"{as_url(out)}/{name}" if is_url(out) else str(Path(out) / name)


class RunUpload:
    """Uploads a local run folder's changed files to OUT's URL (nothing for a local OUT)."""

    def __init__(self, out: str, local: Path):
        self.remote = Remote(out) if is_url(out) else None
        self.local = local
        self.sent: dict[str, tuple[int, int]] = {}  # name -> (size, mtime_ns) at its last upload

    def publish(self) -> int:
        """Upload what changed since the last call; the number of files sent."""
        if self.remote is None:
            return 0
        events = sorted(p.relative_to(self.local).as_posix() for p in (self.local / EVENTS).rglob("*") if p.is_file())
        sent = 0
        for name in events + list(PUBLISHED):
            path = self.local / name
            if not path.is_file():
                continue
            stat = path.stat()
            if self.sent.get(name) != (stat.st_size, stat.st_mtime_ns):
                self.remote.upload(path, name)
                self.sent[name] = (stat.st_size, stat.st_mtime_ns)
                sent += 1
        return sent


def check_new_run(out: str) -> None:
    """One line if OUT's URL is unreachable, or already holds a run."""
    if not is_url(out):
        return
    remote = Remote(out)
    remote.check_reachable()
    if remote.exists(LAST):
        raise ImgprepError(f"{as_url(out)} already holds a run: continue it with --resume {as_url(out)}, "
                           "or choose another --out")


def fetch_run(url: str, cache: str | None = None, names: tuple[str, ...] | None = None) -> Path:
    """Download run ``url``'s files (or only ``names``) into its staging folder, those that differ
    from the copies there; that folder. One line if the URL holds no last.pt (or one of ``names``)."""
    remote = Remote(url)
    local = local_folder(url, cache)
    local.mkdir(parents=True, exist_ok=True)
    with open(local / ".fetch.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the ranks of a node: one downloads, the others find it done
        objects = remote.stamps()  # one listing: what is there, and how to tell a replaced object
        missing = [n for n in names or (LAST,) if n not in objects]
        if missing:
            raise ImgprepError(f"no checkpoint at {remote.at(missing[0])}"
                               + (": nothing to resume there" if names is None else ""))
        fetched = json.loads((local / FETCHED).read_text()) if (local / FETCHED).is_file() else {}
        wanted = names or [n for n in objects if n in PUBLISHED or n.startswith(EVENTS + "/")]
        for name in wanted:
            stamp = objects[name]
            if fetched.get(name) == stamp and (local / name).is_file():
                continue
            (local / name).parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(local / name) as tmp, open(tmp, "wb") as out:
                remote.download(name, out)
            fetched[name] = stamp
            with atomic_path(local / FETCHED) as tmp:
                Path(tmp).write_text(json.dumps(fetched))
    os.utime(local)  # a cache cleaner sees the folder in use
    return local


def fetch_checkpoint(url: str, cache: str | None = None) -> Path:
    """A checkpoint object (s3://bucket/runs/x/best.pt) downloaded into its run's staging folder."""
    run, name = as_url(url).rsplit("/", 1)
    return fetch_run(run, cache, (name,)) / name
