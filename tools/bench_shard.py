"""Benchmark: ``imgprep shard`` against a straightforward PIL path, on the same files, in one run.

    python -m tools.bench_shard                      # 400-file corpus in bench/corpus, workers 1 and 2
    python -m tools.bench_shard --images 1000 --workers 1,2,4 --markdown bench/shard.md

Two measurements:
1. Pixels per core (one process, one thread, files already in memory): decode, resize to a
   shorter side of 256 and centre crop. Baseline: Pillow full decode + bilinear resize (what a
   straightforward script does). Ours: ``prep.decode.decode_resize``. Quality of each is the
   PSNR against Pillow full decode + antialiased Lanczos, on the same crop geometry.
2. The whole ``imgprep shard`` job (scan, read files, decode, resize, write raw HDF5 shards,
   hash) with 1..N worker processes, against the same job on 1 worker; then the same files in
   every other source layout (``tools.source_layouts.BUILDERS``) against the extracted tree.
Needs ``pip install '.[bench]'`` for the photographs the corpus is made from.
"""

from __future__ import annotations

import io
import shutil
import tempfile
import time
from pathlib import Path

import click
import numpy as np
from PIL import Image

from tools.benchkit import report
from tools.photo_corpus import corpus_files, make_corpus
from tools.reference import crop_box, lanczos_reference, psnr
from tools.source_layouts import BUILDERS

SIZE = 256


def pil_baseline(data: bytes) -> np.ndarray:
    """The straightforward path: Pillow full decode, bilinear shorter-side resize, centre crop."""
    image = Image.open(io.BytesIO(data)).convert("RGB")
    resized, box = crop_box(*image.size, SIZE)
    return np.asarray(image.resize(resized, Image.BILINEAR).crop(box))


def best_seconds(function, datas, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for data in datas:
            function(data)
        best = min(best, time.perf_counter() - start)
    return best


def pixel_rows(datas, large, repeats):
    """Rows (name, img/s, ratio, psnr mean, psnr min, img/s ordinary, img/s large) for both paths."""
    import torch

    from prep.decode import decode_resize

    torch.set_num_threads(1)
    ours = lambda data: decode_resize(data, SIZE, "crop", 100_000_000)  # noqa: E731
    references = [lanczos_reference(d, SIZE) for d in datas]
    small_set = [d for d, big in zip(datas, large) if not big]
    large_set = [d for d, big in zip(datas, large) if big]
    rows = []
    for name, function in (("Pillow: full decode + bilinear", pil_baseline), ("imgprep decode_resize", ours)):
        seconds = best_seconds(function, datas, repeats)
        scores = [psnr(function(d), r) for d, r in zip(datas, references)]
        rows.append([name, len(datas) / seconds, None, np.mean(scores), np.min(scores),
                     len(small_set) / best_seconds(function, small_set, repeats),
                     len(large_set) / best_seconds(function, large_set, repeats) if large_set else float("nan")])
    for row in rows:
        row[2] = row[1] / rows[0][1]
    return rows


def replicated_tree(corpus: Path, copies: int) -> Path:
    """A temporary tree holding ``copies`` symlinked copies of the corpus, so that the job runs
    long enough for process start-up (about 1.5 s of importing torch) not to dominate."""
    root = Path(tempfile.mkdtemp(prefix="bench-tree-"))
    files = corpus_files(corpus)
    names = sorted({path.parent.name for path in files})
    for copy in range(copies):
        for path in files:
            # class folders named like wnids: Hugging Face's archives take the class from the name
            link = root / "train" / f"n{copy:03d}{names.index(path.parent.name):05d}" / path.name
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(path.resolve())
    return root


def shard_rate(source: Path, workers: int, shard_size: int, engine: str = "local") -> float:
    """img/s of the whole ``imgprep shard`` job on ``source``, its scan included (raw output, then
    deleted): a gzip'd source pays for a pass of decompression in its scan."""
    from prep.job import run_shard_job
    from prep.plan import ShardOptions
    from prep.sources import scan_source

    out = Path(tempfile.mkdtemp(prefix="bench-shard-"))
    try:
        started = time.perf_counter()
        dataset = scan_source(source)
        scan = time.perf_counter() - started
        summary = run_shard_job(dataset, out, ShardOptions(shard_size=shard_size), workers, progress=False,
                                engine=engine)
        return sum(summary.counts.values()) / (scan + summary.seconds)
    finally:
        shutil.rmtree(out)


def job_rows(corpus: Path, workers: list[int], shard_size: int, copies: int, with_ray: bool):
    """Rows (workers, img/s, speed-up over 1 worker, efficiency) of the whole shard job from a
    tree; (tree img/s, {layout: img/s}, Ray img/s or None) at the largest worker count."""
    tree = replicated_tree(corpus, copies)
    layouts = Path(tempfile.mkdtemp(prefix="bench-layouts-"))
    try:
        rows = [[n, shard_rate(tree, n, shard_size)] for n in workers]
        rates = {name: shard_rate(build(tree, layouts / f"{i}"), max(workers), shard_size)
                 for i, (name, build) in enumerate(BUILDERS.items())}
        sources = (shard_rate(tree, max(workers), shard_size), rates,
                   ray_rate(tree, max(workers), shard_size) if with_ray else None)
    finally:
        shutil.rmtree(tree)
        shutil.rmtree(layouts)
    base = next((r[1] for r in rows if r[0] == 1), rows[0][1] / rows[0][0])
    return [[n, rate, rate / base, rate / base / n] for n, rate in rows], sources


def ray_rate(tree: Path, cpus: int, shard_size: int) -> float:
    """The job on a local Ray instance of ``cpus`` CPUs, started before the clock runs."""
    import ray

    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    try:
        return shard_rate(tree, cpus, shard_size, engine="ray")
    finally:
        ray.shutdown()


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--corpus", type=click.Path(file_okay=False, path_type=Path), default=Path("bench/corpus"),
              show_default=True, help="Corpus folder; generated there when empty.")
