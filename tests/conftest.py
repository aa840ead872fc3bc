"""Shared fixtures: a generated ImageNet-shaped tree, its shards and their statistics; tests
marked ``gpu`` skip themselves without a CUDA GPU. Helpers that tests import live in helpers.py."""

from __future__ import annotations

import shutil

import pytest

from helpers import run_cli
from tools.fake_imagenet import make_fake_imagenet


def pytest_collection_modifyitems(config, items):
    """Skip the tests marked ``gpu`` when torch sees no CUDA GPU; torch is imported only when
    such a test was collected, so a run of the others does not pay for it here."""
    gpu_tests = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu_tests:
        return
    import torch

    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="marked gpu: needs a CUDA GPU, and torch.cuda.is_available() is false")
        for item in gpu_tests:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def fake_src(tmp_path_factory):
    """4 classes x (12 train + 4 val) JPEGs, plus every awkward file in train/n01440764."""
    return make_fake_imagenet(tmp_path_factory.mktemp("fake") / "src", large_fraction=0.1)


@pytest.fixture(scope="session")
def flat_tree(tmp_path_factory):
    """A small extracted tree with a flat val/ and val_labels.txt (3 classes x (6 train + 3 val)):
    the tree every other source layout is built from, and compared with, in tests."""
    return make_fake_imagenet(tmp_path_factory.mktemp("tree") / "src", classes=3, train_per_class=6,
                              val_per_class=3, flat_val=True, awkward=False, large_fraction=0)


@pytest.fixture(scope="session")
def shards(tmp_path_factory, fake_src):
    """fake_src sharded once with small shards (several per split)."""
    out = tmp_path_factory.mktemp("shards") / "out"
    result = run_cli(["shard", str(fake_src), "--out", str(out), "--shard-size", "16", "--workers", "2", "--quiet"])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture
def fresh_copy(tmp_path, shards):
    """A private copy of the session's shards, free to damage."""
    target = tmp_path / "copy"
    shutil.copytree(shards, target)
    return target


@pytest.fixture(scope="session")
def stats_shards(tmp_path_factory, shards):
    """The session's shards plus stats.json (for lighting and normalisation)."""
    from prep.stats import compute_stats

    target = tmp_path_factory.mktemp("stats") / "shards"
    shutil.copytree(shards, target)
    compute_stats(target, workers=2, progress=False)
    return target


@pytest.fixture(scope="session")
def keep_jpeg_shards(tmp_path_factory, fake_src):
    """fake_src sharded with the aspect kept, as JPEGs, plus its stats.json."""
    from prep.stats import compute_stats

    out = tmp_path_factory.mktemp("keep-jpeg") / "out"
    result = run_cli(["shard", str(fake_src), "--out", str(out), "--policy", "keep", "--encoding", "jpeg",
                      "--shard-size", "16", "--workers", "2", "--quiet"])
    assert result.exit_code == 0, result.output
    compute_stats(out, workers=2, progress=False)
    return out


@pytest.fixture(scope="session")
def keep_shards(tmp_path_factory, fake_src):
    """fake_src sharded with the aspect kept (policy keep), plus its stats.json."""
    from prep.stats import compute_stats

    out = tmp_path_factory.mktemp("keep") / "out"
    result = run_cli(["shard", str(fake_src), "--out", str(out), "--policy", "keep", "--shard-size", "16",
                      "--workers", "2", "--quiet"])
    assert result.exit_code == 0, result.output
    compute_stats(out, workers=2, progress=False)
    return out
