"""GPU-path defects caught where no GPU is: DALI's start method once CUDA's driver is up, the
spawn start itself on the CPU, and (marked gpu) NCCL at world size one."""

import socket

import pytest
import torch

import augment.dali_backend as dali_backend
from augment import AugmentSpec, Loader
from augment.loader import dali_available

needs_dali = pytest.mark.skipif(not dali_available(), reason="DALI is not installed")


@needs_dali
@pytest.mark.parametrize("dali_driver,torch_cuda,expected", [
    (False, False, "fork"), (True, False, "spawn"), (False, True, "spawn"), (True, True, "spawn")])
def test_cpu_loaders_spawn_once_cuda_is_initialised(monkeypatch, dali_driver, torch_cuda, expected):
    # On a GPU machine torch.cuda.is_available() (conftest, checkpoint code) starts the driver,
    # after which DALI refuses to fork: the choice must follow the driver's state.
    import nvidia.dali.backend

    monkeypatch.setattr(nvidia.dali.backend, "IsDriverInitialized", lambda: dali_driver)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: torch_cuda)
    assert dali_backend.start_method("cpu") == expected
    assert dali_backend.start_method("cuda") == "spawn"


def batches(loader, epoch):
    loader.set_epoch(epoch)
    return [(images.clone(), labels.clone()) for images, labels in loader]


@needs_dali
@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.parametrize("mode", ["train", "val"])
def test_spawned_dali_workers_give_the_torch_backends_batches(stats_shards, monkeypatch, mode):
    # What a GPU machine runs for every device="cpu" DALI loader, checked against the other backend.
    monkeypatch.setattr(dali_backend, "start_method", lambda device: "spawn")
    spec = AugmentSpec(mode=mode, normalize="channel")
    split = "train" if mode == "train" else "val"
    results = {}
    for backend in ("dali", "torch"):
        with Loader(stats_shards, split, batch_size=8, spec=spec, backend=backend, device="cpu", workers=1,
                    seed=3) as loader:
            results[backend] = batches(loader, epoch=2)
    assert len(results["dali"]) == len(results["torch"]) > 0
    for (a, la), (b, lb) in zip(results["dali"], results["torch"]):
        assert torch.equal(la, lb)
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * 64)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.gpu
@pytest.mark.timeout(120)
def test_nccl_runs_at_world_size_one():
    # `--gpus 1` trains in-process without a process group: this is NCCL's first contact.
    import torch.distributed as dist

    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 2).cuda(), device_ids=[0])
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        before = model.module.weight.detach().clone()
        model(torch.ones(3, 4, device="cuda")).sum().backward()
        optimizer.step()
        assert not torch.equal(before, model.module.weight.detach())
        total = torch.tensor([2.5], device="cuda")
        dist.all_reduce(total)
        assert total.item() == 2.5
        gathered = [None]
        dist.all_gather_object(gathered, {"rank": 0})
        assert gathered == [{"rank": 0}]
    finally:
        dist.destroy_process_group()
