"""Benchmark: the augment Loader (DALI and torch backends) from raw shards, against a
torchvision-style DataLoader of the original JPEGs, on the same cores, in one run.

    python -m tools.bench_loader                                   # CPU, 2 workers
    python -m tools.bench_loader --device cuda --batch-size 256    # GPU rows (a CUDA machine)

Every path does the paper's train recipe: a random 224 window of the 256-px image, a mirror
with p = 0.5, PCA lighting and per-channel normalisation, to float32 NCHW. The baseline decodes
each JPEG with Pillow, resizes its shorter side to 256 and applies the same maths per sample
in DataLoader workers, the way torchvision-style pipelines do. Uses the photo corpus of
tools.bench_shard (``pip install '.[bench]'``).

With ``--keep`` (the default) the same run adds today's recipe: aspect-kept shards
(``--policy keep``) with RandomResizedCrop at the sides of FFCV's ramp and its 224, one loader
per backend moved between sides by ``set_epoch(res=...)``; and the bytes an image takes on disk
for crop and keep shards, raw and JPEG (q90).
"""

from __future__ import annotations

import io
import shutil
import tempfile
import time
from pathlib import Path

import click
import numpy as np
import torch
from PIL import Image

from tools.benchkit import endless, report
from tools.photo_corpus import corpus_files, make_corpus


class JpegDataset(torch.utils.data.Dataset):
    """The baseline: one JPEG per item, Pillow decode, per-sample crop/flip/lighting/normalise."""

    def __init__(self, files, colour):
        self.datas = [f.read_bytes() for f in files]
        self.mean = torch.tensor(colour.mean, dtype=torch.float32)[:, None, None]
        self.std = torch.tensor(colour.std, dtype=torch.float32)[:, None, None]
        self.eigval = torch.tensor(colour.eigval, dtype=torch.float32)
        self.eigvec = torch.tensor(colour.eigvec, dtype=torch.float32)

    def __len__(self):
        return len(self.datas)

    def __getitem__(self, i):
        image = Image.open(io.BytesIO(self.datas[i])).convert("RGB")
        scale = 256 / min(image.size)
        image = image.resize((max(256, round(image.width * scale)), max(256, round(image.height * scale))),
                             Image.BILINEAR)
        # torch's generator: the DataLoader seeds each worker differently
        x = int(torch.randint(0, image.width - 224 + 1, ()))
        y = int(torch.randint(0, image.height - 224 + 1, ()))
        image = image.crop((x, y, x + 224, y + 224))
        if torch.rand(()) < 0.5:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32).copy()).permute(2, 0, 1)
        alpha = torch.randn(3) * 0.1
        offset = self.eigvec @ (alpha * self.eigval) / 255
        return (pixels + offset[:, None, None] - self.mean) / self.std, 0


def images_per_second(batches, batch_size: int, warmup: int, timed: int) -> float:
    iterator = iter(batches)
    for _ in range(warmup):
        next(iterator)
    start = time.perf_counter()
    for _ in range(timed):
        images, _ = next(iterator)
    if images.is_cuda:
        torch.cuda.synchronize()
    return timed * batch_size / (time.perf_counter() - start)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--corpus", type=click.Path(file_okay=False, path_type=Path), default=Path("bench/corpus"),
              show_default=True, help="Photo corpus (generated there when empty).")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--workers", default=2, show_default=True, help="Worker processes (and DALI threads) of every path.")
@click.option("--batch-size", default=64, show_default=True)
@click.option("--batches", default=30, show_default=True, help="Timed batches per path (after 3 warm-up).")
@click.option("--baseline/--no-baseline", default=True, show_default=True, help="Time the JPEG DataLoader too.")
@click.option("--keep/--no-keep", default=True, show_default=True,
              help="Also time keep shards with random-resized crops at 160/192/224, and bytes per image.")
