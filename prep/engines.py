"""Who runs the shard tasks: a local process pool, or a Ray cluster. Both run the same plan
(``prep.plan``) with the same task function (``prep.build.build_shard``), and yield each task's
record as it finishes; the job writes the manifest from those records.

Ray, for datasets that outgrow one machine:

    imgprep shard /nfs/imagenet21k --out /nfs/in21k-256 --engine ray --ray-address auto

Every Ray worker must see the source and the output folder at the same paths (shared
storage) and have imgprep installed. Fault tolerance is Ray's: a task whose worker dies is
retried; a rerun after the driver dies completes only the missing shards, as locally.
"""

from __future__ import annotations

import functools
import multiprocessing

from prep.build import build_shard
from prep.errors import PrepError
from prep.pool import WorkerPool

INTERRUPTED = "interrupted; finished shards are kept: rerun the same command to resume"


def progress_bar(bar_spec):
    """A tqdm bar over images; bar_spec = (images already done, total images, enabled)."""
    from tqdm import tqdm

    initial, total, enabled = bar_spec
    return tqdm(total=total, initial=initial, unit="img", desc="shard", disable=not enabled, smoothing=0.1,
                dynamic_ncols=True)


# ----------------------------------------------------------------------------- local

_progress_counter = None  # a shared integer in each worker process: images handled so far
_reader = None  # the source's reader, handed to each worker once (an archive's holds a large index)


def _init_worker(counter, reader) -> None:
    global _progress_counter, _reader
    _progress_counter, _reader = counter, reader
    import torch

    torch.set_num_threads(1)  # one process per core already; threads would only fight


def _count_image() -> None:
    with _progress_counter.get_lock():
        _progress_counter.value += 1


def _run_task(task, out, options) -> dict:
    return build_shard(task, _reader, out, options, on_image=_count_image)


def run_local(pending, reader, out, options, workers: int, bar_spec):
    """Yield the record of each pending task as a local process pool finishes it.

    A pool that loses a worker (killed for memory, a crash in a decoder library) cannot finish
    that worker's task: the job stops with one line, and a rerun redoes only what is missing.
    """
    if not pending:
        return
    counter = multiprocessing.Value("q", 0)
    seen = [0]
    def died(tasks) -> PrepError:
        cause = "no space left on the disk?" if disk_nearly_full(out, options) else "out of memory?"
        return PrepError(f"a worker process died while making {' or '.join(t.file for t in tasks)} "
                         f"({cause}); finished shards are kept: rerun the same command to resume")

    with WorkerPool(workers, _init_worker, (counter, reader)) as pool:
        try:
            results = pool.run(functools.partial(_run_task, out=out, options=options), pending,
                               poll=lambda: seen.__setitem__(0, _advance(pool.bar, counter.value, seen[0])),
                               bar=lambda: progress_bar(bar_spec), died=died)
            for _, record in results:
                yield record
        except KeyboardInterrupt:
            raise PrepError(INTERRUPTED) from None


def disk_nearly_full(out, options) -> bool:
    """Less room left on ``out``'s disk than one more raw shard would take: libhdf5 can take
    its worker down on a failed write instead of reporting it."""
    import shutil

    try:
        free = shutil.disk_usage(out).free
    except OSError:
        return False
    return free < options.shard_size * options.size * options.size * 3


def _advance(bar, now: int, seen: int) -> int:
    bar.update(now - seen)
    return now


# ----------------------------------------------------------------------------- Ray


def run_ray(pending, reader, out, options, workers: int, bar_spec, address: str | None = None,
            upload_to: str | None = None):
    """Yield the record of each pending task as Ray finishes it. Joins the Ray instance this
    process already has, else ``ray.init(address)`` (None starts a local one; "auto" finds a
    running cluster). Ray schedules one task per CPU; ``workers`` does not apply. ``upload_to``:
    a bucket URL; each task then writes its shard on its own node's disk and uploads it there
    (no shared folder needed; the nodes need the bucket's credentials in their environment)."""
    try:
        import ray
    except ImportError:
        raise PrepError("--engine ray needs Ray: pip install 'imgprep[ray]' (or pip install ray)") from None
    if not ray.is_initialized():
        ray.init(address=address, log_to_driver=False)
    if not pending:
        return
    counter = _RayProgress.remote()
    reader_ref = ray.put(reader)  # once into the object store, not once per task
    waiting = {_ray_task.remote(task, reader_ref, str(out), options, counter, upload_to): task for task in pending}
    bar = progress_bar(bar_spec)
    seen = 0
    try:
        while waiting:
            ready, _ = ray.wait(list(waiting), num_returns=1, timeout=0.25)
            seen = _advance(bar, ray.get(counter.value.remote()), seen)
            for ref in ready:
                del waiting[ref]
                yield ray.get(ref)
    except KeyboardInterrupt:
        for ref in waiting:
            ray.cancel(ref, force=True)
        raise PrepError(INTERRUPTED) from None
    finally:
        bar.close()


class _Lazy:
    """A Ray task or actor class made on first use (Ray is an optional extra)."""

    def __init__(self, target, **options):
        self.target, self.options, self.made = target, options, None

    def remote(self, *args):
        if self.made is None:
            import ray

            self.made = ray.remote(**self.options)(self.target)
        return self.made.remote(*args)


class _Progress:
    """Images handled so far, summed from every task (a retried task counts its images again)."""

    def __init__(self):
        self.images = 0

    def add(self, images: int) -> None:
        self.images += images

    def value(self) -> int:
        return self.images


def _shard_task(task, reader, out, options, counter, upload_to=None) -> dict:
    """One shard task on a Ray worker; reports progress every 16 images. With ``upload_to`` the
    shard is built in a temporary folder of the worker's node and uploaded whole."""
    import torch

    torch.set_num_threads(1)
    pending = [0]

    def count():
        pending[0] += 1
        if pending[0] == 16:
            counter.add.remote(pending[0])
            pending[0] = 0

    if upload_to is None:
        record = build_shard(task, reader, out, options, on_image=count)
    else:
        record = _build_and_upload(task, reader, options, count, upload_to)
    counter.add.remote(pending[0])
    return record


def _build_and_upload(task, reader, options, on_image, url: str) -> dict:
    """``build_shard`` into a temporary folder, then its file uploaded to ``url`` as one object;
    the record gains the file's size."""
    import tempfile
    from pathlib import Path

    from prep.build import JOURNAL
    from prep.remote import Remote

    with tempfile.TemporaryDirectory(prefix="imgprep-ray-") as folder:
        (Path(folder) / JOURNAL).mkdir()
        record = build_shard(task, reader, Path(folder), options, on_image=on_image)
        if record["file"]:
            path = Path(folder) / record["file"]
            Remote(url).upload(path, record["file"])
            record["bytes"] = path.stat().st_size
    return record


# max_retries: a task whose worker process dies (killed, out of memory, node lost) runs again;
# its output is the same bytes, written under a temporary name and renamed, like any task's.
_RayProgress = _Lazy(_Progress, num_cpus=0)
_ray_task = _Lazy(_shard_task, num_cpus=1, max_retries=3)
