"""Benchmark: the CPU cost per sample of each backend's feed against the floor of copying the
same images out of the page cache, in one run on the same cores.

    python -m tools.bench_feed                          # 4096 images, batch 256, 1 worker per backend
    python -m tools.bench_feed --images 8192 --markdown bench/feed.md

"Feed" is everything the Loader's worker processes do before DALI's or torch's image
operations: pick the batch's samples (this epoch's permutation, this rank's slice), draw their
crops, mirrors and lighting, cut each window where the workers cut them (the torch backend on
the CPU; DALI for resized windows or where resize_on="workers" asks), and move those uint8
pixels to where the image operations read them (DALI's shared memory, or the torch backend's
shared buffers). It is measured as the CPU time (user + system, from /proc) the worker
processes spend per sample while the Loader runs the paper's train recipe on the CPU, after
warm-up.

The headline ratio is the feed alone: the same worker processes, with the main process only
taking their batches. A second row per backend measures the same workers while DALI's or
torch's image operations run beside them on the same cores; on a small machine those compete
for memory bandwidth and caches, which slows the copies themselves.

The floor is one process copying each image, in the same random order, out of the shards'
memory maps into a batch array: the least any feed must do. Shards are synthetic raw shards
(random pixels: the content does not change a copy), read once first so the page cache is warm.
The target is <= 1.5x the floor for both backends (BENCHMARKS.md says what the windows cost).
The last line is exactly ``feed vs copy floor: dali X.XXx, torch Y.YYx``.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import click
import numpy as np

from prep.procs import process_stat
from tools.bench_stats import synthetic_shards
from tools.benchkit import report


def cpu_seconds(pids) -> float:
    """User + system CPU time of processes ``pids`` so far (Linux /proc; those gone count 0)."""
    return sum(stat.cpu_seconds for stat in map(process_stat, pids) if stat is not None)


def copy_floor(root: Path, batch_size: int, samples: int, seed: int) -> float:
    """CPU seconds per sample to copy images, in a random order, out of memory maps into a batch
    array: h5py finds each image's byte offset once, then a plain memory copy per image."""
    import h5py

    from prep.shards import read_manifest, shard_entries

    manifest = read_manifest(root)
    maps, offsets = [], []
    for entry in shard_entries(manifest, "train"):
        path = root / entry["file"]
        with h5py.File(path, "r") as f:
            images = f["images"]
            offsets.append([images.id.get_chunk_info(i).byte_offset for i in range(images.shape[0])])
        maps.append(np.memmap(path, dtype=np.uint8, mode="r"))
    where = [(m, o) for m, file_offsets in zip(maps, offsets) for o in file_offsets]
    size = manifest["options"]["size"]
    nbytes = size * size * 3
    order = np.random.default_rng(seed).permutation(len(where))
    batch = np.empty((batch_size, size, size, 3), np.uint8)
    flat = batch.reshape(batch_size, -1)
    done, start = 0, time.process_time()
    while done < samples:
        for row, k in enumerate(order[(done % len(order)) : (done % len(order)) + batch_size]):
            image_map, offset = where[k]
            flat[row] = image_map[offset : offset + nbytes]
        done += batch_size
    return (time.process_time() - start) / done


def feed_cost(root: Path, backend: str, batch_size: int, samples: int, workers: int, alone: bool) -> float:
    """Worker CPU seconds per sample of the Loader's train recipe on the CPU. ``alone``: the
    same workers, with the main process only taking their batches (no image operations
    competing with them for memory bandwidth)."""
    from augment import AugmentSpec, Loader
    from augment.feed import StreamTable

    with Loader(root, "train", batch_size, AugmentSpec(), backend=backend, device="cpu", workers=workers) as loader:
        if not alone:
            batches = (labels for _, labels in endless(loader))
            return worker_cpu_per_sample(batches, loader.worker_pids, workers, samples)
        table = StreamTable()
        table.add(0, 0, 0, loader.spec.crop)
        try:
            if backend == "dali":
                from augment.dali_backend import DaliStream

                stream = DaliStream(loader.request(table), feed_only=True)
                taken = (next(stream).labels for _ in iter(int, 1))
            else:
                from augment.torch_backend import TorchStream

                stream = TorchStream(loader.request(table))
                taken = (next(stream.iterator).batch.labels for _ in iter(int, 1))
            try:
                return worker_cpu_per_sample(taken, lambda: stream.pids, workers, samples)
            finally:
                stream.close()
        finally:
            table.remove()


def worker_cpu_per_sample(batches, worker_pids, workers: int, samples: int) -> float:
    """CPU seconds the workers spend per sample while ``batches`` (of labels) are taken."""
    # Past the warm-up the workers stay a fixed number of batches ahead (their prefetch queue
    # is full, or they are the bottleneck and never idle), so the CPU they use between two
    # batches taken is the work of one batch.
    for _ in range(workers * 2 + 3):
        next(batches)
    pids = worker_pids()
    before, done = cpu_seconds(pids), 0
    while done < samples:
        done += len(next(batches))
    return (cpu_seconds(pids) - before) / done


def endless(loader):
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        yield from loader
        epoch += 1


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--images", default=4096, show_default=True, help="Synthetic raw images (192 KiB each).")
@click.option("--batch-size", default=256, show_default=True)
@click.option("--samples", default=20480, show_default=True, help="Timed samples per path (after warm-up).")
@click.option("--workers", default=1, show_default=True, help="Worker processes of each backend.")
@click.option("--markdown", type=click.Path(dir_okay=False, path_type=Path), help="Also write the table here.")
def main(images, batch_size, samples, workers, markdown):
    """CPU per sample of each backend's feed against copying the same images out of the page cache."""
    from augment.spec import usable_backends
    from prep.stats import compute_stats

    work = Path(tempfile.mkdtemp(prefix="bench-feed-"))
    try:
        root = synthetic_shards(work / "shards", images, shard_size=512)
        compute_stats(root, workers=1, progress=False)  # the lighting eigenpairs
        for file in sorted(root.glob("train/*.h5")):  # warm the page cache
            file.read_bytes()
        floor = copy_floor(root, batch_size, samples, seed=0)
        rows = [("copy out of the page cache (floor)", floor)]
        backends = usable_backends()
        for backend in backends:
            for alone in (True, False):
                where = "alone" if alone else "inside the full train pipeline"
                rows.append((f"{backend} backend feed, {where} ({workers} worker)",
                             feed_cost(root, backend, batch_size, samples, workers, alone)))
    finally:
        shutil.rmtree(work)
    lines = [f"| path ({images} raw images, batch {batch_size}, random order) | CPU us / sample | vs floor |",
             "|---|---|---|"]
    for name, seconds in rows:
        lines.append(f"| {name} | {seconds * 1e6:.1f} | {seconds / floor:.2f}x |")
    report("\n".join(lines), markdown)
    ratios = {name.split()[0]: seconds / floor for name, seconds in rows[1:] if ", alone" in name}
    click.echo("feed vs copy floor: " + ", ".join(f"{b} {ratios[b]:.2f}x" if b in ratios else f"{b} n/a"
                                                 for b in ("dali", "torch")))


if __name__ == "__main__":
    main()
