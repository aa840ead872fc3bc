"""The shard plan: which source file goes into which shard, fixed before any pixel is read.

Within a split, files are ordered by a keyed hash of their path,

    order(key) = BLAKE2b-128(seed || 0x00 || key)

and the ordered list is cut into shards of ``shard_size`` files. The hash makes every shard a
mix of classes, gives the same plan on every machine and Python version (no library RNG
involved), and keeps the relative order of the other files when one file is added or removed.
A plan is a list of independent tasks: the local process pool runs them, a cluster engine can
run the same list.

Sources whose images are read in blocks (a parquet row group: ~100 images decompressed
together) say which block holds a key: their reader has ``unit(key) -> str``. Their keys are
ordered by the unit's hash first,

    order(key) = (BLAKE2b-128(seed || 0x00 || unit(key)), BLAKE2b-128(seed || 0x00 || key))

so the units come in a seeded pseudo-random order, each unit's images stay together (in hash
order), and a unit of at most ``shard_size`` images is read by at most two tasks (one of n
images by at most 1 + ceil(n / shard_size)). By the key's hash alone, each shard would touch
~shard_size blocks and a block of n images would be read n times. The price: a shard mixes
~shard_size / (images per unit) units rather than images from all over the split, so where a
source stores its rows by class, a shard holds fewer classes. Training does not mind (the
loader permutes all samples every epoch). Readers without ``unit`` keep the first order exactly.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass

from prep import ENCODINGS, KEEP_ASPECT
from prep.errors import PrepError
from prep.sources import Dataset

POLICIES = ("crop", "squash", KEEP_ASPECT)
ENGINES = ("local", "ray")  # who runs the tasks (prep.engines)


@dataclass(frozen=True)
class ShardOptions:
    """Everything that decides the bytes of the shards."""

    size: int = 256  # output side in pixels (square images), or the shorter side (policy "keep")
    policy: str = "crop"  # "crop": shorter side to size, central window; "squash": both sides to size;
    #                       "keep": shorter side to size, aspect ratio kept (format version 2)
    encoding: str = "raw"  # "raw": uint8 pixels, one image per HDF5 chunk; "jpeg": re-encoded bytes
    quality: int = 90  # JPEG quality 1-100 (encoding "jpeg" only)
    shard_size: int = 1024  # source files per shard, before rejects (raw at 256: ~200 MB a shard)
    seed: int = 0  # seed of the file order across shards
    max_pixels: int = 100_000_000  # decoded width * height above which a file is rejected
    max_aspect: float = 2.0  # policy "keep": the longer side is cut centrally to at most this x size

    def __post_init__(self):
        if not 16 <= self.size <= 4096:
            raise PrepError(f"size must be 16-4096 pixels, got {self.size}")
        if self.policy not in POLICIES:
            raise PrepError(f"policy must be one of {', '.join(POLICIES)}, got {self.policy!r}")
        if self.encoding not in ENCODINGS:
            raise PrepError(f"encoding must be one of {', '.join(ENCODINGS)}, got {self.encoding!r}")
        if not 1 <= self.quality <= 100:
            raise PrepError(f"quality must be 1-100, got {self.quality}")
        if self.shard_size < 1:
            raise PrepError(f"shard size must be at least 1, got {self.shard_size}")
        if self.max_pixels < 1:
            raise PrepError(f"max pixels must be positive, got {self.max_pixels}")
        if not (math.isfinite(self.max_aspect) and 1 <= self.max_aspect <= 64):
            raise PrepError(f"max aspect must be 1-64 (longer side over shorter), got {self.max_aspect}")

    def as_dict(self) -> dict:
        """The options as the manifest records them; max_aspect only where it applies, so square
        shards' manifests are what they were before aspect-kept shards existed."""
        values = asdict(self)
        if self.policy != KEEP_ASPECT:
            del values["max_aspect"]
        return values


@dataclass(frozen=True)
class ShardTask:
    """One shard to write: its split, number and the (key, label) pairs it is planned to hold."""

    split: str
    index: int
    items: tuple[tuple[str, int], ...]

    @property
    def name(self) -> str:
        return f"{self.split}-{self.index:05d}"

    @property
    def file(self) -> str:
        """Path of the shard relative to the output folder."""
        return f"{self.split}/{self.name}.h5"


def order_key(seed: int, key: str) -> bytes:
    return hashlib.blake2b(f"{seed}\0{key}".encode(), digest_size=16).digest()


def item_order(seed: int, unit=None):
    """The sort key of a (key, label) item: (its unit's hash, its hash), ``unit`` being the
    reader's (see the module docstring). Without units (``unit`` None, or giving None) the first
    part is the same for every item, so the order is the hashes' alone."""
    def sort_key(item):
        group = unit(item[0]) if unit is not None else None
        return (b"" if group is None else order_key(seed, group)), order_key(seed, item[0])

    return sort_key


def make_plan(dataset: Dataset, options: ShardOptions) -> list[ShardTask]:
    order = item_order(options.seed, dataset.reader.unit if dataset.reader is not None else None)
    tasks = []
    for split, items in dataset.splits.items():
        ordered = sorted(items, key=order)
        for index, start in enumerate(range(0, len(ordered), options.shard_size)):
            tasks.append(ShardTask(split, index, tuple(ordered[start : start + options.shard_size])))
    return tasks


def plan_fingerprint(tasks: list[ShardTask]) -> str:
    """sha256 of the whole plan: a resumed run must be completing the very same plan."""
    digest = hashlib.sha256()
    for task in tasks:
        for key, label in task.items:
            digest.update(f"{task.file}\t{key}\t{label}\n".encode())
    return digest.hexdigest()
