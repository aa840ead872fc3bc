"""Benchmark: the Loader reading shards from a bucket through the local cache, against the same
shards on disk, in one run. The bucket is moto's S3 server on 127.0.0.1 (``pip install
'moto[server]' s3fs``), so the numbers are the cache's and the client's cost, not a network's.

    python -m tools.bench_remote                  # 1,024 images at 128 px, DALI on the CPU

Rows: local shards; the bucket with a cold cache (every file downloaded, sha256-checked); the
same with the cache warm; and a cache of a quarter of the data, where training reads in
shard-window order, and then in a fully random order (forced by replacing the Loader's choice of
window: a user is not offered it): bytes downloaded per epoch (all processes) and img/s. A second table times
``imgprep shard`` of the same JPEGs disk to disk, bucket to disk and bucket to bucket as a tree,
and disk to disk and bucket to disk as an ILSVRC-2012 training tar and as webdataset tars (each
"vs disk" against the same layout on disk).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click

from tools.benchkit import report


def imgprep(*args) -> None:
    subprocess.run([sys.executable, "-m", "prep.cli", *map(str, args)], check=True)


def shard_rate(src, out, images: int, size: int, workers: int) -> float:
    """img/s of ``imgprep shard SRC --out OUT`` as a command (start-up and scan included)."""
    start = time.perf_counter()
    imgprep("shard", src, "--out", out, "--size", size, "--shard-size", 32, "--workers", workers, "--quiet")
    return images / (time.perf_counter() - start)


def epoch_rate(loader, epoch: int) -> float:
    loader.set_epoch(epoch)
    start, n = time.perf_counter(), 0
    for images, _ in loader:
        n += len(images)
    return n / (time.perf_counter() - start)


def bounded_epochs(url: str, cache: Path, limit: int, common: dict, label: str) -> list[tuple[str, float, int]]:
    """(row, img/s, bytes downloaded) of two epochs of a Loader over ``url`` with a cache of
    ``limit`` bytes; ``label`` may name the Loader's {window}."""
    from augment import Loader
    from prep.cache import ShardCache

    rows = []
    with Loader(url, cache=cache, cache_limit=limit, **common) as loader:
        counter = ShardCache(url, cache)
        for epoch in range(2):
            before = counter.downloaded_bytes()
            rate = epoch_rate(loader, epoch)
            rows.append((f"bucket, {label.format(window=loader.window)}, epoch {epoch}", rate,
                         counter.downloaded_bytes() - before))
    return rows


@click.command()
@click.option("--images", default=1024, show_default=True, help="Training images (8 classes).")
@click.option("--size", default=128, show_default=True, help="Shard side in pixels.")
@click.option("--workers", default=2, show_default=True)
@click.option("--markdown", type=click.Path(path_type=Path), help="Also write the table here.")
def main(images, size, workers, markdown):
    import s3fs

    from augment import AugmentSpec, Loader
    from prep.cache import ShardCache
    from tools.fake_imagenet import make_fake_imagenet
    from tools.source_layouts import ilsvrc_archives, webdataset_tars

    work = Path(tempfile.mkdtemp(prefix="imgprep-bench-remote-"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.environ.update({"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "bench",
                       "AWS_SECRET_ACCESS_KEY": "bench",
                       "XDG_CACHE_HOME": str(work / "xdg")})  # no staging folder of an earlier run is reused
    try:
        src = make_fake_imagenet(work / "src", classes=8, train_per_class=images // 8, val_per_class=2,
                                 awkward=False, large_fraction=0)
        shards = work / "shards"
        imgprep("shard", src, "--out", shards, "--size", size, "--shard-size", 32, "--quiet")
        imgprep("pca-stats", shards, "--quiet")
        fs = s3fs.S3FileSystem(skip_instance_cache=True)
        fs.mkdir("bench")
        fs.put(str(shards), "bench/shards", recursive=True)
        url = "s3://bench/shards"
        total = sum(p.stat().st_size for p in (shards / "train").glob("*.h5"))
        spec = AugmentSpec(crop=size * 7 // 8)
        common = dict(batch_size=64, spec=spec, device="cpu", workers=workers, seed=0)
        rows = []
        with Loader(shards, **common) as loader:
            epoch_rate(loader, 0)  # workers started, page cache warm
            local = epoch_rate(loader, 1)
        rows.append(("local shards", local, 0))
        cache = work / "cache"
        with Loader(url, cache=cache, **common) as loader:
            counter = ShardCache(url, cache)
            cold = epoch_rate(loader, 0)
            cold_bytes = counter.downloaded_bytes()
            warm = epoch_rate(loader, 1)
            rows += [("bucket, cold cache", cold, cold_bytes), ("bucket, warm cache", warm,
                                                                counter.downloaded_bytes() - cold_bytes)]
        shutil.rmtree(cache)
        limit = total // 4
        rows += bounded_epochs(url, cache, limit, common, "cache 25% (window of {window} shards)")
        shutil.rmtree(cache)
        import augment.loader

        chosen = augment.loader.window_for
        augment.loader.window_for = lambda reader, window: None  # fully random order: not offered to users
        try:
            rows += bounded_epochs(url, cache, limit, common, "cache 25%, fully random order (forced)")
        finally:
            augment.loader.window_for = chosen
        table = [f"{images:,} train images at {size} px, raw, {len(list((shards / 'train').glob('*.h5')))} shard "
                 f"files, {total / 2**20:.1f} MiB; DALI on the CPU, {workers} workers, batch 64", "",
                 "| path | img/s | vs local | MiB downloaded in the epoch |", "|---|---|---|---|"]
        table += [f"| {name} | {rate:,.0f} | {rate / local:.2f} | {got / 2**20:.1f} |" for name, rate, got in rows]
        fs.put(str(src), "bench/src", recursive=True)
        fs.mkdir("bench-out")
        on_disk = shard_rate(src, work / "again", images, size, workers)
        sharded = [("tree, disk to disk", on_disk, on_disk),  # (row, img/s, img/s of its layout on disk)
                   ("tree, bucket to disk", shard_rate("s3://bench/src", work / "from-bucket", images, size, workers),
                    on_disk),
                   ("tree, bucket to bucket", shard_rate("s3://bench/src", "s3://bench-out/shards", images, size,
                                                         workers), on_disk)]
        for layout, make in (("ILSVRC-2012 train tar", ilsvrc_archives), ("webdataset tars", webdataset_tars)):
            archives = make(src, work / layout.replace(" ", "-"))
            fs.put(str(archives), f"bench/{archives.name}", recursive=True)
            on_disk = shard_rate(archives, work / f"{archives.name}-out", images, size, workers)
            from_bucket = shard_rate(f"s3://bench/{archives.name}", work / f"{archives.name}-from-bucket", images,
                                     size, workers)
            sharded += [(f"{layout}, disk to disk", on_disk, on_disk),
                        (f"{layout}, bucket to disk", from_bucket, on_disk)]
        table += ["", f"| `imgprep shard` of the {images:,} JPEGs, {workers} workers | img/s | vs disk |", "|---|---|---|"]
        table += [f"| {name} | {rate:,.0f} | {rate / disk:.2f} |" for name, rate, disk in sharded]
        report("\n".join(table), markdown)
    finally:
        server.terminate()
        server.wait(timeout=10)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
