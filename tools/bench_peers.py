"""Benchmark: the augment Loader and `imgprep shard` against peer data pipelines (FFCV, SPDL,
DALI's own file reader, a torchvision-style PIL DataLoader), on the same JPEGs, the same cores
and the same output, in one run.

    python -m tools.bench_peers                                # 4 copies of the 400-file corpus
    python -m tools.bench_peers --images 512 --runs 1          # a quick try
    python -m tools.bench_peers --markdown bench/peers.md      # also write the tables
    python -m tools.bench_peers --only FFCV --only "keep shards"  # some loader rows (an A/B)

Every loader path makes the same batches: float32 NCHW, 128 images of 224 x 224, each a
RandomResizedCrop (8-100% of the image's area, aspect 3/4-4/3, resized to 224), mirrored with
p = 0.5 and normalised per channel with ImageNet's mean and std; each uses 2 worker processes or
threads (--workers). For each path we report images/s and the CPU microseconds per image of
every process involved (this one and all its descendants, user + system, from /proc), over
--runs runs (each of whole epochs, at least --seconds long), after a warm-up epoch, as
min / median / max. The writer table
gives images/s (--runs runs, 2 workers, the scan or listing included) and bytes on disk per image.

What each path does, at its best settings we know of for a CPU machine:
- FFCV 1.0.2: .beton files written by FFCV's DatasetWriter from PIL-decoded images, each
  image's longer side reduced to at most 256 (``max_resolution=256``) with OpenCV's INTER_AREA,
  stored ``raw`` or as JPEG q90. Loader: ``RandomResizedCropRGBImageDecoder((224, 224))``
  (decode, then the crop resized with OpenCV's INTER_AREA), ``RandomHorizontalFlip``, then
  ``NormalizeImage(..., np.float32)``, which on the CPU is FFCV's numba lookup table from uint8
  straight to normalised float32, so it stands in for ``Convert(float32)`` + normalise, then
  ``ToTensor`` + ``ToTorchImage`` (an NCHW view in channels-last memory, not a contiguous
  copy); ``order=RANDOM``, ``os_cache=True``, ``drop_last``. The first epoch JIT-compiles the
  pipeline with numba (seconds): it is the warm-up and never timed. Max side 256 stores fewer
  pixels than imgprep's keep shards (shorter side 256): a 4:3 photo is 256 x 192 against
  341 x 256, so FFCV's crops start from ~0.56x the pixels (the writer table has the counts).
- imgprep: `imgprep shard` (``run_shard_job``, 2 processes) writes crop shards (256 x 256, the
  default) and keep shards (``--policy keep``: shorter side 256, aspect kept up to 2:1), raw or
  ``--encoding jpeg --quality 90``. ``Loader(..., spec=AugmentSpec(crop_mode="random-resized",
  lighting=0, normalize="torchvision"), backend="dali" | "torch", device="cpu", workers=2)``;
  on a square crop shard the random-resized window is drawn from the 256 x 256 image. A
  reference row per backend runs the paper's recipe (the default ``AugmentSpec()``: a fixed
  224 window, mirror, PCA lighting, the shards' own per-channel statistics) on raw crop shards,
  another the same with the mean image subtracted instead (what ``train`` does for AlexNet),
  and one reads JPEG keep shards of shorter side 192, which store a 4:3 photo in FFCV's pixels
  (256 x 192): the per-pixel comparison with FFCV's JPEG row. Each epoch is a full seeded
  permutation.
- DALI (its own pipeline, no imgprep code): ``fn.readers.file`` over the JPEG tree with
  ``shuffle_after_epoch`` (a full permutation per epoch), ``fn.decoders.image_random_crop``
  on the CPU (decodes only the window's region where the decoder can), ``fn.resize`` to
  224 x 224 (linear, antialiased), ``fn.crop_mirror_normalize`` with a coin-flip mirror,
  ``device_id=None``, ``num_threads=2``, read through DALI's PyTorch iterator.
- SPDL 0.8: a ``spdl.pipeline`` of 2 threads; each image is demuxed, fully decoded by FFmpeg's
  mjpeg decoder (one thread each, SPDL's default) and passed through an FFmpeg filter graph
  that crops the RandomResizedCrop window (drawn in Python with torchvision's algorithm, from
  the stream's width and height), scales it to 224 x 224 with swscale's bilinear (whose
  filter widens with the reduction, so it antialiases), converts to RGB and mirrors it with
  ``hflip`` on a coin flip; batches of 128 are stacked and normalised with torch in a last
  pipeline stage. SPDL has no crop-aware JPEG decode on the CPU, so every pixel is decoded.
- PIL DataLoader: what torchvision's ImageFolder + RandomResizedCrop + RandomHorizontalFlip +
  ToTensor + Normalize do, written out here (torchvision does not import beside this torch):
  PIL decode, 10 tries of area and log-aspect sampling then a central crop of the clamped
  aspect, ``crop`` then ``resize((224, 224), BILINEAR)`` (antialiased), per sample, in 2
  ``DataLoader`` worker processes (persistent, shuffled, drop_last).

Install the peers (a missing one is skipped with a line saying how to install it):
- FFCV 1.0.2: ``apt-get install pkg-config libopencv-dev libturbojpeg0-dev`` (its C extension
  links OpenCV and libturbojpeg through pkg-config), then
  ``pip install --no-deps ffcv==1.0.2`` (built from the sdist) and
  ``pip install terminaltables pytorch_pfn_extras fastargs assertpy psutil``. ``--no-deps``
  because FFCV asks for ``opencv-python``, which would shadow the ``opencv-python-headless``
  the project already has (both are ``cv2``); it runs with this venv's numpy 2 and numba, so
  it lives in the project's .venv, no second interpreter. Pillow and numba are already there.
- SPDL 0.8: ``apt-get install libavcodec59 libavformat59 libavutil57 libswscale6
  libswresample4 libavfilter8 libavdevice59`` (Debian 12's FFmpeg 5.1 runtime libraries; SPDL's
  wheel carries bindings for FFmpeg 4-9 and loads the one it finds), then
  ``pip install spdl==0.8.0``.
- DALI comes with the project (``nvidia-dali-cuda130``); the PIL DataLoader needs nothing more.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import os
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import click

from prep.procs import all_pids, process_stat
from tools.bench_feed import cpu_seconds
from tools.benchkit import report
from tools.bench_shard import replicated_tree
from tools.photo_corpus import corpus_files, make_corpus

SIDE = 224  # output side of every path
SCALE = (0.08, 1.0)  # RandomResizedCrop: window area / image area
RATIO = (3 / 4, 4 / 3)  # RandomResizedCrop: window width / height
MEAN = (0.485, 0.456, 0.406)  # ImageNet mean and std, pixels on a 0-1 scale
STD = (0.229, 0.224, 0.225)
STORED = 256  # side of the stored images (FFCV: longer side; imgprep: square or shorter side)
FFCV_SHORTER = 192  # imgprep's shorter side that stores a 4:3 photo in FFCV's pixels (256 x 192)

INSTALL = {
    "ffcv": "apt-get install pkg-config libopencv-dev libturbojpeg0-dev && pip install --no-deps ffcv==1.0.2 "
            "&& pip install terminaltables pytorch_pfn_extras fastargs assertpy psutil",
    "spdl.io": "apt-get install libavcodec59 libavformat59 libavutil57 libswscale6 libswresample4 libavfilter8 "
            "libavdevice59 && pip install spdl==0.8.0",
    "nvidia.dali": "pip install nvidia-dali-cuda130",
}


# --- measuring ---------------------------------------------------------------------------------

def process_tree(root: int) -> list[int]:
    """``root`` and every process below it (workers, their helpers), from the parents in /proc."""
    stats = {pid: process_stat(pid) for pid in all_pids()}
    parents = {pid: stat.parent for pid, stat in stats.items() if stat is not None}  # None: ended meanwhile
    tree, frontier = [root], [root]
    while frontier:
        frontier = [pid for pid, parent in parents.items() if parent in frontier]
        tree += frontier
    return tree


def tree_cpu_seconds() -> float:
    """CPU seconds used so far by this process (all its threads) and all its descendants."""
    return cpu_seconds(process_tree(os.getpid()))


def measure(batches, per_epoch: int, batch_size: int, runs: int, least: float) -> list[tuple[float, float]]:
    """(img/s, CPU us/image) of ``runs`` runs, each of whole epochs of ``per_epoch`` batches
    lasting at least ``least`` seconds, after one epoch of warm-up (FFCV's JIT compilation,
    worker start-up, first page-cache reads)."""
    for _ in range(per_epoch):
        check(next(batches), batch_size)
    results = []
    for _ in range(runs):
        # /proc counts CPU in ticks of 10 ms: a run of a second or more keeps that under 1%
        cpu, start, taken = tree_cpu_seconds(), time.perf_counter(), 0
        while taken == 0 or time.perf_counter() - start < least:
            for _ in range(per_epoch):
                images = next(batches)
            taken += per_epoch * batch_size
        seconds, cpu = time.perf_counter() - start, tree_cpu_seconds() - cpu
        check(images, batch_size)
        results.append((taken / seconds, cpu / taken * 1e6))
    return results


def check(images, batch_size: int) -> None:
    """Every path must hand over the same thing: float32 [B, 3, 224, 224] torch tensors."""
    import torch

    if not (isinstance(images, torch.Tensor) and images.dtype == torch.float32
            and tuple(images.shape) == (batch_size, 3, SIDE, SIDE)):
        got = f"{type(images).__name__} {getattr(images, 'dtype', '')} {tuple(getattr(images, 'shape', ()))}"
        raise click.ClickException(f"a path gave {got}, not float32 ({batch_size}, 3, {SIDE}, {SIDE})")


def random_resized_box(width: int, height: int, rng: random.Random) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop window (left, top, w, h): up to 10 draws of an area
    fraction s ~ U(SCALE) and a log aspect ~ U(log RATIO), w = round(sqrt(s A r)),
    h = round(sqrt(s A / r)), kept when it fits; else the central crop of the whole image with
    its aspect clamped to RATIO."""
    area = width * height
    for _ in range(10):
        target = area * rng.uniform(*SCALE)
        aspect = math.exp(rng.uniform(math.log(RATIO[0]), math.log(RATIO[1])))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, width - w), rng.randint(0, height - h), w, h
    if width / height < RATIO[0]:
        w, h = width, round(width / RATIO[0])
    elif width / height > RATIO[1]:
        w, h = round(height * RATIO[1]), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


