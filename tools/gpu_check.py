"""Loader and trainer rates on a GPU, each against its ceiling, in one short run (tools/gpu_check.sh).

    python -m tools.gpu_check OUT                      # on a GPU machine: writes OUT/gpu_numbers.json
    python -m tools.gpu_check OUT --dry-run            # the same rows on the CPU at toy size

Makes its own shards (fake_imagenet pictures drawn in the shard job's workers, raw and JPEG),
then times at batch 256 with the trainer's paper recipe, most important first:
- loader: DALI (device "cuda"; JPEG decoded by nvJPEG) and the torch backend, raw and JPEG;
- ceiling: ``augment_batch`` on a uint8 batch already on the GPU (the augmentation alone);
- feed: DALI's feed alone (no image operation), without and with the copy to the device;
- trainer: AlexNet (paper) and alexnet-owt, bf16 autocast on and off, channels-last, on
  synthetic tensors already on the GPU and fed by each backend; one row under
  ``torch.cuda.set_sync_debug_mode("warn")`` counting host-device syncs; torch.compile last.
Every number is images per second after warm-up. OUT/gpu_numbers.json is rewritten atomically
after every row, so a kill at any moment (SIGTERM stops the run in order) keeps every row done.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import click
import numpy as np

from prep.sources.common import ReadsImagesAlone

CLASSES = 4
DRY_ARCH = "tools.gpu_check:toy_cnn"  # the dry run's model (below)


class FakePictures(ReadsImagesAlone):
    """A source held nowhere: key "split/wnid/NNNNN.JPEG" is a fake_imagenet picture of its
    class, drawn and JPEG-encoded when read, so the shard job's worker pool makes the data in
    parallel (no source tree is written). Picklable, as the workers need."""

    def __init__(self, seed: int):
        self.seed = seed

    def read(self, key: str, max_bytes: int) -> bytes:
        from tools.fake_imagenet import SHAPES, class_image, jpeg_bytes

        _, wnid, name = key.split("/")
        label, index = int(wnid[1:]), int(name.split(".")[0])
        rng = np.random.default_rng([self.seed, label, index, key.startswith("val")])
        width, height = SHAPES[rng.integers(len(SHAPES))]
        return jpeg_bytes(class_image(rng, label, CLASSES, width, height), int(rng.integers(75, 96)))


def fake_dataset(train: int, val_per_class: int):
    """``train`` images spread over CLASSES classes, and ``val_per_class`` each to evaluate."""
    from prep.sources import ClassInfo, Dataset

    wnids = [f"n{label:08d}" for label in range(CLASSES)]
    splits = {"train": tuple((f"train/{wnids[i % CLASSES]}/{i:05d}.JPEG", i % CLASSES) for i in range(train)),
              "val": tuple((f"val/{wnid}/{i:05d}.JPEG", label) for label, wnid in enumerate(wnids)
                           for i in range(val_per_class))}
    return Dataset(root="fake pictures", classes=tuple(ClassInfo(i, w, f"class {i}") for i, w in enumerate(wnids)),
                   splits={name: tuple(sorted(pairs)) for name, pairs in splits.items()}, reader=FakePictures(0))


def make_shards(work: Path, images: int, val_per_class: int, workers: int) -> dict:
    """Raw and JPEG shard folders, and aspect-kept raw and JPEG ones ("keep", "keep-jpeg"), with
    colour statistics, of the same fake pictures."""
    from prep.job import run_shard_job
    from prep.plan import ShardOptions
    from prep.stats import compute_stats

    dataset = fake_dataset(images, val_per_class)
    shards = {}
    for name, options in (("raw", ShardOptions(encoding="raw", shard_size=256)),
                          ("jpeg", ShardOptions(encoding="jpeg", shard_size=256)),
                          ("keep", ShardOptions(encoding="raw", policy="keep", shard_size=256)),
                          ("keep-jpeg", ShardOptions(encoding="jpeg", policy="keep", shard_size=256))):
        out = work / f"shards-{name}"
        run_shard_job(dataset, out, options, workers, progress=False)
        compute_stats(out, workers=workers, progress=False)
        shards[name] = out
    return shards


class Numbers:
    """OUT/gpu_numbers.json: the run's header and its rows, rewritten whole and atomically after
    every row (temporary file + os.replace), so a reader never sees half a file."""

    def __init__(self, path: Path, header: dict):
        self.path, self.values, self.started = path, {**header, "state": "running", "rows": []}, time.perf_counter()
        self.write()

    def row(self, section: str, name: str, **values) -> None:
        stop_if_signalled()  # a row measured after a stop was swallowed may be of a half-imported library
        row = {"section": section, "name": name, **values, "at_s": round(time.perf_counter() - self.started, 1)}
        self.values["rows"].append(row)
        click.echo(json.dumps(row))
        self.write()

    def end(self, state: str) -> None:
        self.values["state"] = state
        self.write()

    def write(self) -> None:
        from prep.atomic import atomic_write_text

        self.values["seconds"] = round(time.perf_counter() - self.started, 1)
        atomic_write_text(self.path, json.dumps(self.values, indent=2) + "\n")


def synchronize(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


@dataclass(frozen=True)
class Run:
    """How every row is measured."""

    device: str  # "cuda", or "cpu" in a dry run
    warmup: int  # batches taken before the clock starts
    timed: int  # batches timed
    archs: tuple[str, ...]  # the models of the trainer rows; the last also has the sync and compile rows


def toy_cnn(num_classes: int):
    """The dry run's model (``--arch tools.gpu_check:toy_cnn``): one convolution and one linear
    layer, so the CPU checks that every row runs without paying for AlexNet's 61 M parameters."""
    from torch import nn

    return nn.Sequential(nn.Conv2d(3, 8, kernel_size=5, stride=4), nn.ReLU(), nn.AdaptiveAvgPool2d(4),
                         nn.Flatten(), nn.Linear(8 * 4 * 4, num_classes))