@click.option("--images", default=400, show_default=True, help="Files in a generated corpus.")
@click.option("--workers", default="1,2", show_default=True, help="Worker counts for the job rows.")
@click.option("--shard-size", default=64, show_default=True, help="Files per shard in the job rows.")
@click.option("--job-copies", default=4, show_default=True, help="Copies of the corpus the job rows shard.")
@click.option("--repeats", default=3, show_default=True, help="Timed passes over the files; the best counts.")
@click.option("--ray/--no-ray", "with_ray", default=None, help="Time the Ray engine too.  [default: when installed]")
@click.option("--markdown", type=click.Path(dir_okay=False, path_type=Path), help="Also write the tables here.")
def main(corpus, images, workers, shard_size, job_copies, repeats, with_ray, markdown):
    """Measure imgprep's shard path against Pillow, per core and across workers."""
    if not corpus_files(corpus):
        click.echo(f"generating a {images}-file corpus in {corpus} ...")
        make_corpus(corpus, images)
    files = corpus_files(corpus)
    datas = [f.read_bytes() for f in files]
    large = [max(Image.open(io.BytesIO(d)).size) >= 1000 for d in datas]
    click.echo(f"{len(files)} files ({sum(large)} large), {sum(map(len, datas)) / 2**20:.1f} MiB")

    lines = ["| path (1 process, 1 thread) | img/s | vs Pillow | PSNR mean dB | PSNR min dB | img/s ordinary | img/s large |",
             "|---|---|---|---|---|---|---|"]
    pixels = pixel_rows(datas, large, repeats)
    for name, rate, ratio, mean, low, small_rate, large_rate in pixels:
        lines.append(f"| {name} | {rate:.0f} | {ratio:.2f}x | {mean:.2f} | {low:.2f} | {small_rate:.0f} | {large_rate:.0f} |")
    lines += ["", f"| `imgprep shard` workers ({job_copies} x {len(files)} files, raw) | img/s | vs 1 worker "
              "| per-worker efficiency | per worker vs Pillow pixels only |", "|---|---|---|---|---|"]
    counts = [int(w) for w in workers.split(",")]
    if with_ray is None:
        import importlib.util

        with_ray = importlib.util.find_spec("ray") is not None
    job, (from_tree, from_layouts, from_ray) = job_rows(corpus, counts, shard_size, job_copies, with_ray)
    for n, rate, speedup, efficiency in job:
        lines.append(f"| {n} | {rate:.0f} | {speedup:.2f}x | {efficiency:.0%} | {rate / n / pixels[0][1]:.2f}x |")
    lines += ["", f"| source of the same files ({max(counts)} workers, scan included) | img/s | vs tree |",
              "|---|---|---|", f"| extracted tree | {from_tree:.0f} | 1.00x |"]
    lines += [f"| {name} | {rate:.0f} | {rate / from_tree:.2f}x |" for name, rate in from_layouts.items()]
    if from_ray:
        lines.append(f"| extracted tree, --engine ray (local Ray, {max(counts)} CPUs) | {from_ray:.0f} | "
                     f"{from_ray / from_tree:.2f}x |")
    report("\n".join(lines), markdown)


if __name__ == "__main__":
    main()