# --- the loader paths: each a context manager yielding an endless iterator of image batches -----

def epochs(loader, images=lambda batch: batch[0]):
    """The image batches of ``loader``, epoch after epoch (``images`` picks them from a batch)."""
    while True:
        for batch in loader:
            yield images(batch)


@contextlib.contextmanager
def ffcv_batches(beton: Path, batch_size: int, workers: int):
    """FFCV's Loader with the ffcv-imagenet training pipeline, on the CPU."""
    import numpy as np
    from ffcv.fields.decoders import IntDecoder, RandomResizedCropRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import NormalizeImage, RandomHorizontalFlip, Squeeze, ToTensor, ToTorchImage

    image = [RandomResizedCropRGBImageDecoder((SIDE, SIDE), scale=SCALE, ratio=RATIO), RandomHorizontalFlip(),
             NormalizeImage(np.array(MEAN) * 255, np.array(STD) * 255, np.float32), ToTensor(), ToTorchImage()]
    loader = Loader(str(beton), batch_size=batch_size, num_workers=workers, order=OrderOption.RANDOM,
                    os_cache=True, drop_last=True,
                    pipelines={"image": image, "label": [IntDecoder(), ToTensor(), Squeeze()]})
    yield epochs(loader)


@contextlib.contextmanager
def imgprep_batches(shards: Path, batch_size: int, workers: int, backend: str, paper: bool,
                    normalize: str = "channel"):
    """The augment Loader on the CPU: random-resized crops, or the paper's recipe (normalised
    per channel, or by the mean image as ``train`` does for AlexNet)."""
    from augment import AugmentSpec, Loader
    from tools.benchkit import endless

    spec = AugmentSpec(normalize=normalize) if paper else AugmentSpec(crop=SIDE, crop_mode="random-resized", flip=0.5, lighting=0.0,
                                                     normalize="torchvision")
    with Loader(shards, "train", batch_size, spec, backend=backend, device="cpu", workers=workers) as loader:
        yield (images for images, _ in endless(loader))


