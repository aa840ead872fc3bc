"""CPU output tensors are reused only when nobody refers to them (augment.buffers)."""

import numpy as np
import pytest
import torch

from augment import AugmentSpec, Loader
from augment.buffers import ReusedOutputs
from augment.loader import dali_available

needs_dali = pytest.mark.skipif(not dali_available(), reason="DALI is not installed")
SHAPE = (4, 3, 8, 8)


def test_a_tensor_anyone_still_refers_to_is_never_given_again():
    outputs = ReusedOutputs()
    first = outputs.take(SHAPE, torch.float32)
    address = first.data_ptr()
    holders = {  # ways a caller keeps a batch alive without keeping the name it was given
        "a view": lambda t: t[1:],
        "a reshape": lambda t: t.reshape(-1),
        "numpy": lambda t: t.numpy(),
        "autograd": lambda t: t * torch.ones(SHAPE, requires_grad=True),  # saves t for backward
        "dlpack": lambda t: torch.utils.dlpack.to_dlpack(t),
        "a list": lambda t: [t],
    }
    for name, hold in holders.items():
        kept = hold(first)
        del first
        given = [outputs.take(SHAPE, torch.float32) for _ in range(3)]
        assert address not in [t.data_ptr() for t in given], name
        del given, kept
        first = outputs.take(SHAPE, torch.float32)
        assert first.data_ptr() == address, f"released after {name}, yet not reused"


def test_a_dropped_tensor_is_written_again_and_other_shapes_get_their_own():
    outputs = ReusedOutputs()
    addresses = set()
    for _ in range(6):
        tensor = outputs.take(SHAPE, torch.float32)
        addresses.add(tensor.data_ptr())
        del tensor
    assert len(addresses) == 1
    held = outputs.take(SHAPE, torch.float32)
    other = outputs.take((2, 3, 8, 8), torch.float32)
    assert other.shape == (2, 3, 8, 8) and other.data_ptr() != held.data_ptr()
    assert outputs.take(SHAPE, torch.float16).dtype == torch.float16


@pytest.mark.timeout(300)  # loaders start worker processes
@pytest.mark.parametrize("backend", [pytest.param("dali", marks=needs_dali), "torch"])
@pytest.mark.parametrize("crop_mode", ["paper", "random-resized"])
def test_batches_kept_by_the_caller_stay_as_they_were_given(keep_shards, stats_shards, backend, crop_mode):
    root = keep_shards if crop_mode == "random-resized" else stats_shards
    spec = AugmentSpec(crop_mode=crop_mode, crop=64)
    with Loader(root, "train", 8, spec, backend=backend, device="cpu", workers=1, seed=4) as loader:
        loader.set_epoch(0)
        copies, addresses = [], set()
        for images, _ in loader:  # each batch dropped once copied: the loader may write there again
            copies.append(images.clone())
            addresses.add(images.data_ptr())
            del images
        loader.set_epoch(0)
        kept = [images for images, _ in loader]  # every batch held at once
    assert len(kept) == len(copies) >= 4
    assert len(addresses) <= 3  # a dropped batch's memory was written again
    assert len({t.data_ptr() for t in kept}) == len(kept)
    for held, copy in zip(kept, copies):
        assert torch.equal(held, copy)
    assert np.isfinite(torch.stack(kept).numpy()).all()
