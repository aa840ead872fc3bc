"""Benchmark: ``imgprep pca-stats`` over raw shards against reading the same files, in one run.

    python -m tools.bench_stats                     # 2000 images (~390 MB), workers 1 and 2
    python -m tools.bench_stats --images 5000 --workers 1,2,4 --markdown bench/stats.md

The shards are synthetic (random pixels; the content does not change the work). The page
cache is warmed first, then ``cat`` of every shard file to /dev/null is timed: the floor any
reader pays. The target is pca-stats within 1.5x of that. A numpy row (float64 conversion and
x.T @ x per image, the obvious exact way) shows what the compiled pass replaces.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import click
import numpy as np

from prep.sources.common import ReadsImagesAlone
from tools.benchkit import report

SIZE = 256


class NoiseReader(ReadsImagesAlone):
    """A source held nowhere: image ``key`` is SIZE x SIZE pixels of seeded noise, handed over
    as an uncompressed PPM (decoding it costs next to nothing). Picklable, as workers need."""

    def __init__(self, seed: int):
        self.seed = seed

    def read(self, key: str, max_bytes: int) -> bytes:
        rng = np.random.default_rng([self.seed, int(key.rsplit("/", 1)[1].split(".")[0])])
        return f"P6 {SIZE} {SIZE} 255\n".encode() + rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8).tobytes()


def synthetic_shards(root: Path, images: int, shard_size: int, seed: int = 0) -> Path:
    """A raw shard folder of ``images`` noise images at SIZE in one 'train' split, written by the
    real shard job (so its format is whatever ``imgprep shard`` writes)."""
    from prep.job import run_shard_job
    from prep.plan import ShardOptions
    from prep.pool import usable_cores
    from prep.sources import ClassInfo, Dataset

    dataset = Dataset(root="synthetic noise", classes=(ClassInfo(0, "n00000000", "noise"),),
                      splits={"train": tuple((f"train/n00000000/{i:07d}.ppm", 0) for i in range(images))},
                      reader=NoiseReader(seed))
    run_shard_job(dataset, root, ShardOptions(size=SIZE, shard_size=shard_size, seed=seed), usable_cores(),
                  progress=False)
    return root


def cat_seconds(files: list[Path]) -> float:
    command = ["cat", *map(str, files)]
    subprocess.run(command, stdout=subprocess.DEVNULL, check=True)  # warm the page cache
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        subprocess.run(command, stdout=subprocess.DEVNULL, check=True)
        best = min(best, time.perf_counter() - start)
    return best


def stats_seconds(root: Path, workers: int) -> float:
    from prep.stats import compute_stats

    best = float("inf")
    for _ in range(2):
        best = min(best, compute_stats(root, workers=workers, progress=False)["seconds"])
    return best


def numpy_images_per_second(root: Path, images: int = 200) -> float:
    """The obvious exact way, per image: float64 conversion and a 3x3 Gram matrix."""
    from prep.shards import open_shards

    train = open_shards(root).split("train")
    pixels = [train[i][0] for i in range(min(images, len(train)))]
    start = time.perf_counter()
    for image in pixels:
        x = image.reshape(-1, 3).astype(np.float64)
        x.T @ x, x.sum(axis=0)
    return len(pixels) / (time.perf_counter() - start)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--images", default=2000, show_default=True, help="Images in the synthetic shards.")
@click.option("--shard-size", default=250, show_default=True)
@click.option("--workers", default="1,2", show_default=True, help="Worker counts to time.")
@click.option("--markdown", type=click.Path(dir_okay=False, path_type=Path), help="Also write the table here.")
def main(images, shard_size, workers, markdown):
    """Time pca-stats against cat of the same raw shards."""
    root = Path(tempfile.mkdtemp(prefix="bench-stats-"))
    try:
        synthetic_shards(root, images, shard_size)
        files = sorted(root.glob("train/*.h5"))
        size = sum(f.stat().st_size for f in files)
        stats_seconds(root, 1)  # compiles (or loads) the numba kernel once
        read = cat_seconds(files)
        lines = [f"| {images} raw images, {size / 2**20:.0f} MiB, page cache warm | seconds | img/s | vs cat |",
                 "|---|---|---|---|",
                 f"| cat to /dev/null | {read:.3f} | {images / read:.0f} | 1.00x |"]
        for n in [int(w) for w in workers.split(",")]:
            seconds = stats_seconds(root, n)
            lines.append(f"| imgprep pca-stats, {n} worker{'s' if n > 1 else ''} | {seconds:.3f} | "
                         f"{images / seconds:.0f} | {seconds / read:.2f}x |")
        rate = numpy_images_per_second(root)
        lines.append(f"| numpy float64 x.T @ x, 1 process (compute only) | {images / rate:.3f} | {rate:.0f} | "
                     f"{images / rate / read:.2f}x |")
        report("\n".join(lines), markdown)
    finally:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