@contextlib.contextmanager
def dali_batches(tree: Path, batch_size: int, workers: int):
    """DALI's own CPU pipeline: file reader, random-crop decode, resize, crop-mirror-normalise."""
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

    @pipeline_def(batch_size=batch_size, num_threads=workers, device_id=None, seed=0)
    def pipe():
        jpegs, labels = fn.readers.file(file_root=str(tree / "train"), shuffle_after_epoch=True, name="Reader")
        images = fn.decoders.image_random_crop(jpegs, device="cpu", output_type=types.RGB, random_area=list(SCALE),
                                               random_aspect_ratio=list(RATIO), num_attempts=10)
        images = fn.resize(images, resize_x=SIDE, resize_y=SIDE, interp_type=types.INTERP_LINEAR)
        images = fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="CHW",
                                          mean=[m * 255 for m in MEAN], std=[s * 255 for s in STD],
                                          mirror=fn.random.coin_flip(probability=0.5))
        return images, labels

    built = pipe()
    built.build()
    iterator = DALIGenericIterator(built, ["images", "labels"], reader_name="Reader", auto_reset=True,
                                   last_batch_policy=LastBatchPolicy.DROP)
    try:
        yield epochs(iterator, lambda batch: batch[0]["images"])
    finally:
        del iterator, built  # stops DALI's threads


