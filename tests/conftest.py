"""Shared fixtures: a generated ImageNet-shaped tree, its shards and their statistics. Helpers
that tests import live in helpers.py."""

from __future__ import annotations

import shutil

import pytest

from helpers import run_cli
from tools.fake_imagenet import make_fake_imagenet


@pytest.fixture(scope="session")
def fake_src(tmp_path_factory):
    """4 classes x (12 train + 4 val) JPEGs, plus every awkward file in train/n01440764."""
    return make_fake_imagenet(tmp_path_factory.mktemp("fake") / "src", large_fraction=0.1)


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