def rate(batches, run: Run, step=None) -> float:
    """Images per second over ``run.timed`` batches after ``run.warmup``, each passed to ``step``."""
    iterator = iter(batches)
    warmup, timed, device = run.warmup, run.timed, run.device
    for i in range(warmup + timed):
        if i == warmup:
            synchronize(device)
            start, images_seen = time.perf_counter(), 0
        images, labels = next(iterator)
        if step is not None:
            step(images, labels)
        if i >= warmup:
            images_seen += len(labels)
    synchronize(device)
    return round(images_seen / (time.perf_counter() - start), 1)


def repeat(images, labels):
    while True:
        yield images, labels


class Loaders:
    """One Loader per (backend, encoding, layout), opened when first asked for and kept (with
    its endless batch iterator) so later rows reuse its running workers; all closed at the end."""

    def __init__(self, shards: dict, device: str, batch: int, workers: int, config_of):
        self.shards, self.device, self.batch, self.workers, self.config_of = shards, device, batch, workers, config_of
        self.open: dict = {}
        self.stack = contextlib.ExitStack()

    def get(self, backend: str, encoding: str = "raw", layout: str = "NCHW"):
        """(loader, its endless batches)."""
        from augment import Loader
        from tools.benchkit import endless

        key = (backend, encoding, layout)
        if key not in self.open:
            spec = self.config_of().augment_spec("train", layout)
            loader = self.stack.enter_context(Loader(self.shards[encoding], "train", self.batch, spec, backend=backend,
                                                     device=self.device, workers=self.workers))
            self.open[key] = (loader, endless(loader))
        return self.open[key]

    def close(self) -> None:
        self.stack.close()


def backends() -> tuple[str, ...]:
    from augment.spec import usable_backends

    return usable_backends()


def loader_rows(numbers: Numbers, loaders: Loaders, run: dict) -> None:
    """Each backend from raw and JPEG shards, the trainer's recipe, no model."""
    for backend in backends():
        for encoding in ("raw", "jpeg"):
            _, batches = loaders.get(backend, encoding)
            numbers.row("loader", f"loader {backend} {encoding}", img_per_s=rate(batches, run))


def keep_rows(numbers: Numbers, loaders: Loaders, run: dict) -> None:
    """Today's recipe: RandomResizedCrop over aspect-kept shards at FFCV's ramp sides, one
    Loader per backend whose side changes by set_epoch (no new workers)."""
    from augment import AugmentSpec, Loader
    from tools.benchkit import endless

    spec = AugmentSpec(crop=224, crop_mode="random-resized", lighting=0.0, normalize="torchvision")
    for backend in backends():
        loader = loaders.stack.enter_context(Loader(loaders.shards["keep"], "train", loaders.batch, spec,
                                                    backend=backend, device=loaders.device, workers=loaders.workers,
                                                    max_res=224))
        for res in (160, 192, 224):
            numbers.row("loader", f"loader {backend} keep random-resized {res}",
                        img_per_s=rate(endless(loader, res=res), run))
    for backend in backends():  # JPEG: nvJPEG (DALI), or only each window decoded in forked workers (torch)
        loader = loaders.stack.enter_context(Loader(loaders.shards["keep-jpeg"], "train", loaders.batch, spec,
                                                    backend=backend, device=loaders.device, workers=loaders.workers))
        numbers.row("loader", f"loader {backend} keep-jpeg random-resized 224", img_per_s=rate(endless(loader), run))