@contextlib.contextmanager
def spdl_batches(files: list[Path], batch_size: int, workers: int):
    """SPDL's thread pipeline: FFmpeg decode + filter-graph crop/scale/mirror, torch normalise."""
    import numpy as np
    import spdl.io
    import torch
    from spdl.pipeline import PipelineBuilder

    mean = torch.tensor(MEAN).view(1, 3, 1, 1) * 255
    std = torch.tensor(STD).view(1, 3, 1, 1) * 255
    rng = random.Random(0)  # drawn from the pipeline's threads; the GIL keeps each draw whole

    def order():
        while True:  # a new permutation per epoch, epoch after epoch
            yield from rng.sample(files, len(files))

    def load(path: Path) -> np.ndarray:
        packets = spdl.io.demux_image(str(path))
        left, top, w, h = random_resized_box(packets.width, packets.height, rng)
        chain = f"crop={w}:{h}:{left}:{top},scale={SIDE}:{SIDE}:flags=bilinear,format=rgb24"
        frames = spdl.io.decode_packets(packets, filter_desc=chain + (",hflip" if rng.random() < 0.5 else ""))
        return spdl.io.to_numpy(spdl.io.convert_frames(frames))  # (224, 224, 3) uint8

    def collate(images: list[np.ndarray]):
        batch = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float()
        return batch.sub_(mean).div_(std).contiguous()

    pipeline = (PipelineBuilder().add_source(order()).pipe(load, concurrency=workers)
                .aggregate(batch_size, drop_last=True).pipe(collate).add_sink(3).build(num_threads=workers))
    with pipeline.auto_stop():
        yield iter(pipeline.get_iterator())


class PilFolder:
    """torchvision's ImageFolder + RandomResizedCrop + flip + ToTensor + Normalize, per sample."""

    def __init__(self, files: list[Path]):
        self.files = files

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        import numpy as np
        import torch
        from PIL import Image

        image = Image.open(self.files[i]).convert("RGB")
        left, top, w, h = random_resized_box(image.width, image.height, random)  # seeded per worker
        image = image.crop((left, top, left + w, top + h)).resize((SIDE, SIDE), Image.BILINEAR)
        if random.random() < 0.5:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        pixels = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float().div_(255)
        return (pixels - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1), 0


@contextlib.contextmanager
def pil_batches(files: list[Path], batch_size: int, workers: int):
    import torch

    loader = torch.utils.data.DataLoader(PilFolder(files), batch_size=batch_size, shuffle=True, num_workers=workers,
                                         drop_last=True, persistent_workers=True)
    try:
        yield epochs(loader)
    finally:
        del loader  # stops the persistent workers


