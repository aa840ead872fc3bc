"""``imgprep shard``: scan, plan, run the shard tasks in parallel, then write the manifest.

Resumable by construction. The run's identity (source, options and a hash of the plan) is kept
in ``OUT/.partial/run.json``; each finished task leaves a record there (see ``prep.build``). A
rerun of the same command skips every task with a record; a rerun with other options or a
changed source is refused unless ``overwrite``. The manifest is written last, then the journal
is removed: a folder with a manifest is complete.

A source's reader may need work done once before any task reads it: its optional
``prepare(journal, workers, progress)`` runs under the folder's lock, when tasks remain (Hugging
Face's gzip'd archives are decompressed into the journal there, and go with it).
"""

from __future__ import annotations

import contextlib
import functools
import json
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from prep import __version__
from prep.atomic import TMP_MARK, atomic_write_text, locked_folder, no_space
from prep.build import JOURNAL, record_path
from prep.engines import run_local, run_ray
from prep.errors import OutputError, PrepError, ShardFormatError
from prep.plan import ShardOptions, ShardTask, make_plan, plan_fingerprint
from prep.shards import (MANIFEST, MANIFEST_FORMAT, MEAN_IMAGE, REJECTS, STATS, format_version, read_manifest,
                         read_rejects, write_manifest)
from prep.sources import SPLITS, Dataset

RUN_FILE = "run.json"
SHARD_NAME = re.compile(rf"({'|'.join(SPLITS)})-\d{{5,}}\.h5({re.escape(TMP_MARK)}\w+)?")


@dataclass(frozen=True)
class ShardSummary:
    out: Path
    counts: dict  # split -> images written
    shards: int
    rejected: int
    bytes: int
    seconds: float
    resumed: int  # tasks found done from an earlier run
    already_complete: bool = False


class ShardStore:
    """Where the finished shard files are: the output folder, or the bucket at ``url`` when Ray
    workers upload each shard themselves (``prep.engines``); then the output folder keeps the
    journal and the manifest, and each record that comes back is entered in the bucket's upload
    journal (``prep.upload``: this process is its one writer)."""

    def __init__(self, out: Path, url: str | None = None):
        self.out = out
        self.remote = self.listing = self.uploaded = None
        if url is not None:
            from prep.remote import Remote
            from prep.upload import uploaded_journal

            self.remote = Remote(url)
            self.listing, self.uploaded = self.remote.listing(), uploaded_journal(self.remote)

    def has(self, file: str, sha256: str | None = None) -> bool:
        if self.remote is None:
            return (self.out / file).is_file()
        return file in self.listing and (sha256 is None or self.uploaded.get(file) == sha256)

    def size(self, file: str) -> int:
        return self.listing[file] if self.remote is not None else (self.out / file).stat().st_size

    def finished(self, record: dict) -> None:
        """A task's record came back: keep it (Ray's workers wrote theirs on their own disks)."""
        if self.remote is None:
            return
        from prep.upload import record_uploaded

        atomic_write_text(record_path(self.out, ShardTask(record["split"], record["index"], ())), json.dumps(record))
        if record["file"]:
            self.listing[record["file"]] = record["bytes"]
            record_uploaded(self.remote, self.uploaded, record["file"], record["sha256"])


