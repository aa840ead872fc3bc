"""Fault injection: what clusters and real crawls do to a run (kills, preemption, full disks,
damaged or mismatched files), and what the tools must do then. Each test failed before its fix.
docs/RELIABILITY.md lists these promises."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from conftest import assert_group_ends, run_cli, run_command
from tools.fake_imagenet import make_fake_imagenet

pytestmark = pytest.mark.timeout(600)

TESTS = Path(__file__).resolve().parent
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
FAST = ["--device", "cpu", "--backend", "torch", "--workers", "0", "--batch-size", "8"]


def imgprep(*args, timeout=300):
    return run_command([sys.executable, "-m", "prep.cli", *map(str, args)], env=ENV, timeout=timeout)[0]


def train_cli(*args):
    from train.cli import main

    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def tree_bytes(root: Path) -> dict:
    """Every file under ``root`` by relative path -> bytes (shards, manifest, rejects)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------- shard: kills


@pytest.fixture(scope="module")
def slow_src(tmp_path_factory):
    """Enough large images that sharding takes a few seconds on two workers."""
    return make_fake_imagenet(tmp_path_factory.mktemp("slow") / "src", classes=4, train_per_class=40,
                              val_per_class=4, awkward=False, large_fraction=0.5)


@pytest.mark.parametrize("kill", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_a_killed_shard_job_leaves_no_worker_and_no_lock_and_resumes_identically(slow_src, tmp_path, kill):
    clean = tmp_path / "clean"
    assert imgprep("shard", slow_src, "--out", clean, "--shard-size", 8, "--workers", 2, "--quiet").returncode == 0
    out = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, "-m", "prep.cli", "shard", str(slow_src), "--out", str(out),
                                "--shard-size", "8", "--workers", "2", "--quiet"], env=ENV, start_new_session=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not list((out / ".partial").glob("train-*.json")):  # a shard finished: mid-run
        assert process.poll() is None and time.time() < deadline, process.communicate()
        time.sleep(0.02)
    os.kill(process.pid, kill)  # the main process only, as an OOM killer or an impatient user does
    _, stderr = process.communicate(timeout=60)
    if kill == signal.SIGTERM:
        assert process.returncode == 1 and "interrupted; finished shards are kept" in stderr
    assert_group_ends(process.pid)  # its workers die with it
    assert not (out / "manifest.json").exists()
    rerun = imgprep("shard", slow_src, "--out", out, "--shard-size", 8, "--workers", 2, "--quiet")
    assert rerun.returncode == 0, rerun.stderr  # no "another imgprep is writing"
    assert "kept from an earlier run" in rerun.stdout
    assert tree_bytes(out) == tree_bytes(clean)