# --- the writers ----------------------------------------------------------------------------------

class PilImages:
    """FFCV's writer input, as in its ImageNet example: (PIL RGB image, label) per file."""

    def __init__(self, files: list[Path]):
        self.files = files

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        from PIL import Image

        return Image.open(self.files[i]).convert("RGB"), 0


def write_beton(files: list[Path], out: Path, mode: str, workers: int) -> float:
    """img/s of FFCV's DatasetWriter, longer side at most 256, raw pixels or JPEG q90."""
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    fields = {"image": RGBImageField(write_mode=mode, max_resolution=STORED, jpeg_quality=90), "label": IntField()}
    start = time.perf_counter()
    with contextlib.redirect_stderr(open(os.devnull, "w")):  # its tqdm bar
        DatasetWriter(str(out), fields, num_workers=workers).from_indexed_dataset(PilImages(files))
    return len(files) / (time.perf_counter() - start)


def write_shards(tree: Path, out: Path, policy: str, encoding: str, workers: int, size: int = STORED) -> float:
    """img/s of `imgprep shard` (scan included), as the CLI runs it."""
    from prep.job import run_shard_job
    from prep.plan import ShardOptions
    from prep.sources import scan_tree

    start = time.perf_counter()
    summary = run_shard_job(scan_tree(tree), out, ShardOptions(size=size, policy=policy, encoding=encoding, quality=90),
                            workers, progress=False)
    return sum(summary.counts.values()) / (time.perf_counter() - start)


def beton_contents(beton: Path) -> tuple[float, float]:
    """(image bytes, pixels) per image of a .beton, from its allocation table and metadata: the
    file itself is larger, as each writer process fills 8 MiB pages and leaves its last part-full."""
    import numpy as np
    from ffcv.reader import Reader

    reader = Reader(str(beton))
    image = reader.metadata["f0"]
    # the allocation table lists the pages' variable-size entries, here only the images
    pixels = (image["width"].astype(np.float64) * image["height"]).mean()
    return reader.alloc_table["size"].sum() / reader.num_samples, float(pixels)


def shard_pixels(sizes: list[tuple[int, int]], policy: str, side: int = STORED) -> float:
    """Mean pixels an image of crop or keep shards of ``side`` holds, from the source images' sizes."""
    if policy == "crop":
        return side * side
    # keep: shorter side to ``side``, the longer cut centrally to at most 2x that
    return sum(side * min(round(max(w, h) * side / min(w, h)), 2 * side) for w, h in sizes) / len(sizes)


# --- the run ----------------------------------------------------------------------------------------

def bench_tree(corpus: Path, images: int) -> Path:
    """A tree of the first ``images`` files of the corpus repeated (4 copies of 400 by default)."""
    files = corpus_files(corpus)
    tree = replicated_tree(corpus, math.ceil(images / len(files)))
    for extra in sorted(tree.glob("train/*/*"))[images:]:
        extra.unlink()
    for folder in tree.glob("train/*"):
        if not any(folder.iterdir()):
            folder.rmdir()
    return tree


def skip(skipped: list[str], line: str) -> None:
    """Say at once that a peer is left out, and keep the line for the tables."""
    click.echo(f"skipped {line}")
    skipped.append(line)


def missing(module: str) -> str | None:
    """Why a peer cannot run (None when it can)."""
    if importlib.util.find_spec(module.split(".")[0]) is None or importlib.util.find_spec(module) is None:
        return f"not installed: {INSTALL[module]}"
    return None


def written(write, out: Path, runs: int) -> list[float]:
    """img/s of ``runs`` runs of ``write(out)``, each into an empty ``out``; the last run's stays."""
    rates = []
    for _ in range(runs):
        if out.is_dir():
            shutil.rmtree(out)
        elif out.exists():
            out.unlink()
        rates.append(write(out))
    return rates