@click.option("--markdown", type=click.Path(dir_okay=False, path_type=Path), help="Also write the table here.")
def main(corpus, device, workers, batch_size, batches, baseline, keep, markdown):
    """Images/s of the augment backends against a Pillow JPEG DataLoader."""
    from augment import AugmentSpec, Loader
    from augment.colour import colour_stats
    from augment.spec import usable_backends
    from prep.job import run_shard_job
    from prep.plan import ShardOptions
    from prep.sources import scan_tree
    from prep.stats import compute_stats

    if not corpus_files(corpus):
        make_corpus(corpus, 400)
    work = Path(tempfile.mkdtemp(prefix="bench-loader-"))
    rows = []
    try:
        shards = work / "shards"
        run_shard_job(scan_tree(corpus), shards, ShardOptions(), workers, progress=False)
        compute_stats(shards, workers=workers, progress=False)
        spec = AugmentSpec()
        if baseline:
            dataset = JpegDataset(corpus_files(corpus), colour_stats(shards, spec))
            jpeg = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers,
                                               drop_last=True, persistent_workers=True,
                                               pin_memory=device == "cuda")
            rows.append(("torch DataLoader, Pillow JPEG decode + per-sample maths",
                         images_per_second(endless(jpeg, device), batch_size, 3, batches)))
        backends = usable_backends()
        for backend in backends:
            with Loader(shards, "train", batch_size, spec, backend=backend, device=device, workers=workers) as loader:
                rows.append((f"augment Loader, {backend} backend, raw shards",
                             images_per_second(endless(loader, device), batch_size, 3, batches)))
        if keep:
            kept = work / "keep"
            run_shard_job(scan_tree(corpus), kept, ShardOptions(policy="keep"), workers, progress=False)
            compute_stats(kept, workers=workers, progress=False)
            recipe = AugmentSpec(crop_mode="random-resized")
            for backend in backends:
                with Loader(kept, "train", batch_size, recipe, backend=backend, device=device, workers=workers,
                            max_res=224) as loader:
                    for res in (160, 192, 224):
                        rows.append((f"augment Loader, {backend} backend, keep shards, random-resized to {res}",
                                     images_per_second(endless(loader, device, res), batch_size, 3, batches)))
            sizes = bytes_per_image(corpus, work, shards, kept, workers)
    finally:
        shutil.rmtree(work)
    base = rows[0][1] if baseline else None
    lines = [f"| path ({device}, {workers} workers, batch {batch_size}) | img/s |" + (" vs baseline |" if base else ""),
             "|---|---|" + ("---|" if base else "")]
    for name, rate in rows:
        lines.append(f"| {name} | {rate:,.0f} |" + (f" {rate / base:.1f}x |" if base else ""))
    if keep:
        lines += ["", "| shards (photo corpus) | KB / image | vs crop raw |", "|---|---|---|"]
        lines += [f"| {name} | {size / 1024:,.1f} | {size / sizes['crop, raw']:.2f}x |" for name, size in sizes.items()]
    report("\n".join(lines), markdown)


def bytes_per_image(corpus, work: Path, crop_raw: Path, keep_raw: Path, workers: int) -> dict[str, float]:
    """Bytes on disk per stored image of crop and keep shards, raw and JPEG (q90)."""
    from prep.job import run_shard_job
    from prep.plan import ShardOptions
    from prep.shards import open_shards
    from prep.sources import scan_tree

    folders = {"crop, raw": crop_raw, "keep, raw": keep_raw}
    for policy in ("crop", "keep"):
        folders[f"{policy}, jpeg q90"] = work / f"{policy}-jpeg"
        run_shard_job(scan_tree(corpus), folders[f"{policy}, jpeg q90"], ShardOptions(policy=policy, encoding="jpeg"),
                      workers, progress=False)
    sizes = {}
    for name, folder in folders.items():
        images = len(open_shards(folder).split("train"))
        sizes[name] = sum(f.stat().st_size for f in folder.rglob("*.h5")) / images
    return sizes


if __name__ == "__main__":
    main()