def ceiling_row(numbers: Numbers, loaders: Loaders, run: dict) -> None:
    """The augmentation alone: ``augment_batch`` (crop, mirror, lighting, normalise) on whole
    uint8 images already on the device, with parameters drawn beforehand for a few epochs."""
    import torch

    from augment.params import sample_params
    from augment.torch_ops import augment_batch
    from prep.shards import open_shards

    loader, _ = loaders.get(backends()[0])
    reader = open_shards(loaders.shards["raw"]).split("train")
    indices = np.arange(loaders.batch)
    images = torch.as_tensor(np.stack(reader.stored_many(indices))).to(run.device)  # uint8 [B, S, S, 3]
    labels = torch.zeros(len(indices), dtype=torch.int64, device=run.device)
    spec, size = loader.spec, loader.size
    params = [sample_params(spec, size, 0, epoch, indices) for epoch in range(4)]

    def augmented():
        for i in iter(int, 1):
            yield augment_batch(images, params[i % len(params)], spec, loader.colour), labels

    numbers.row("ceiling", "ceiling: augment_batch on a uint8 batch already on the device",
                img_per_s=rate(augmented(), run))


def feed_rows(numbers: Numbers, loaders: Loaders, run: dict) -> None:
    """DALI's feed alone (``build_pipeline(..., feed_only=True)``: the workers' batches, no image
    operation), then the same with the uint8 batch copied to the device by torch."""
    from augment.loader import dali_available

    if not dali_available():
        numbers.row("feed", "DALI feed only", skipped="DALI is not importable")
        return
    from augment.dali_backend import DaliStream
    from augment.feed import StreamTable

    loader, _ = loaders.get("dali")
    device = run.device
    for copy in (False, True):
        name = "DALI feed only, raw" + (" + copy to the device (torch .to, non-blocking)" if copy else "")
        if copy and device != "cuda":
            numbers.row("feed", name, skipped="n/a on the CPU")
            continue
        table = StreamTable()
        table.add(0, 0, 0, loader.spec.crop)
        stream = DaliStream(loader.request(table), feed_only=True)
        try:
            batches = ((d.images.to(device, non_blocking=True) if copy else d.images, d.labels)
                       for d in iter(stream.__next__, None))
            numbers.row("feed", name, img_per_s=rate(batches, run))
        finally:
            stream.close()
            table.remove()


VARIANTS = [("bf16", False), ("off", False), ("bf16", True)]  # (amp, channels_last)


def trainer_rows(numbers: Numbers, loaders: Loaders, run: dict) -> None:
    """Each arch and variant on synthetic tensors on the device (the trainer's ceiling), then
    fed by each backend from raw shards."""
    import torch

    from tools.bench_train import make_step

    device, batch = run.device, loaders.batch
    for arch in run.archs:
        for amp, channels_last in VARIANTS:
            config = loaders.config_of(arch=arch, amp=amp, channels_last=channels_last)
            name = f"{arch} amp={amp}{' channels-last' if channels_last else ''}"
            torch.manual_seed(0)
            step = make_step(config, classes=CLASSES)
            numbers.row("trainer", f"{name}: synthetic", img_per_s=rate(synthetic(batch, channels_last, device), run, step))
            for backend in backends():
                _, batches = loaders.get(backend, layout="NHWC" if channels_last else "NCHW")
                numbers.row("trainer", f"{name}: {backend} loader, raw", img_per_s=rate(batches, run, step=step))


def synthetic(batch: int, channels_last: bool, device: str):
    import torch

    shape = (batch, 224, 224, 3) if channels_last else (batch, 3, 224, 224)
    return repeat(torch.randn(shape, device=device), torch.randint(0, CLASSES, (batch,), device=device))


def sync_debug_row(numbers: Numbers, loaders: Loaders, run: dict) -> None:
    """The last arch fed by the default backend with CUDA's sync debug mode on: every host-device
    synchronisation in the step or the loader warns, and the warnings are counted."""
    import torch

    from tools.bench_train import make_step

    arch = run.archs[-1]
    name = f"{arch} amp=bf16: loader under set_sync_debug_mode('warn')"
    if run.device != "cuda":
        numbers.row("trainer", name, skipped="n/a on the CPU (no CUDA syncs to count)")
        return
    step = make_step(loaders.config_of(arch=arch), classes=CLASSES)
    _, batches = loaders.get(backends()[0])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            value = rate(batches, run, step=step)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [str(w.message) for w in caught if "synchroniz" in str(w.message)]
    numbers.row("trainer", name, img_per_s=value, sync_warnings=len(syncs), first_sync=syncs[0][:300] if syncs else None,
                counted_over="warm-up and timed steps")