def writer_rows(tree: Path, work: Path, files: list[Path], workers: int, runs: int, skipped: list[str]):
    """Write every store the loader rows read, ``runs`` times; rows (name, img/s of each run, file
    bytes / image, image bytes / image or None where that is the file, pixels / image)."""
    from PIL import Image

    sizes = [Image.open(f).size for f in files]
    rows, stores = [], {}
    if reason := missing("ffcv"):
        skip(skipped, f"FFCV: {reason}")
    else:
        for mode, label in (("raw", "raw"), ("jpg", "JPEG q90")):
            stores[f"ffcv {mode}"] = beton = work / f"{mode}.beton"
            rate = written(lambda out, m=mode: write_beton(files, out, m, workers), beton, runs)
            data, pixels = beton_contents(beton)
            rows.append((f"FFCV DatasetWriter, {label}, max side 256", rate, beton.stat().st_size / len(files),
                         data, pixels))
    # the last: keep JPEG shards of FFCV's pixel count (a 4:3 photo 256 x 192 in both)
    for policy, side, encodings in (("crop", STORED, ("raw", "jpeg")), ("keep", STORED, ("raw", "jpeg")),
                                    ("keep", FFCV_SHORTER, ("jpeg",))):
        what = f"{side} x {side}" if policy == "crop" else f"shorter side {side}"
        for encoding in encodings:
            label = "raw" if encoding == "raw" else "JPEG q90"
            stores[store_name(policy, encoding, side)] = out = work / f"{policy}-{encoding}-{side}"
            rate = written(lambda o, p=policy, e=encoding, s=side: write_shards(tree, o, p, e, workers, s), out, runs)
            size = sum(f.stat().st_size for f in out.rglob("*.h5")) / len(files)
            rows.append((f"imgprep shard --policy {policy}, {label}, {what}", rate, size, None,
                         shard_pixels(sizes, policy, side)))
    return rows, stores


def store_name(policy: str, encoding: str, side: int = STORED) -> str:
    return f"{policy} {encoding}" + ("" if side == STORED else f" {side}")


def loader_paths(tree: Path, files: list[Path], stores: dict, batch: int, workers: int, skipped: list[str]):
    """(row name, context manager factory) of every loader path that can run here."""
    from augment.spec import usable_backends

    paths = []
    if "ffcv raw" in stores:
        paths += [(f"FFCV Loader, {label} .beton", lambda m=mode: ffcv_batches(stores[f"ffcv {m}"], batch, workers))
                  for mode, label in (("raw", "raw"), ("jpg", "JPEG q90"))]
    for backend in usable_backends():
        for policy in ("crop", "keep"):
            for encoding in ("raw", "jpeg"):
                store = stores[store_name(policy, encoding)]
                paths.append((f"imgprep Loader {backend}, {policy} shards {encoding}",
                              lambda b=backend, s=store: imgprep_batches(s, batch, workers, b, paper=False)))
        paths.append((f"imgprep Loader {backend}, crop shards raw, paper recipe (reference)",
                      lambda b=backend: imgprep_batches(stores["crop raw"], batch, workers, b, paper=True)))
        paths.append((f"imgprep Loader {backend}, crop shards raw, paper recipe, mean image (AlexNet's default)",
                      lambda b=backend: imgprep_batches(stores["crop raw"], batch, workers, b, paper=True,
                                                        normalize="mean-image")))
        paths.append((f"imgprep Loader {backend}, keep shards jpeg, shorter side {FFCV_SHORTER} (FFCV's pixels)",
                      lambda b=backend: imgprep_batches(stores[store_name("keep", "jpeg", FFCV_SHORTER)], batch,
                                                        workers, b, paper=False)))
    if reason := missing("nvidia.dali"):
        skip(skipped, f"DALI file reader: {reason}")
    else:
        paths.append(("DALI file reader + image_random_crop, JPEG files", lambda: dali_batches(tree, batch, workers)))
    if reason := missing("spdl.io"):
        skip(skipped, f"SPDL: {reason}")
    else:
        paths.append(("SPDL pipeline, FFmpeg decode + crop/scale filter, JPEG files",
                      lambda: spdl_batches(files, batch, workers)))
    paths.append(("PIL DataLoader (torchvision-style), JPEG files", lambda: pil_batches(files, batch, workers)))
    return paths


