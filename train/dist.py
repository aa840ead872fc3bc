"""Data-parallel plumbing in plain sight: environment, process group, collectives.

One process per GPU (or per CPU slot with --device cpu). ``train run --gpus N`` starts N local
processes (``train.supervise``: torch's elastic launch API, the same machinery as ``torchrun``);
under ``torchrun`` (several nodes) the processes already exist. Each reads RANK, LOCAL_RANK and
WORLD_SIZE from the environment. NCCL on CUDA, gloo on CPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Context:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def main(self) -> bool:
        """Rank 0 logs and saves; the others only compute."""
        return self.rank == 0


def under_launcher() -> bool:
    """True inside a process started by torchrun or by our own launch()."""
    return "TORCHELASTIC_RUN_ID" in os.environ or "RANK" in os.environ


def setup(device: str) -> Context:
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if device == "cuda":
        torch.cuda.set_device(local_rank)
        where = torch.device("cuda", local_rank)
    else:
        where = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device == "cuda" else "gloo")
    return Context(rank, local_rank, world_size, where)


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def sum_all(values: list[float], context: Context) -> list[float]:
    """Element-wise sum over all ranks (float64)."""
    tensor = torch.tensor(values, dtype=torch.float64, device=context.device)
    if context.world_size > 1:
        dist.all_reduce(tensor)
    return tensor.tolist()


def gather_objects(value, context: Context) -> list:
    """``value`` of every rank, in rank order, on every rank."""
    if context.world_size == 1:
        return [value]
    values = [None] * context.world_size
    dist.all_gather_object(values, value)
    return values
