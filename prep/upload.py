"""``imgprep shard SRC --out s3://bucket/prefix``: shards written locally, then uploaded whole.

The job runs as it does on disk into a local staging folder, which is also the URL's cache
folder (``prep.cache``): a Loader on the same machine then finds the shards cached. Each shard
file is uploaded as one object (object stores show an object only once its upload completed, so
no half object is ever visible) and recorded, after its upload, in the bucket's
``.imgprep-uploaded.json`` journal (file -> sha256). ``rejects.jsonl`` follows, and
``manifest.json`` goes last: a folder with a manifest in it is complete. A rerun uploads only
what the journal does not hold with the manifest's sha256; if anything changes, the old manifest
is removed first, so no reader ever sees a manifest that names shards of another run. With
``--engine ray`` the workers upload their shards themselves and the job enters each in the
journal as its record comes back (``prep.job.ShardStore``); this then uploads only the rest.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from prep.remote import Remote
from prep.shards import MANIFEST, MEAN_IMAGE, REJECTS, STATS, open_shards, read_manifest, shard_entries

JOURNAL = ".imgprep-uploaded.json"


@dataclass(frozen=True)
class Uploaded:
    files: int  # shard files uploaded by this call
    kept: int  # shard files the bucket already held
    bytes: int  # bytes uploaded


def uploaded_journal(remote: Remote) -> dict[str, str]:
    """The bucket's record of uploaded files; anything unreadable counts as nothing uploaded."""
    data = remote.read_optional(JOURNAL)
    try:
        journal = json.loads(data) if data is not None else {}
    except ValueError:
        return {}
    ok = isinstance(journal, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in journal.items())
    return journal if ok else {}


def record_uploaded(remote: Remote, journal: dict[str, str], file: str, sha256: str) -> None:
    """Enter ``file``, uploaded whole, in ``journal`` and write it to the bucket."""
    journal[file] = sha256
    remote.write_bytes(JOURNAL, json.dumps(journal, indent=0).encode())


def upload_shards(local: Path, url: str, progress: bool = True) -> Uploaded:
    """Upload the finished shard folder ``local`` to ``url`` (see the module docstring)."""
    from tqdm import tqdm

    remote = Remote(url)
    manifest = read_manifest(local)
    journal = uploaded_journal(remote)
    entries = shard_entries(manifest)
    held = remote.listing()  # one listing, not a request a shard
    todo = [e for e in entries if journal.get(e["file"]) != e["sha256"] or e["file"] not in held]
    same_manifest = MANIFEST in held and remote.read_bytes(MANIFEST) == (local / MANIFEST).read_bytes()
    if not todo and same_manifest:
        return Uploaded(0, len(entries), 0)
    if MANIFEST in held:
        remote.remove(MANIFEST)  # the folder is incomplete until the new manifest lands
    sent = 0
    for entry in tqdm(todo, desc="upload", unit="shard", disable=not progress):
        path = local / entry["file"]
        remote.upload(path, entry["file"])
        record_uploaded(remote, journal, entry["file"], entry["sha256"])
        sent += path.stat().st_size
    if (local / REJECTS).exists():
        remote.upload(local / REJECTS, REJECTS)
    remote.upload(local / MANIFEST, MANIFEST)
    return Uploaded(len(todo), len(entries) - len(todo), sent)


def fetch_split(url: str, split: str, progress: bool = True) -> Path:
    """Every shard file of ``split`` at ``url`` in its cache folder (no limit); that folder."""
    from tqdm import tqdm

    reader = open_shards(url).split(split)
    for number in tqdm(range(len(reader.files)), desc="download", unit="shard", disable=not progress):
        reader.shard_file(number)
    reader.close()
    return reader.root


def upload_stats(local: Path, url: str) -> None:
    """pca-stats' two files, the mean image first: stats.json names it, so it lands last."""
    remote = Remote(url)
    for name in (MEAN_IMAGE, STATS):
        if (local / name).exists():
            remote.upload(local / name, name)