def spread(values) -> str:
    """min / median / max."""
    return " / ".join(f"{v:,.0f}" for v in (min(values), statistics.median(values), max(values)))


def peer_versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    found = []
    for name in ("ffcv", "spdl", "nvidia-dali-cuda130", "numba", "numpy", "opencv-python-headless"):
        with contextlib.suppress(PackageNotFoundError):
            found.append(f"{name} {version(name)}")
    return ", ".join(found)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--corpus", type=click.Path(file_okay=False, path_type=Path), default=Path("bench/corpus"),
              show_default=True, help="Photo corpus (400 files generated there when empty).")
@click.option("--images", default=1600, show_default=True, help="JPEGs benchmarked: the corpus repeated, then cut.")
@click.option("--runs", default=3, show_default=True,
              help="Timed runs per loader path (after one warm-up epoch) and per writer.")
@click.option("--seconds", default=3.0, show_default=True, help="Least length of a timed run (whole epochs).")
@click.option("--batch-size", default=128, show_default=True)
@click.option("--workers", default=2, show_default=True, help="Worker processes or threads of every path and writer.")
@click.option("--markdown", type=click.Path(dir_okay=False, path_type=Path), help="Also write the tables here.")
@click.option("--only", multiple=True, metavar="TEXT",
              help="Time only the loader rows whose name holds TEXT (any case; repeatable: --only FFCV --only "
                   "'keep shards jpeg'); the stores are then written once each, untimed by --runs.")
def main(corpus, images, runs, seconds, batch_size, workers, markdown, only):
    """img/s and CPU per image of imgprep's Loader and shard writer against FFCV, SPDL, DALI and PIL."""
    if images < batch_size:
        raise click.UsageError(f"--images {images} is less than one batch of {batch_size}")
    if not corpus_files(corpus):
        click.echo(f"generating a 400-file corpus in {corpus} ...")
        make_corpus(corpus, 400)
    tree = bench_tree(corpus, images)
    work = Path(tempfile.mkdtemp(prefix="bench-peers-"))
    files, skipped, results = sorted(tree.glob("train/*/*")), [], []
    try:
        writer_runs = 1 if only else runs
        click.echo("timing the writers ..." if not only else "writing the stores ...")
        writers, stores = writer_rows(tree, work, files, workers, writer_runs, skipped)
        from prep.stats import compute_stats

        compute_stats(stores["crop raw"], workers=workers, progress=False)  # the paper recipe's statistics
        paths = [(name, batches) for name, batches in loader_paths(tree, files, stores, batch_size, workers, skipped)
                 if not only or any(text.lower() in name.lower() for text in only)]
        if not paths:
            raise click.UsageError(f"no loader row's name holds {' or '.join(map(repr, only))}")
        for name, batches in paths:
            click.echo(f"timing {name} ...")
            with batches() as endless:
                results.append((name, measure(endless, len(files) // batch_size, batch_size, runs, seconds)))
    finally:
        shutil.rmtree(work)
        shutil.rmtree(tree)
    lines = [f"| path ({len(files)} JPEGs, batch {batch_size}, {workers} workers, CPU, {runs} runs) "
             "| img/s (min / median / max) | CPU us / image (min / median / max) |", "|---|---|---|"]
    lines += [f"| {name} | {spread([r for r, _ in measured])} | {spread([c for _, c in measured])} |"
              for name, measured in results]
    lines += ["", f"| writer ({len(files)} JPEGs, {workers} workers, {writer_runs} runs) | img/s (min / median / max) "
              "| KB / image on disk (of which image data) | kilopixels / image |", "|---|---|---|---|"]
    lines += [f"| {name} | {spread(rate)} | {size / 1024:,.1f}" + (f" ({data / 1024:,.1f})" if data else "")
              + f" | {pixels / 1000:,.1f} |" for name, rate, size, data, pixels in writers]
    lines += ["", f"peers: {peer_versions()}"] + [f"skipped {line}" for line in skipped]
    report("\n".join(lines), markdown)


if __name__ == "__main__":
    main()
