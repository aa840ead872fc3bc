"""``imgprep shard --engine ray``: the same bytes as the local engine, and Ray's retries when a
worker dies mid-task."""

import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

from helpers import living_processes, run_cli, shard_hashes
from tools.fake_imagenet import make_fake_imagenet

ray = pytest.importorskip("ray")
pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]  # a local Ray cluster starts


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def digest(root: Path) -> dict:
    """The shard files' hashes, the manifest and the rejects."""
    return {**shard_hashes(root), **{name: (root / name).read_text() for name in ("manifest.json", "rejects.jsonl")}}


def test_ray_engine_writes_the_local_engines_bytes(local_ray, fake_src, shards, tmp_path):
    result = run_cli(["shard", str(fake_src), "--out", str(tmp_path / "ray"), "--shard-size", "16", "--engine", "ray",
                      "--quiet"])
    assert result.exit_code == 0, result.output
    assert digest(tmp_path / "ray") == digest(shards)  # `shards`: the same options on the local engine


def test_ray_engine_writes_the_local_engines_bytes_with_the_aspect_kept(local_ray, fake_src, keep_shards, tmp_path):
    result = run_cli(["shard", str(fake_src), "--out", str(tmp_path / "ray"), "--shard-size", "16", "--policy", "keep",
                      "--engine", "ray", "--quiet"])
    assert result.exit_code == 0, result.output
    assert shard_hashes(tmp_path / "ray") == shard_hashes(keep_shards)
    manifest = (tmp_path / "ray" / "manifest.json").read_text()
    assert manifest == (keep_shards / "manifest.json").read_text()


def shard_task_workers() -> list[int]:
    """pids of Ray worker processes running a shard task now (Ray names them ray::<function>)."""
    return [pid for pid, _, command in living_processes() if b"ray::_shard_task" in command]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds Ray's workers through /proc")
def test_a_worker_killed_mid_task_is_retried_and_the_output_is_whole(local_ray, tmp_path):
    src = make_fake_imagenet(tmp_path / "src", classes=4, train_per_class=40, val_per_class=2, awkward=False)
    args = ["shard", str(src), "--shard-size", "40", "--quiet"]
    assert run_cli(args + ["--out", str(tmp_path / "local"), "--workers", "2"]).exit_code == 0
    outcome = {}
    driver = threading.Thread(target=lambda: outcome.update(
        result=run_cli(args + ["--out", str(tmp_path / "ray"), "--engine", "ray"])))
    driver.start()
    killed, deadline = None, time.time() + 120
    while killed is None and driver.is_alive() and time.time() < deadline:
        workers = shard_task_workers()
        if workers:
            killed = workers[0]
            os.kill(killed, signal.SIGKILL)
        time.sleep(0.005)
    driver.join(timeout=300)
    assert killed is not None, "no shard task was caught running"
    assert outcome["result"].exit_code == 0, outcome["result"].output
    assert digest(tmp_path / "ray") == digest(tmp_path / "local")


def test_ray_missing_is_one_line(fake_src, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # what an install without the extra looks like
    result = run_cli(["shard", str(fake_src), "--out", str(tmp_path / "out"), "--engine", "ray", "--quiet"])
    assert result.exit_code == 1 and "--engine ray needs Ray: pip install 'imgprep[ray]'" in result.output
