"""``imgprep pca-stats``: exact colour statistics of a split, for normalisation and PCA lighting.

Over the N pixels x_p in {0..255}^3 (RGB) of every image of the split, with integer sums

    s = sum_p x_p                      (3,)      per-channel sum
    Q = sum_p x_p x_p^T                (3, 3)    second moments
    m = sum over images of the image   (S, S, 3) per-position sum (square shards only)

the statistics, on the 0-255 scale, are

    mean   = s / N
    cov    = Q / N - mean mean^T  =  (N Q - s s^T) / N^2      (population covariance)
    std_c  = sqrt(cov_cc)
    cov v_i = eigval_i v_i,  eigval descending,  v_i = column i of eigvec
    mean image = m / images    (aspect-kept shards, images of many sizes, have none)

Sign rule: each eigenvector is negated if needed so that its component of largest magnitude
is positive (the first, on a tie). The PCA-lighting eigenvalues of the paper's convention
(pixels on a 0-1 scale, as fb.resnet.torch's 0.2175, 0.0188, 0.0045) are eigval / 255^2.

Exactness: s, Q and m are accumulated as integers by a compiled single pass over the pixels
(``prep.pixelsums``, numba), partial sums from the workers are added as integers, and each statistic is rounded
to float64 once at the end (cov from exact fractions). The result does not depend on the
number of workers or on the order of the shards.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import time
from fractions import Fraction
from pathlib import Path

import numpy as np

from prep.atomic import TMP_MARK, atomic_path, atomic_write_text, locked_folder, no_space
from prep.errors import OutputError, PrepError, ShardFormatError
from prep.pool import WorkerPool
from prep.encodings import PixelSums
from prep.shards import MEAN_IMAGE, STATS, manifest_sha256, open_shards, read_document, read_manifest, shard_entries

STATS_FORMAT = "imgprep-stats"


class InvalidStatsError(ShardFormatError):
    """stats.json (or the mean image it names) is there but cannot be used."""


def stats_problem(stats: dict) -> str | None:
    """What is wrong with the fields readers use, or None."""
    shapes = {"mean": (3,), "std": (3,), "eigval": (3,), "eigvec": (3, 3)}
    for key, shape in shapes.items():
        try:
            value = np.asarray(stats[key], dtype=np.float64)
        except (KeyError, TypeError, ValueError):
            return f"'{key}' is missing or not numbers"
        if value.shape != shape or not np.isfinite(value).all():
            return f"'{key}' is not {'x'.join(map(str, shape))} finite numbers"
    if not (stats.get("mean_image") is None or isinstance(stats.get("mean_image"), str)):
        return "'mean_image' does not name a file"
    return None


class StaleStatsError(PrepError):
    """stats.json belongs to other shards than the ones it sits next to."""


def shard_sums(root: Path, split: str, file_no: int, indices=None) -> PixelSums:
    """The exact pixel sums of shard ``file_no`` of ``split`` (of its images ``indices``, or all)."""
    reader = open_shards(root).split(split)
    shard = reader.shard_file(file_no)
    sums = PixelSums(reader.size if reader.square else None)
    try:
        chosen = np.arange(len(shard.labels)) if indices is None else np.asarray(indices, dtype=np.int64)
        shard.images.add_to_sums(chosen, sums)
    finally:
        reader.close()
    return sums


def warm_up_compiled_sums() -> None:
    """Compile (or load from numba's cache) the summing loops once, before the workers fork."""
    from prep.pixelsums import accumulate, accumulate_pixels

    pixels = np.zeros(3, np.uint8)
    pixels.flags.writeable = False  # the signature raw shards (read-only memory maps) use
    one = np.zeros(1, np.int64)
    accumulate(pixels, one, 3, np.zeros(3, np.uint32), np.zeros(6, np.uint64))
    accumulate_pixels(pixels, one, np.array([3], np.int64), np.zeros(9, np.uint64))


def _shard_sums(task) -> PixelSums:
    return shard_sums(*task)


def finish(sums: PixelSums) -> dict:
    """The statistics from the exact integer sums (see the module docstring for the maths)."""
    n, s = sums.pixels, sums.channels
    q = np.empty((3, 3), dtype=object)
    for (c, d), value in zip([(0, 0), (1, 1), (2, 2), (0, 1), (0, 2), (1, 2)], sums.moments):
        q[c, d] = q[d, c] = value
    cov = np.array([[float(Fraction(n * q[c, d] - s[c] * s[d], n * n)) for d in range(3)] for c in range(3)])
    eigval, eigvec = np.linalg.eigh(cov)
    order = np.argsort(eigval)[::-1]
    eigval, eigvec = eigval[order], eigvec[:, order]
    for i in range(3):
        if eigvec[np.argmax(np.abs(eigvec[:, i])), i] < 0:
            eigvec[:, i] = -eigvec[:, i]
    return {
        "images": sums.images,
        "pixels": n,
        "mean": [float(Fraction(v, n)) for v in s],
        "std": np.sqrt(np.diag(cov)).tolist(),
        "cov": cov.tolist(),
        "eigval": eigval.tolist(),
        "eigvec": eigvec.tolist(),
        "mean_image": None if sums.positions is None else sums.positions / sums.images,
    }


def sample_indices(counts: list[int], sample: int | None, seed: int) -> list[np.ndarray | None]:
    """Per shard, the sorted indices of a seeded random subset of ``sample`` images (None: all)."""
    total = sum(counts)
    if sample is None or sample >= total:
        return [None] * len(counts)
    chosen = np.sort(np.random.default_rng(seed).choice(total, size=sample, replace=False))
    starts = np.concatenate([[0], np.cumsum(counts)])
    return [chosen[(chosen >= a) & (chosen < b)] - a for a, b in zip(starts[:-1], starts[1:])]


def compute_stats(root, split: str = "train", workers: int = 1, sample: int | None = None, seed: int = 0,
                  progress: bool = True) -> dict:
    """Compute, write ``stats.json`` and the mean image atomically, and return the statistics."""
    started = time.perf_counter()
    root = Path(root)
    read_manifest(root)  # a clear error for a missing or foreign folder, before the lock creates one
    with locked_folder(root):  # no imgprep shard (or second pca-stats) rewriting the folder meanwhile
        for leftover in [*root.glob(f"{STATS}{TMP_MARK}*"), *root.glob(f"{MEAN_IMAGE}{TMP_MARK}*")]:
            leftover.unlink()  # a save that a kill cut short; we hold the lock, so none is being written
        return _compute_stats(root, split, workers, sample, seed, progress, started)


def _compute_stats(root: Path, split: str, workers: int, sample, seed: int, progress: bool, started: float) -> dict:
    from tqdm import tqdm

    manifest_hash = manifest_sha256(root)  # of the manifest as it is now, not as it may be at the end
    shard_set = open_shards(root)
    reader = shard_set.split(split)
    counts = [e["count"] for e in shard_entries(shard_set.manifest, split)]
    if not sum(counts):
        raise ShardFormatError(f"split '{split}' of {root} has no images")
    subsets = sample_indices(counts, sample, seed)
    tasks = [(root, split, file_no, sub) for file_no, sub in enumerate(subsets) if sub is None or len(sub)]
    warm_up_compiled_sums()
    total = PixelSums(reader.size if reader.square else None)
    planned = sum(len(sub) if sub is not None else counts[file_no] for _, _, file_no, sub in tasks)
    def died(tasks) -> PrepError:
        files = " or ".join(str(root / reader.files[task[2]]) for task in tasks)
        return PrepError(f"a pca-stats worker process died while reading {files} (out of memory?); nothing was written")

    with WorkerPool(workers) as pool:
        bar = functools.partial(tqdm, total=planned, unit="img", desc="pca-stats", disable=not progress,
                                dynamic_ncols=True)
        for _, part in pool.run(_shard_sums, tasks, bar=bar, died=died):
            total.add(part)
            pool.bar.update(part.images)
    stats = finish(total)
    mean_image = stats.pop("mean_image")
    buffer = io.BytesIO()
    if mean_image is not None:  # square shards only: images of many sizes have no mean image
        np.save(buffer, mean_image, allow_pickle=False)
    document = {"format": STATS_FORMAT, "version": 1, "manifest_sha256": manifest_hash, "split": split,
                "scale": 255, "sample": sample, "seed": seed, **stats,
                "mean_image": MEAN_IMAGE if mean_image is not None else None,
                "mean_image_sha256": hashlib.sha256(buffer.getvalue()).hexdigest() if mean_image is not None else None,
                "eigvec_sign_rule": "the largest-magnitude component of each eigenvector is positive"}
    try:  # the mean image first: stats.json names it by hash, so a half-done pair reads as stale
        if mean_image is not None:
            with atomic_path(root / MEAN_IMAGE) as tmp:
                Path(tmp).write_bytes(buffer.getvalue())
        atomic_write_text(root / STATS, json.dumps(document, indent=2) + "\n")
    except OSError as error:
        if no_space(error):
            raise OutputError(f"no space left on {root} to write {STATS}: free space, then run "
                              f"'imgprep pca-stats {root}' again") from None
        raise OutputError(f"cannot write {STATS} in {root}: {error.strerror or error}") from None
    document["seconds"] = time.perf_counter() - started
    return document


def load_stats(root, with_mean_image: bool = False) -> dict:
    """stats.json of a shard folder, after checking it was computed from these very shards."""
    root = Path(root)
    path = root / STATS
    if not path.is_file():
        raise ShardFormatError(f"{root} has no {STATS}: run 'imgprep pca-stats {root}'")
    again = f"run 'imgprep pca-stats {root}' again"
    stats = read_document(path, STATS_FORMAT, InvalidStatsError, "an imgprep statistics file", f": {again}")
    problem = stats_problem(stats)
    if problem:
        raise InvalidStatsError(f"{path} is damaged ({problem}): {again}")
    if stats.get("manifest_sha256") != manifest_sha256(root):
        raise StaleStatsError(f"{path} was computed from other shards than those in {root} "
                              f"(manifest.json changed since): {again}")
    if with_mean_image:
        if stats["mean_image"] is None:
            raise InvalidStatsError(f"{root} holds images of many sizes (policy keep): they have no mean image, so "
                                    "mean-image normalisation cannot apply (use per-channel normalisation)")
        mean_path = root / Path(stats["mean_image"]).name  # only ever a file beside stats.json
        if not mean_path.is_file():
            raise InvalidStatsError(f"{mean_path}, the mean image {STATS} names, is missing: {again}")
        data = mean_path.read_bytes()
        if hashlib.sha256(data).hexdigest() != stats.get("mean_image_sha256"):
            raise StaleStatsError(f"{root / stats['mean_image']} does not belong to {path}: run "
                                  f"'imgprep pca-stats {root}' again")
        stats["mean_image"] = np.load(io.BytesIO(data), allow_pickle=False)
    return stats
