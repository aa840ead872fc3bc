"""Output batches on the CPU written into memory that is already mapped, when nobody holds it.

A float32 batch of 128 images at 224 is 77 MB. A fresh tensor of that size is fresh pages from
the kernel (the allocator maps blocks that large anew each time), and the first write to each
page faults and zeroes it: measured on a 2-core VM, writing a new batch cost 240 us an image,
writing the same batch into a tensor already written once 21 us. That was as much as resizing
the image. So the CPU loaders keep a few output tensors and write a batch into one that no
one else refers to any more.

"No one" is checked three ways, so a batch the caller kept is never overwritten: the Python
object's reference count (the caller holds the tensor), the tensor's own use count (autograd
saved it for backward, a DLPack capsule holds it) and its storage's use count (a view, a slice,
``.numpy()``). A tensor that fails any check stays as it is and the batch gets a new one. Those
counts are private torch functions; if they are missing, every batch gets a new tensor, as
before. GPU outputs are not kept: torch's caching allocator already reuses device memory.
"""

from __future__ import annotations

import sys

import torch

KEPT = 3  # tensors kept per shape: the batch being used, the one before it, one spare


def _counts(tensor: torch.Tensor) -> tuple[int, int, int]:
    # getrefcount sees its own argument and this frame's name: compared with the counts taken
    # the same way when the tensor was made, so the constant offsets cancel.
    return (sys.getrefcount(tensor), tensor._use_count(),
            torch._C._storage_Use_Count(tensor.untyped_storage()._cdata))


class ReusedOutputs:
    """``take(shape, dtype)``: a CPU tensor to write a whole batch into, one of the few kept that
    nobody else refers to, or a new one."""

    def __init__(self, kept: int = KEPT):
        self.kept = kept
        self.tensors: dict[tuple, list[tuple[torch.Tensor, tuple]]] = {}  # key -> [(tensor, counts when free)]
        self.usable = hasattr(torch.Tensor, "_use_count") and hasattr(torch._C, "_storage_Use_Count")

    def take(self, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
        if not self.usable:
            return torch.empty(shape, dtype=dtype)
        key = (tuple(shape), dtype)
        entries = self.tensors.setdefault(key, [])
        for tensor, free in entries:
            if _counts(tensor) == free:
                return tensor
        tensor = torch.empty(shape, dtype=dtype)
        if len(entries) < self.kept:
            # Its counts when free, taken with the list and one name holding it, as the loop above sees it.
            entries.append((tensor, None))
            free = _counts(tensor)
            entries[-1] = (tensor, free)
        return tensor
