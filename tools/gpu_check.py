"""Loader and trainer rates on a GPU, each against its ceiling, in one run (tools/gpu_check.sh).

    python -m tools.gpu_check OUT                      # on a GPU machine: writes OUT/gpu_numbers.json
    python -m tools.gpu_check OUT --dry-run            # the same steps on the CPU at toy size

Makes its own shards (generated images, raw and JPEG-encoded), then times, at batch 256 with
the paper's train recipe:
- the loader: DALI (device "cuda"; JPEG decoded by nvJPEG) and the torch backend, from raw and
  JPEG shards, against the same loop reading a batch already on the GPU (the ceiling);
- the trainer step: AlexNet (paper) and alexnet-owt, bf16 autocast on and off, channels-last,
  torch.compile, on synthetic tensors already on the GPU and fed by the DALI loader.
Every number is images per second after warm-up, with the card's name.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import click
import torch


def make_shards(work: Path, images: int, workers: int) -> dict:
    from prep.job import run_shard_job
    from prep.plan import ShardOptions
    from prep.sources import scan_tree
    from prep.stats import compute_stats
    from tools.fake_imagenet import make_fake_imagenet

    source = make_fake_imagenet(work / "src", classes=4, train_per_class=images // 4, val_per_class=2, awkward=False,
                                large_fraction=0)
    shards = {}
    for encoding in ("raw", "jpeg"):
        out = work / f"shards-{encoding}"
        run_shard_job(scan_tree(source), out, ShardOptions(encoding=encoding, shard_size=256), workers, progress=False)
        compute_stats(out, workers=workers, progress=False)
        shards[encoding] = out
    return shards


def rate(batches, warmup: int, timed: int, device: str, step=None) -> float:
    """Images per second over ``timed`` batches after ``warmup``, each passed to ``step``."""
    iterator = iter(batches)
    for i in range(warmup + timed):
        if i == warmup:
            if device == "cuda":
                torch.cuda.synchronize()
            start, images_seen = time.perf_counter(), 0
        images, labels = next(iterator)
        if step is not None:
            step(images, labels)
        if i >= warmup:
            images_seen += len(labels)
    if device == "cuda":
        torch.cuda.synchronize()
    return images_seen / (time.perf_counter() - start)


def repeat(images, labels):
    while True:
        yield images, labels


def loader_rates(shards: dict, device: str, batch: int, workers: int, warmup: int, timed: int) -> dict:
    from augment import AugmentSpec, Loader
    from augment.loader import dali_available
    from tools.benchkit import endless

    spec = AugmentSpec()
    rows = {}
    for encoding, root in shards.items():
        for backend in ("dali", "torch") if dali_available() else ("torch",):
            with Loader(root, "train", batch, spec, backend=backend, device=device, workers=workers) as loader:
                batches = endless(loader)
                rows[f"loader {backend} {encoding}"] = rate(batches, warmup, timed, device)
                images, labels = next(batches)
        rows[f"ceiling {encoding} (a batch already on the device)"] = rate(repeat(images, labels), warmup, timed,
                                                                          device)
    return rows


def trainer_rates(shards: dict, device: str, batch: int, workers: int, warmup: int, timed: int,
                  compile_too: bool) -> dict:
    from augment import Loader
    from tools.benchkit import endless
    from tools.bench_train import make_step
    from train.config import TrainConfig

    rows = {}
    where = torch.device(device)
    variants = [("bf16", False, False), ("off", False, False), ("bf16", True, False)]
    if compile_too:
        variants.append(("bf16", True, True))
    for arch in ("alexnet", "alexnet-owt"):
        for amp, channels_last, compiled in variants:
            config = TrainConfig(arch=arch, batch_size=batch, device=device, amp=amp, channels_last=channels_last)
            torch.manual_seed(0)
            step = make_step(config, classes=4, compiled=compiled)
            layout = "NHWC" if channels_last else "NCHW"
            name = f"{arch} amp={amp}{' channels-last' if channels_last else ''}{' compile' if compiled else ''}"
            shape = (batch, 224, 224, 3) if channels_last else (batch, 3, 224, 224)
            synthetic = torch.randn(shape, device=where)
            labels = torch.randint(0, 4, (batch,), device=where)
            rows[f"{name}: synthetic"] = rate(repeat(synthetic, labels), warmup, timed, device, step)
            with Loader(shards["raw"], "train", batch, config.augment_spec("train", layout), device=device,
                        workers=workers) as loader:
                rows[f"{name}: DALI loader, raw shards"] = rate(endless(loader), warmup, timed, device, step)
    return rows


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--dry-run", is_flag=True, help="The same steps on the CPU at toy size (checks the script, not the GPU).")
@click.option("--images", default=4096, show_default=True, help="Generated training images (raw and JPEG shards).")
@click.option("--workers", default=8, show_default=True, help="Loader worker processes (and shard workers).")
def main(out, dry_run, images, workers):
    """Loader and trainer images/s on this machine's GPU, each with its ceiling."""
    device = "cpu" if dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise click.ClickException("no CUDA GPU here: use --dry-run to check the script on the CPU")
    batch, warmup, timed = (8, 1, 2) if dry_run else (256, 5, 30)
    images = 64 if dry_run else images
    workers = min(workers, 2) if dry_run else workers
    out.mkdir(parents=True, exist_ok=True)
    work = out / "work"
    started = time.perf_counter()
    try:
        shards = make_shards(work, images, workers)
        numbers = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu (dry run)",
                   "batch": batch, "loader": loader_rates(shards, device, batch, workers, warmup, timed)}
        click.echo(json.dumps(numbers["loader"], indent=1))
        numbers["trainer"] = trainer_rates(shards, device, batch, workers, warmup, timed, compile_too=not dry_run)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    numbers["seconds"] = time.perf_counter() - started
    (out / "gpu_numbers.json").write_text(json.dumps(numbers, indent=2) + "\n")
    click.echo(json.dumps(numbers, indent=1))


if __name__ == "__main__":
    main()