def compile_rows(numbers: Numbers, loaders: Loaders, run: dict) -> None:
    """Last, as it costs the most: the last arch, bf16 channels-last compiled once, then timed on
    synthetic tensors and fed by the default backend."""
    from tools.bench_train import make_step

    arch = run.archs[-1]
    name = f"{arch} amp=bf16 channels-last compile"
    if run.device != "cuda":
        numbers.row("trainer", name, skipped="dry run: torch.compile on the CPU costs minutes")
        return
    step = make_step(loaders.config_of(arch=arch, channels_last=True), classes=CLASSES, compiled=True)
    numbers.row("trainer", f"{name}: synthetic", img_per_s=rate(synthetic(loaders.batch, True, run.device), run, step))
    _, batches = loaders.get(backends()[0], layout="NHWC")
    numbers.row("trainer", f"{name}: {backends()[0]} loader, raw", img_per_s=rate(batches, run, step=step))


ROWS = (loader_rows, keep_rows, ceiling_row, feed_rows, trainer_rows, sync_debug_row, compile_rows)  # most important first


STOPPED: list[int] = []  # the stop signal received, once it has been


def stop_on_sigterm() -> None:
    """``timeout`` (or a test) ends the run with SIGTERM: leave through the finally blocks, so
    the loaders' workers stop and the JSON says how the run ended."""
    def stop(signum, frame):
        # The JSON is ended before the loaders close; should closing a loader caught mid-start
        # hang, SIGALRM's default action ends the process 20 s later with every row kept.
        STOPPED.append(signum)
        signal.alarm(20)
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)


def stop_if_signalled() -> None:
    """Raise the stop again: arriving while a library imports its optional parts, the signal's
    SystemExit can be swallowed by a bare ``except:`` around such an import (seen: the run went
    on to the end), so every row checks for it before it is kept."""
    if STOPPED:
        raise SystemExit(128 + STOPPED[0])


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--dry-run", is_flag=True, help="The same rows on the CPU at toy size (checks the script, not the GPU).")
@click.option("--images", default=1024, show_default=True, help="Generated training images (raw and JPEG shards).")
@click.option("--workers", default=None, type=int, help="Loader and shard workers.  [default: usable cores, 2 dry]")
@click.option("--work", type=click.Path(file_okay=False, path_type=Path),
              help="Where shards go (kept: tools/gpu_check.sh trains on them).  [default: a temporary folder]")
def main(out, dry_run, images, workers, work):
    """Loader and trainer images/s on this machine's GPU, each with its ceiling."""
    import torch

    from prep.pool import usable_cores
    from train.config import TrainConfig

    stop_on_sigterm()
    device = "cpu" if dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise click.ClickException("no CUDA GPU here: use --dry-run to check the script on the CPU")
    batch, warmup, timed = (2, 0, 1) if dry_run else (256, 5, 30)  # dry: one step a row proves the row runs
    images = 16 if dry_run else images
    workers = workers or (2 if dry_run else min(usable_cores(), 16))
    out.mkdir(parents=True, exist_ok=True)
    numbers = Numbers(out / "gpu_numbers.json", {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu (dry run)", "batch": batch,
        "images": images, "workers": workers, "warmup_batches": warmup, "timed_batches": timed})
    run = Run(device, warmup, timed, (DRY_ARCH,) if dry_run else ("alexnet", "alexnet-owt"))
    own_work = work is None
    work = Path(tempfile.mkdtemp(prefix="gpu-check-")) if own_work else work
    loaders = None
    try:
        shards = make_shards(work, images, 1 if dry_run else 4, workers)
        numbers.row("data", "raw and JPEG shards made", images=images)

        def config_of(**changes):
            return TrainConfig(batch_size=batch, device=device, **changes)

        loaders = Loaders(shards, device, batch, workers, config_of)
        for rows in ROWS:
            rows(numbers, loaders, run)
        numbers.end("finished")
    except SystemExit as stop:
        numbers.end(f"stopped (signal {int(stop.code) - 128})" if isinstance(stop.code, int) else "stopped")
        raise
    except BaseException as error:
        numbers.end(f"failed: {type(error).__name__}: {error}"[:500])
        raise
    finally:
        if loaders is not None:
            loaders.close()
        if own_work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