def run_shard_job(dataset: Dataset, out, options: ShardOptions, workers: int, overwrite: bool = False,
                  progress: bool = True, engine: str = "local", ray_address: str | None = None,
                  upload_to: str | None = None) -> ShardSummary:
    """Shard ``dataset`` into ``out``; ``engine`` "local" (a process pool of ``workers``) or
    "ray" (the tasks on a Ray cluster, see ``prep.engines``) run the same plan. ``upload_to``
    (Ray only): each worker uploads its shard there, and ``out`` keeps the journal and manifest."""
    started = time.perf_counter()
    out = Path(out).expanduser().absolute()
    tasks = make_plan(dataset, options)
    identity = {"source": dataset.root, "options": options.as_dict(), "plan_sha256": plan_fingerprint(tasks)}
    with locked_folder(out):
        store = ShardStore(out, upload_to)
        if not overwrite and _complete(out, identity, store):
            return _summary(out, read_manifest(out), started, store, resumed=len(tasks), already_complete=True)
        _prepare_output(out, identity, overwrite)
        done = _finished_records(out, tasks, store)
        pending = [t for t in tasks if (t.split, t.index) not in done]
        if pending:  # a source's work before any task reads it: gzip'd tars decompressed into the journal
            dataset.reader.prepare(out / JOURNAL, workers, progress)
        total = sum(len(t.items) for t in tasks)
        bar_start = total - sum(len(t.items) for t in pending)
        execute = run_local if engine == "local" else functools.partial(run_ray, address=ray_address,
                                                                        upload_to=upload_to)
        for record in execute(pending, dataset.reader, out, options, workers, (bar_start, total, progress)):
            store.finished(record)
            done[(record["split"], record["index"])] = record
        manifest = _finish(out, dataset, tasks, done, identity)
        return _summary(out, manifest, started, store, resumed=len(tasks) - len(pending))


def _complete(out: Path, identity: dict, store: ShardStore) -> bool:
    """True when ``out`` already holds this very run, every shard file present."""
    if not (out / MANIFEST).is_file():
        return False
    try:
        manifest = read_manifest(out)
    except ShardFormatError:
        return False
    shards = [e for s in manifest["splits"].values() for e in s["shards"]]
    return _same_identity(manifest, identity) and all(store.has(e["file"], e["sha256"]) for e in shards)


def _same_identity(existing: dict, identity: dict) -> bool:
    return all(existing.get(k) == v for k, v in identity.items())


def _prepare_output(out: Path, identity: dict, overwrite: bool) -> None:
    """Refuse to mix runs; clear our own files for --overwrite; drop half-written temporaries."""
    journal = out / JOURNAL
    if overwrite:
        remove_outputs(out)
    previous = _previous_identity(out)
    if previous is None and (out / REJECTS).exists():
        raise OutputError(f"{out} already holds a {REJECTS} that no imgprep run there wrote; move it away or choose "
                          "another --out (--overwrite deletes it)")
    if previous is not None and not _same_identity(previous, identity):
        raise OutputError(
            f"{out} holds shards made with other options or from another source; "
            "use --overwrite to replace them, or choose another --out"
        )
    journal.mkdir(exist_ok=True)
    atomic_write_text(journal / RUN_FILE, json.dumps(identity, indent=2))
    if (out / MANIFEST).is_file():
        _journal_from_manifest(out)  # a complete run missing some shard files: rebuild only those
    for stale in [*out.glob(f"*/*.h5{TMP_MARK}*"), *journal.glob(f"*{TMP_MARK}*")]:
        stale.unlink()


def _previous_identity(out: Path) -> dict | None:
    """Identity of what ``out`` holds: None when empty, {} when the shards' origin is unknown."""
    if (out / JOURNAL / RUN_FILE).is_file():
        try:
            return json.loads((out / JOURNAL / RUN_FILE).read_text())
        except (ValueError, UnicodeDecodeError):
            return {}  # damaged: unknown origin, so only --overwrite may reuse the folder
    if (out / MANIFEST).is_file():
        try:
            return read_manifest(out)
        except ShardFormatError:
            return {}
    if any(any(out.glob(f"{split}/{split}-*.h5")) for split in SPLITS):
        return {}
    return None


def remove_outputs(out: Path) -> None:
    """Delete only what imgprep writes in ``out``; anything else there is left alone."""
    for name in (MANIFEST, REJECTS, STATS, MEAN_IMAGE):
        with contextlib.suppress(FileNotFoundError):
            (out / name).unlink()
    shutil.rmtree(out / JOURNAL, ignore_errors=True)
    for split in SPLITS:
        for shard in out.glob(f"{split}/{split}-*.h5*"):
            if SHARD_NAME.fullmatch(shard.name):  # five digits or more: 100,000 shards and up
                shard.unlink()
        with contextlib.suppress(OSError):  # only when empty: a user's own files stay
            (out / split).rmdir()


