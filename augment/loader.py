"""``Loader``: batches of augmented shard images on a device, from DALI or from plain torch.

    loader = Loader("shards", "train", batch_size=128, spec=AugmentSpec(), device="cuda",
                    rank=rank, world_size=world, seed=0, workers=4)
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for images, labels in loader: ...

Order, rank split and augmentation are functions of (seed, epoch, sample index, rank, world
size) only (``augment.sampler``, ``augment.params``), so both backends give the same
batches, and ``state_dict``/``load_state_dict`` resume mid-epoch exactly.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import torch
import torch.nn.functional as F

from augment.colour import colour_stats
from augment.errors import AugmentError
from augment.params import sample_params
from augment.sampler import batches_per_epoch, rank_samples
from augment.spec import AugmentSpec
from augment.torch_ops import finish_windows, ten_crop_batch
from prep.shards import open_shards

BACKENDS = ("dali", "torch")


def dali_available() -> bool:
    return importlib.util.find_spec("nvidia.dali") is not None


class Loader:
    def __init__(self, shards, split: str = "train", batch_size: int = 128, spec: AugmentSpec = AugmentSpec(),
                 backend: str | None = None, device: str = "cuda", rank: int = 0, world_size: int = 1,
                 seed: int = 0, workers: int = 4):
        backend = backend or ("dali" if dali_available() else "torch")
        if backend not in BACKENDS:
            raise AugmentError(f"unknown backend {backend!r}: use 'dali' or 'torch'")
        if backend == "dali" and not dali_available():
            raise AugmentError("the DALI backend needs DALI: pip install nvidia-dali-cuda130 (Linux), "
                               "or use backend='torch'")
        if device not in ("cuda", "cpu"):
            raise AugmentError(f"unknown device {device!r}: use 'cuda' or 'cpu'")
        if device == "cuda" and not torch.cuda.is_available():
            raise AugmentError("device='cuda' but torch sees no CUDA GPU: use device='cpu'")
        if not 0 <= rank < world_size:
            raise AugmentError(f"rank {rank} is outside a world of {world_size}")
        self.shard_set = open_shards(shards)
        self.reader = self.shard_set.split(split)
        self.size = self.shard_set.size
        if spec.crop > self.size:
            raise AugmentError(f"crop {spec.crop} is larger than the {self.size} px shard images")
        if batch_size < 1 or (spec.random and batch_size * world_size > len(self.reader)):
            # Training drops the remainder, so one full step over all ranks must fit; evaluation
            # takes any batch size (a short last batch).
            raise AugmentError(f"batch size {batch_size} x {world_size} ranks does not fit split '{split}' "
                               f"of {len(self.reader)} images")
        self.split, self.batch_size, self.spec = split, batch_size, spec
        self.backend, self.device, self.rank, self.world_size = backend, device, rank, world_size
        self.seed, self.workers = seed, workers
        self.colour = colour_stats(shards, spec)
        self.labels = self.reader.labels
        self.epoch, self.position = 0, 0  # next batch to yield: batch `position` of `epoch`
        self._dali = None  # the running DALI stream (an endless iterator) ...
        self._dali_at = None  # ... and the (epoch, batch) its next batch belongs to
        self._mean_image_tensor = None

    def __len__(self) -> int:
        return batches_per_epoch(len(self.reader), self.batch_size, self.rank, self.world_size, self.spec.random)

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.position = epoch, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        if state["seed"] != self.seed or state["world_size"] != self.world_size:
            raise AugmentError(f"loader state was saved with seed {state['seed']} and world size "
                               f"{state['world_size']}; this loader has {self.seed} and {self.world_size}")
        self.epoch, self.position = state["epoch"], state["position"]

    def __iter__(self):
        if len(self) == 0:  # more ranks than evaluation images: this rank has none
            return
        if self.position >= len(self):  # a finished epoch iterated again repeats it (as torch's samplers do)
            self.position = 0
        batches = self._dali_batches() if self.backend == "dali" else self._torch_batches()
        for images, labels in batches:
            self.position += 1
            yield images, labels

    # ------------------------------------------------------------------------- torch backend

    def _torch_batches(self):
        indices = rank_samples(len(self.reader), self.batch_size, self.rank, self.world_size, self.spec.random,
                               self.seed, self.epoch)
        chunks = [indices[i : i + self.batch_size] for i in range(0, len(indices), self.batch_size)]
        cuda = self.device == "cuda"
        stream = torch.utils.data.DataLoader(
            _BatchReader(self.reader, self.spec, self.seed, self.epoch), sampler=chunks[self.position :],
            batch_size=None, num_workers=self.workers, pin_memory=cuda,
        )
        for pixels, labels, batch_indices in stream:
            pixels = pixels.to(self.device, non_blocking=cuda)
            labels = labels.to(self.device, non_blocking=cuda)
            if self.spec.mode == "test10":
                yield ten_crop_batch(pixels, self.spec, self.colour), labels
            else:
                params = sample_params(self.spec, self.size, self.seed, self.epoch, batch_indices.numpy())
                yield finish_windows(pixels, params, self.spec, self.colour, self._mean_image()), labels

    # ------------------------------------------------------------------------- DALI backend

    def _dali_batches(self):
        wanted = (self.epoch, self.position)
        # Evaluation batches do not depend on the epoch: any epoch's stream at this position will do.
        current = self._dali_at and (self._dali_at if self.spec.random else (self.epoch, self._dali_at[1]))
        if self._dali is None or current != wanted:
            self._start_dali()
        for _ in range(len(self) - self.position):
            output = next(self._dali)[0]
            images, labels = output["images"], output["labels"].reshape(-1)
            keep = labels >= 0
            if not bool(keep.all()):  # padding of the last evaluation batch
                images, labels = images[keep], labels[keep]
            epoch, position = self._dali_at
            self._dali_at = (epoch + 1, 0) if position + 1 == len(self) else (epoch, position + 1)
            yield images, labels

    def _start_dali(self):
        """(Re)start the endless DALI stream at batch ``position`` of ``epoch``."""
        from nvidia.dali.plugin.pytorch import DALIGenericIterator

        from augment.dali_pipeline import ShardSource, build_pipeline

        self.close()
        source = ShardSource(self.shard_set.root, self.split, self.spec, self.colour, self.batch_size, self.rank,
                             self.world_size, self.seed, self.epoch, self.position * self.batch_size)
        pipe = build_pipeline(source, self.spec, self.shard_set.encoding, self.size, self.batch_size, self.device,
                              self.workers)
        self._dali = DALIGenericIterator(pipe, ["images", "labels"], auto_reset=False)
        self._dali_at = (self.epoch, self.position)

    def _mean_image(self):
        """The mean image as a device tensor, copied there once (mean-image normalisation)."""
        if self.colour.mean_image is None:
            return None
        if self._mean_image_tensor is None:
            self._mean_image_tensor = torch.as_tensor(self.colour.mean_image, device=self.device)
        return self._mean_image_tensor

    def close(self) -> None:
        """Drop the DALI stream; DALI stops its pipeline and worker processes when it is freed."""
        self._dali = None


class _BatchReader(torch.utils.data.Dataset):
    """Reads one whole batch per call in the DataLoader's worker processes, and cuts each
    sample's window (and mirrors it) there: less to copy to the device, the same maths as
    ``torch_ops.crop`` and ``torch_ops.mirror``. test10 batches stay whole."""

    def __init__(self, reader, spec: AugmentSpec, seed: int, epoch: int):
        self.reader, self.spec, self.seed, self.epoch = reader, spec, seed, epoch

    def __getitem__(self, indices):
        size, crop = self.reader.size, self.spec.crop
        whole = self.spec.mode == "test10"
        side = size if whole else crop
        pixels = np.empty((len(indices), side, side, 3), dtype=np.uint8)
        labels = np.empty(len(indices), dtype=np.int64)
        params = sample_params(self.spec, size, self.seed, self.epoch, indices)
        raw = self.reader.encoding == "raw"
        for i, index in enumerate(indices):
            image, labels[i] = self.reader.stored(int(index)) if raw else self.reader[int(index)]
            if not whole:
                x, y = params.x[i], params.y[i]
                if params.width is None:
                    image = image[y : y + crop, x : x + crop]
                else:  # random-resized: uint8 antialiased bilinear, torch's vectorised kernel
                    window = torch.from_numpy(np.ascontiguousarray(image[y : y + params.height[i], x : x + params.width[i]]))
                    image = F.interpolate(window.permute(2, 0, 1)[None], size=(crop, crop), mode="bilinear",
                                          antialias=True)[0].permute(1, 2, 0).numpy()
                image = image[:, ::-1] if params.mirror[i] else image
            pixels[i] = image
        return torch.from_numpy(pixels), torch.from_numpy(labels), torch.as_tensor(indices)

    def __len__(self):
        return len(self.reader)
