"""Benchmark: training images/s of the whole pipeline (shards -> Loader -> model step) against
the same model fed one synthetic batch already on the device, in one run.

    python -m tools.bench_train                                  # CPU: AlexNet, batch 32
    python -m tools.bench_train --device cuda --batch-size 128 --steps 50

The gap between the two is what the data path costs the GPU; the target on a GPU is the real
pipeline at >= 95% of the synthetic rate. Shards come from tools.fake_imagenet (the content
does not matter for speed).
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import click
import torch

from tools.benchkit import endless, report


def timed_steps(batches, step, warmup: int, steps: int, device: torch.device) -> float:
    """Images per second over ``steps`` calls of ``step(images, labels)`` after ``warmup``."""
    iterator = iter(batches)
    images = None
    for i in range(warmup + steps):
        if i == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        images, labels = next(iterator)
        step(images, labels)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * len(images) / (time.perf_counter() - start)


def make_step(config, classes: int, compiled: bool = False):
    """``step(images, labels)``: one SGD step of the trainer (train.loop.train_step) on a fresh
    model of ``config.arch``, in its memory format, compiled if asked."""
    from train.loop import make_optimizer, train_step
    from train.models import build_model

    where = torch.device(config.device)
    model = build_model(config.arch, classes).to(where)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    net = torch.compile(model) if compiled else model
    optimizer = make_optimizer(model, config)
    scaler = torch.amp.GradScaler("cuda", enabled=False)  # bf16 autocast needs no loss scaling
    net.train()

    def step(images, labels):
        train_step(net, images, labels, optimizer, scaler, config, where)

    return step


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--arch", default="alexnet", show_default=True)
@click.option("--batch-size", default=32, show_default=True)
@click.option("--steps", default=10, show_default=True, help="Timed steps per row (after 3 warm-up steps).")
@click.option("--workers", default=2, show_default=True, help="Loader workers.")
@click.option("--backend", type=click.Choice(["dali", "torch"]), default=None, help="[default: dali if installed]")
@click.option("--channels-last", is_flag=True)
@click.option("--markdown", type=click.Path(dir_okay=False, path_type=Path), help="Also write the table here.")
def main(device, arch, batch_size, steps, workers, backend, channels_last, markdown):
    """Training img/s, real pipeline against synthetic tensors on the device."""
    from augment import Loader
    from prep.job import run_shard_job
    from prep.plan import ShardOptions
    from prep.sources import scan_tree
    from prep.stats import compute_stats
    from tools.fake_imagenet import make_fake_imagenet
    from train.config import TrainConfig

    work = Path(tempfile.mkdtemp(prefix="bench-train-"))
    try:
        per_class = max(40, (steps + 4) * batch_size // 4 + 1)
        source = make_fake_imagenet(work / "src", classes=4, train_per_class=per_class, val_per_class=1, awkward=False,
                                    large_fraction=0)
        run_shard_job(scan_tree(source), work / "shards", ShardOptions(), workers, progress=False)
        compute_stats(work / "shards", workers=workers, progress=False)
        config = TrainConfig(arch=arch, batch_size=batch_size, device=device, channels_last=channels_last)
        where = torch.device(device)
        step = make_step(config, classes=4)
        layout = "NHWC" if channels_last else "NCHW"
        synthetic = torch.randn((batch_size, 224, 224, 3) if channels_last else (batch_size, 3, 224, 224), device=where)
        labels = torch.randint(0, 4, (batch_size,), device=where)
        rows = [("synthetic tensors already on the device", timed_steps(iter(lambda: (synthetic, labels), None), step,
                                                                       3, steps, where))]
        with Loader(work / "shards", "train", batch_size, config.augment_spec("train", layout),
                    backend=backend, device=device, workers=workers) as loader:
            rows.append((f"shards -> Loader ({loader.backend}) -> step",
                         timed_steps(endless(loader), step, 3, steps, where)))
    finally:
        shutil.rmtree(work)
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    lines = [f"| {arch}, batch {batch_size}, {name} | img/s | vs synthetic |", "|---|---|---|"]
    lines += [f"| {label} | {rate:,.1f} | {rate / rows[0][1]:.0%} |" for label, rate in rows]
    report("\n".join(lines), markdown)


if __name__ == "__main__":
    main()