def _journal_from_manifest(out: Path) -> None:
    """Turn a complete run's manifest back into task records, for the shards still on disk."""
    manifest = read_manifest(out)
    rejects: dict[str, list] = {}
    for reject in read_rejects(out):
        if reject.get("shard"):
            rejects.setdefault(reject["shard"], []).append([reject["path"], reject["reason"]])
    (out / JOURNAL).mkdir(exist_ok=True)
    for split, entry in manifest["splits"].items():
        for shard in entry["shards"]:
            name = Path(shard["file"]).stem
            if (out / shard["file"]).is_file():
                record = {"split": split, "index": int(name.rsplit("-", 1)[1]), **shard,
                          "rejects": rejects.get(name, [])}
                atomic_write_text(out / JOURNAL / f"{name}.json", json.dumps(record))
    (out / MANIFEST).unlink()


def _finished_records(out: Path, tasks: list[ShardTask], store: ShardStore) -> dict:
    """Records of tasks already done (and whose shard file is still there)."""
    done = {}
    for task in tasks:
        path = record_path(out, task)
        if path.is_file():
            record = json.loads(path.read_text())
            if record["file"] is None or store.has(record["file"], record["sha256"]):
                done[(task.split, task.index)] = record
    return done


# ----------------------------------------------------------------------------- manifest


def _finish(out: Path, dataset: Dataset, tasks, done: dict, identity: dict) -> dict:
    """Write rejects.jsonl and then manifest.json (the commit point); drop the journal."""
    rejects = [{"split": r.split, "path": r.path, "reason": r.reason} for r in dataset.rejects]
    splits: dict[str, dict] = {}
    for task in tasks:
        record = done[(task.split, task.index)]
        entry = splits.setdefault(task.split, {"count": 0, "rejected": 0, "shards": []})
        if record["file"]:
            entry["shards"].append({"file": record["file"], "count": record["count"], "sha256": record["sha256"]})
            entry["count"] += record["count"]
        for path, reason in record["rejects"]:
            rejects.append({"split": task.split, "path": path, "reason": reason, "shard": task.name})
    for reject in rejects:
        splits.setdefault(reject["split"], {"count": 0, "rejected": 0, "shards": []})["rejected"] += 1
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rejects)
    with _finishing(out, REJECTS):
        atomic_write_text(out / REJECTS, lines)
    if not any(entry["count"] for entry in splits.values()):
        shutil.rmtree(out / JOURNAL, ignore_errors=True)
        raise PrepError(f"no usable images in {dataset.root}: all {len(rejects)} files were rejected "
                        f"(reasons in {out / REJECTS})")
    manifest = {
        "format": MANIFEST_FORMAT,
        "version": format_version(identity["options"]["policy"]),
        "tool": f"imgprep {__version__}",
        **identity,
        "classes": [{"index": c.index, "wnid": c.wnid, "name": c.name} for c in dataset.classes],
        "splits": splits,
        "rejected": len(rejects),
    }
    with _finishing(out, MANIFEST):
        write_manifest(out, manifest)
    shutil.rmtree(out / JOURNAL, ignore_errors=True)
    return manifest


@contextlib.contextmanager
def _finishing(out: Path, name: str):
    """The last writes of a run fail as the shards' do: one line, and every shard is kept (the
    journal still holds them, so a rerun only writes these files)."""
    try:
        yield
    except OSError as error:
        if no_space(error):
            raise OutputError(f"no space left on {out} (writing {name}); every shard is kept: free space, then "
                              "rerun the same command to finish") from None
        raise OutputError(f"cannot write {out / name}: {error.strerror or error}") from None


def _summary(out: Path, manifest: dict, started: float, store: ShardStore, resumed: int,
             already_complete=False) -> ShardSummary:
    files = [e["file"] for s in manifest["splits"].values() for e in s["shards"]]
    return ShardSummary(
        out=out,
        counts={name: s["count"] for name, s in manifest["splits"].items()},
        shards=len(files),
        rejected=manifest["rejected"],
        bytes=sum(store.size(f) for f in files),
        seconds=time.perf_counter() - started,
        resumed=resumed,
        already_complete=already_complete,
    )
