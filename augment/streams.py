"""What a loader backend is handed and what it hands back: the contract both backends meet.

A backend starts an endless stream of batches (``augment.feed``) in its worker processes and
returns a ``Stream``: ``next()`` gives the next batch of the stream as ``Delivered`` (full batches:
the Loader keeps the first ``count`` rows), ``pids`` names the workers, ``close()`` stops them for
certain.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from augment.colour import ColourStats
from augment.feed import BatchPlan, StreamTable
from augment.spec import AugmentSpec


@dataclass(frozen=True)
class StreamRequest:
    """Everything a backend needs to start a stream (and nothing that keeps the Loader alive)."""

    root: str  # the shard folder
    split: str
    plan: BatchPlan
    table: StreamTable  # where each batch of the stream belongs
    spec: AugmentSpec
    colour: ColourStats
    device: str  # "cuda" or "cpu"
    workers: int
    size: int  # S: the side of square images, the shorter side of aspect-kept ones
    max_side: int  # the longest side a stored image may have
    square: bool  # every stored image S x S
    compressed: bool  # the shards hold JPEG blobs
    max_res: int  # the largest output side the stream will be asked for
    resize_on: str | None = None  # DALI only: where windows are cut and resized, "device" or "workers"
    #                               (None: the workers for resized windows on the CPU, else the device)
    cache: object = None  # the prep.cache.ShardCache whose local folder ``root`` is, for a remote folder

    @property
    def batch_size(self) -> int:
        return self.plan.batch_size


@dataclass(frozen=True)
class Delivered:
    images: torch.Tensor  # [B, ...] on the device
    labels: torch.Tensor  # int64 [B] on the device
    generation: int  # the stream table's row it was planned by
    epoch: int
    position: int


class Stream(Protocol):
    pids: list[int]

    def __next__(self) -> Delivered: ...

    def close(self) -> None: ...
