"""Shard folders in object storage: a real S3-compatible HTTP server (moto's server mode) on
127.0.0.1, talked to through s3fs, as users' buckets are. Skipped, saying so, only when the
``cloud`` extra (s3fs) or moto is not installed; ``make test`` installs both."""

from __future__ import annotations

import json
import multiprocessing
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from helpers import run_cli

s3fs = pytest.importorskip("s3fs", reason="the cloud extra is not installed: pip install -e '.[cloud]'")
pytest.importorskip("moto", reason="moto is not installed (the test extra has it): pip install -e '.[test]'")

pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]  # a server and loader workers start
SECRET = "not-a-real-secret-9d1f"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(autouse=True)
def private_cache_home(tmp_path, monkeypatch):
    """The default cache folder (~/.cache/imgprep) of every command here is the test's own."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))


def start_server(**env) -> tuple[subprocess.Popen, str]:
    """moto's S3 server on a free loopback port, once it answers: (process, endpoint)."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, **env})
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return server, f"http://127.0.0.1:{port}"
        except OSError:
            if time.monotonic() > deadline or server.poll() is not None:
                server.kill()
                pytest.fail("moto's S3 server did not start")
            time.sleep(0.2)


def stop_server(server: subprocess.Popen) -> None:
    server.terminate()
    try:
        server.wait(timeout=10)
    except subprocess.TimeoutExpired:
        server.kill()


@pytest.fixture(scope="module")
def s3_server():
    """moto's S3 server; the standard variables point every process at it."""
    server, endpoint = start_server()
    saved = {k: os.environ.get(k) for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    os.environ.update({"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing-key",
                       "AWS_SECRET_ACCESS_KEY": SECRET})
    try:
        yield endpoint
    finally:
        stop_server(server)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="module")
def small_shards(tmp_path_factory, fake_src):
    """fake_src at 32 px in shards of 4 images: 15 train files, so a cache can hold a quarter."""
    out = tmp_path_factory.mktemp("small") / "shards"
    assert run_cli(["shard", str(fake_src), "--out", str(out), "--size", "32", "--shard-size", "4",
                    "--quiet"]).exit_code == 0
    assert run_cli(["pca-stats", str(out), "--quiet"]).exit_code == 0
    return out


@pytest.fixture(scope="module")
def bucket(s3_server, small_shards):
    """small_shards uploaded with s3fs itself (not our code): s3://imgprep-test/shards."""
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs.mkdir("imgprep-test")
    fs.put(str(small_shards), "imgprep-test/shards", recursive=True)
    return "s3://imgprep-test/shards"


def batches(loader, epoch=0):
    loader.set_epoch(epoch)
    return [(images.numpy().copy(), labels.numpy().copy()) for images, labels in loader]


def test_a_loader_over_a_bucket_yields_the_local_loaders_batches(bucket, small_shards, tmp_path):
    from augment import AugmentSpec, Loader

    spec = AugmentSpec(crop=24, lighting=0.0)
    with Loader(small_shards, batch_size=8, spec=spec, device="cpu", workers=2, seed=3) as local:
        expected = batches(local, 1)
    with Loader(bucket, batch_size=8, spec=spec, device="cpu", workers=2, seed=3, cache=tmp_path / "cache") as remote:
        got = batches(remote, 1)
        assert remote.window is None  # no limit: every shard fits, fully random order
    assert len(got) == len(expected) > 0
    for (images, labels), (want_images, want_labels) in zip(got, expected):
        np.testing.assert_array_equal(labels, want_labels)
        np.testing.assert_array_equal(images, want_images)
    cached = sorted(p.name for p in (tmp_path / "cache").rglob("*.h5"))
    assert cached == sorted(p.name for p in small_shards.rglob("train/*.h5"))


def test_the_next_windows_files_are_downloaded_while_this_window_is_read(bucket, tmp_path):
    from augment import AugmentSpec, Loader

    # Windows of 4 shards of 4 images: 4 batches of 4 a window. The torch backend's one worker
    # runs at most 3 batches ahead, so it never reaches the second window while batch 0 is held.
    with Loader(bucket, batch_size=4, spec=AugmentSpec(crop=24, lighting=0.0), backend="torch", device="cpu",
                workers=1, seed=3, cache=tmp_path / "cache", window=4) as loader:
        loader.set_epoch(0)
        first = next(iter(loader))
        assert len(first[1]) == 4
        deadline = time.monotonic() + 30
        while len(list((tmp_path / "cache").rglob("train/*.h5"))) < 8:  # this window's 4 and the next 4
            assert time.monotonic() < deadline, "the next window was not prefetched"
            time.sleep(0.05)


def test_a_cache_of_a_quarter_of_the_data_stays_under_its_limit_in_shard_window_order(bucket, small_shards,
                                                                                       tmp_path):
    from augment import AugmentSpec, Loader
    from prep.cache import ShardCache

    files = sorted((small_shards / "train").glob("*.h5"))
    limit = sum(f.stat().st_size for f in files) * 3 // 10  # four or five of the 15 files
    spec = AugmentSpec(crop=24, lighting=0.0)
    peak, done = [0], threading.Event()
    watcher = ShardCache(bucket, tmp_path / "cache")

    def watch():
        while not done.is_set():
            if watcher.root.exists():
                peak[0] = max(peak[0], watcher.cached_bytes())
            time.sleep(0.005)

    thread = threading.Thread(target=watch)
    thread.start()
    try:
        with Loader(bucket, batch_size=4, spec=spec, device="cpu", workers=2, seed=5, cache=tmp_path / "cache",
                    cache_limit=limit) as remote:
            window = remote.window
            got = batches(remote, 0) + batches(remote, 1)
    finally:
        done.set()
        thread.join()
    assert window == limit // max(f.stat().st_size for f in files) // 4 >= 1
    assert 0 < peak[0] <= limit
    # The same batches as the local folder read in the same order (a window given explicitly).
    with Loader(small_shards, batch_size=4, spec=spec, device="cpu", workers=2, seed=5, window=window) as local:
        expected = batches(local, 0) + batches(local, 1)
    for (images, labels), (want_images, want_labels) in zip(got, expected, strict=True):
        np.testing.assert_array_equal(labels, want_labels)
        np.testing.assert_array_equal(images, want_images)


def test_a_corrupted_object_is_downloaded_again_once_then_one_line(bucket, small_shards, tmp_path):
    from prep.cache import CacheError
    from prep.shards import open_shards

    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    victim = "imgprep-test/damaged/train/train-00002.h5"
    fs.copy("imgprep-test/shards", "imgprep-test/damaged", recursive=True)
    data = bytearray(fs.cat_file(victim))
    data[len(data) // 2] ^= 0xFF
    fs.pipe_file(victim, bytes(data))
    split = open_shards("s3://imgprep-test/damaged", tmp_path / "cache").split("train")
    with pytest.raises(CacheError, match=f"s3://{victim}: its sha256 is not the manifest's, downloaded 2 times"):
        split.shard_file(2)
    assert not [p for p in (tmp_path / "cache").rglob("train-00002.h5*") if not p.name.endswith((".lock", ".use"))]  # nothing of it is kept
    split.shard_file(1)  # the others are fine
    result = run_cli(["verify", "s3://imgprep-test/damaged"])
    assert result.exit_code == 1 and f"unreadable: s3://{victim}: its sha256 is not the manifest's" in result.output
    assert run_cli(["verify", "s3://imgprep-test/shards"]).exit_code == 0


def test_missing_buckets_and_unreachable_endpoints_are_one_line_without_secrets(bucket, tmp_path, monkeypatch):
    result = run_cli(["info", "s3://no-such-bucket/shards"])
    assert result.exit_code == 1 and "s3://no-such-bucket/shards/manifest.json: not found" in result.output
    assert len(result.output.strip().splitlines()) == 1 and SECRET not in result.output
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    start = time.monotonic()
    result = run_cli(["info", bucket])
    assert result.exit_code == 1 and f"{bucket}/manifest.json" in result.output and SECRET not in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert time.monotonic() - start < 60


def _fetch_every_file(url, cache, queue):
    from prep.shards import open_shards

    shard_set = open_shards(url, cache)
    split = shard_set.split("train")
    for number in range(len(split.files)):
        split.shard_file(number)
    queue.put(shard_set.cache.downloaded)


def test_two_ranks_share_one_cache_and_download_each_file_once(bucket, small_shards, tmp_path):
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    ranks = [context.Process(target=_fetch_every_file, args=(bucket, tmp_path / "cache", queue)) for _ in range(2)]
    for rank in ranks:
        rank.start()
    try:
        downloaded = [queue.get(timeout=120) for _ in ranks]
    finally:
        for rank in ranks:
            rank.join(timeout=30)
            if rank.is_alive():  # a hung rank must not outlive the test
                rank.kill()
    total = sum(f.stat().st_size for f in (small_shards / "train").glob("*.h5"))
    assert sum(downloaded) == total  # each file came down once, whichever rank fetched it
    for local in (small_shards / "train").glob("*.h5"):
        cached = next((tmp_path / "cache").rglob(f"train/{local.name}"))
        assert cached.read_bytes() == local.read_bytes()


def test_train_runs_on_a_bucket_through_a_bounded_cache_as_on_the_local_folder(bucket, small_shards, tmp_path):
    from click.testing import CliRunner

    from train.cli import main

    files = sorted((small_shards / "train").glob("*.h5"))
    limit = sum(f.stat().st_size for f in files) * 3 // 10
    common = ["--arch", "tiny_models:tiny", "--device", "cpu", "--workers", "1", "--batch-size", "8", "--crop", "24",
              "--epochs", "1", "--lighting", "0", "--schedule", "step"]
    runner = CliRunner()
    remote = runner.invoke(main, ["run", bucket, *common, "--cache", str(tmp_path / "cache"), "--cache-limit",
                                  str(limit), "--out", str(tmp_path / "remote")], catch_exceptions=False)
    assert remote.exit_code == 0, remote.output
    local = runner.invoke(main, ["run", str(small_shards), *common, "--out", str(tmp_path / "local")],
                          catch_exceptions=False)
    assert local.exit_code == 0, local.output
    # Shard-window order is another order than the local run's fully random one: both train, on
    # the same samples; the remote run's loss is its own. The resume reads the same bucket.
    lines = [json.loads(line) for line in (tmp_path / "remote" / "metrics.jsonl").read_text().splitlines()]
    assert lines and all(np.isfinite(line["train_loss"]) for line in lines if "train_loss" in line)
    again = runner.invoke(main, ["run", "--resume", str(tmp_path / "remote"), "--epochs", "2", "--arch", "tiny_models:tiny"],
                          catch_exceptions=False)
    assert again.exit_code == 0, again.output
    evaluated = runner.invoke(main, ["eval", str(tmp_path / "remote" / "last.pt"), "--arch", "tiny_models:tiny",
                                     "--device", "cpu", "--workers", "1"], catch_exceptions=False)
    assert evaluated.exit_code == 0 and "top-1" in evaluated.output, evaluated.output



def test_two_ranks_train_on_a_bucket_through_one_bounded_cache_with_dali_workers(bucket, small_shards, tmp_path):
    """The path users get: two processes (torch.distributed, gloo), the DALI backend with worker
    processes, one node's cache of 30% of the shards (four of the 15 files) shared by both ranks.
    Four workers each keeping their last two files open while idle would hold eight, and the run
    waited two minutes for room and stopped: a worker lets its files go after each batch."""
    from augment.loader import dali_available
    from helpers import assert_group_ends, run_command

    files = sorted((small_shards / "train").glob("*.h5"))
    limit = sum(f.stat().st_size for f in files) * 3 // 10
    cache = tmp_path / "cache"
    tests = Path(__file__).resolve().parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tests), os.environ.get("PYTHONPATH", "")])}
    result, group = run_command([sys.executable, "-m", "train", "run", bucket, "--arch", "tiny_models:tiny",
                                 "--nproc", "2", "--device", "cpu", "--workers", "2", "--batch-size", "4", "--crop", "24",
                                 "--epochs", "2", "--lighting", "0", "--cache", cache, "--cache-limit", limit,
                                 "--out", tmp_path / "run"], env=env, timeout=280)
    assert_group_ends(group)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"2 x cpu, backend {'dali' if dali_available() else 'torch'}" in result.stdout
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 2 and all(np.isfinite(line["train_loss"]) for line in lines)
    import torch

    assert torch.load(tmp_path / "run" / "last.pt", weights_only=True)["loader"]["window"] >= 1  # shard-window order
    cached = [p for p in cache.rglob("*") if p.is_file() and p.suffix == ".h5"]
    assert cached and sum(p.stat().st_size for p in cached) <= limit  # what the last window left, within the limit
    for path in cached:  # whole files only: no half-written download was left or kept
        assert path.read_bytes() == (small_shards / path.parent.name / path.name).read_bytes()


def test_shard_to_a_bucket_uploads_the_disk_runs_bytes_and_a_rerun_uploads_only_what_is_missing(
        s3_server, fake_src, small_shards, tmp_path, monkeypatch):
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs.mkdir("imgprep-out")
    url = "s3://imgprep-out/run"
    args = ["shard", str(fake_src), "--out", url, "--size", "32", "--shard-size", "4", "--quiet"]
    result = run_cli(args)
    assert result.exit_code == 0, result.output
    local = {str(p.relative_to(small_shards)): p.read_bytes() for p in small_shards.rglob("*.h5")}
    remote = {key.split("imgprep-out/run/", 1)[1]: fs.cat_file(key) for key in fs.find("imgprep-out/run")
              if key.endswith(".h5")}
    assert remote == local  # byte for byte what the same command writes to disk
    assert f"uploaded {len(local)} shard files" in result.output
    # A lost object (and a manifest that is not the last one) is put right; the rest is kept.
    fs.rm_file("imgprep-out/run/train/train-00003.h5")
    again = run_cli(args)
    assert again.exit_code == 0, again.output
    assert "uploaded 1 shard files" in again.output and f"{len(local) - 1} were there already" in again.output
    assert fs.cat_file("imgprep-out/run/train/train-00003.h5") == local["train/train-00003.h5"]
    assert fs.cat_file("imgprep-out/run/manifest.json") == (small_shards / "manifest.json").read_bytes()
    assert run_cli(["info", url]).exit_code == 0


def test_pca_stats_of_a_bucket_are_the_local_folders_and_are_uploaded(bucket, small_shards, tmp_path, monkeypatch):
    import json as json_

    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs.copy("imgprep-test/shards", "imgprep-test/nostats", recursive=True)
    fs.rm_file("imgprep-test/nostats/stats.json")
    result = run_cli(["pca-stats", "s3://imgprep-test/nostats", "--quiet"])
    assert result.exit_code == 0, result.output
    uploaded = json_.loads(fs.cat_file("imgprep-test/nostats/stats.json"))
    local = json_.loads((small_shards / "stats.json").read_text())
    assert uploaded["mean"] == local["mean"] and uploaded["cov"] == local["cov"]
    assert fs.cat_file("imgprep-test/nostats/stats-mean.npy") == (small_shards / "stats-mean.npy").read_bytes()


def test_preview_of_a_bucket_draws_the_picture_of_the_folder_on_disk(bucket, small_shards, tmp_path):
    local = run_cli(["preview", str(small_shards), "--out", str(tmp_path / "local.png"), "--images", "3"])
    assert local.exit_code == 0, local.output
    remote = run_cli(["preview", bucket, "--out", str(tmp_path / "remote.png"), "--images", "3"])
    assert remote.exit_code == 0, remote.output
    assert (tmp_path / "remote.png").read_bytes() == (tmp_path / "local.png").read_bytes()


def test_a_server_stopped_mid_epoch_and_refused_credentials_are_one_line(bucket, small_shards, tmp_path, monkeypatch):
    from augment import AugmentSpec, Loader
    from prep.errors import ImgprepError

    own, endpoint = start_server()
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
        fs = s3fs.S3FileSystem(skip_instance_cache=True)
        fs.mkdir("imgprep-stop")
        fs.put(str(small_shards), "imgprep-stop/shards", recursive=True)
        files = sorted((small_shards / "train").glob("*.h5"))
        limit = sum(f.stat().st_size for f in files) * 3 // 10
        with Loader("s3://imgprep-stop/shards", batch_size=4, spec=AugmentSpec(crop=24, lighting=0.0), device="cpu",
                    workers=2, cache=tmp_path / "cache", cache_limit=limit) as loader:
            batches_of = iter(loader)
            next(batches_of)
            stop_server(own)
            start = time.monotonic()
            with pytest.raises(ImgprepError) as caught:
                for _ in batches_of:  # the next download fails: the worker's one line reaches us
                    pass
        message = str(caught.value)
        assert "s3://imgprep-stop/shards/train/" in message and "\n" not in message and SECRET not in message
        assert time.monotonic() - start < 90
    finally:
        stop_server(own)
    # A server that checks credentials refuses ours: one line saying so.
    strict, endpoint = start_server(INITIAL_NO_AUTH_ACTION_COUNT="0")
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
        result = run_cli(["info", "s3://imgprep-test/shards"])
        assert result.exit_code == 1 and "s3://imgprep-test/shards/manifest.json" in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1 and SECRET not in result.output
    finally:
        stop_server(strict)


def test_a_killed_downloads_leftover_is_removed_and_never_counts_as_cached(bucket, tmp_path):
    from prep.cache import ShardCache

    cache = ShardCache(bucket, tmp_path / "cache")
    root = cache.prepare()
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # its pid names a process that no longer exists, as a kill -9 leaves it
    leftover = root / "train" / f"train-00000.h5.tmp-{gone.pid}"
    leftover.parent.mkdir(parents=True, exist_ok=True)
    leftover.write_bytes(b"\0" * 100_000)
    mine = root / "train" / f"train-00001.h5.tmp-{os.getpid()}"  # a download of a living process stays
    mine.write_bytes(b"\0" * 10)
    assert cache.cached_bytes() == 100_010  # reserved bytes count against the limit ...
    ShardCache(bucket, tmp_path / "cache").prepare()
    assert not leftover.exists() and mine.exists()  # ... until their process is known to be gone
    assert not (root / "train" / "train-00000.h5").exists()


def test_a_run_at_a_url_is_uploaded_preempted_and_resumed_from_the_bucket_alone(bucket, small_shards, tmp_path):
    """--out s3://: the bucket holds what the run folder holds after each save; SIGTERM stops
    the run (exit 75); --resume URL on a node with an empty cache ends with the weights of an
    uninterrupted run."""
    import signal

    import torch

    from helpers import assert_group_ends, run_command

    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs.mkdir("imgprep-runs")
    url = "s3://imgprep-runs/tiny"
    common = ["--arch", "tiny_models:tiny_dropout", "--device", "cpu", "--workers", "1", "--batch-size", "8",
              "--crop", "24", "--epochs", "4", "--lighting", "0"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    train = [sys.executable, "-m", "train", "run"]
    whole, _ = run_command([*train, str(small_shards), *common, "--out", str(tmp_path / "whole")], env=env)
    assert whole.returncode == 0, whole.stderr

    process = subprocess.Popen([*train, str(small_shards), *common, "--log", "tensorboard", "--out", url,
                                "--cache", str(tmp_path / "node-a")], env=env, start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not fs.exists("imgprep-runs/tiny/last.pt"):  # epoch 1 is saved and uploaded
        assert process.poll() is None and time.monotonic() < deadline, "no checkpoint reached the bucket"
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGTERM)
    _, stderr = process.communicate(timeout=240)
    assert process.returncode == 75, stderr
    assert url + "/last.pt" in stderr  # the message names the checkpoint where it is kept
    assert_group_ends(process.pid)
    staged = next((tmp_path / "node-a" / "runs").iterdir())
    for name in ("last.pt", "metrics.jsonl", "curves.png"):
        assert fs.cat_file(f"imgprep-runs/tiny/{name}") == (staged / name).read_bytes(), name
    assert fs.find("imgprep-runs/tiny/tensorboard"), "the TensorBoard events were not uploaded"

    refused = run_command([*train, str(small_shards), *common, "--out", url], env=env)[0]
    assert refused.returncode == 1 and "already holds a run" in refused.stderr, refused.stderr

    resumed, _ = run_command([*train, "--resume", url, "--arch", "tiny_models:tiny_dropout",
                              "--cache", str(tmp_path / "node-b")], env=env)
    assert resumed.returncode == 0, resumed.stderr
    with fs.open("imgprep-runs/tiny/last.pt", "rb") as f:
        uploaded = torch.load(f, weights_only=True)
    expected = torch.load(tmp_path / "whole" / "last.pt", weights_only=True)
    assert uploaded["epoch"] == 3
    assert all(torch.equal(uploaded["model"][k], expected["model"][k]) for k in expected["model"])
    epochs = [json.loads(line)["epoch"] for line in fs.cat_file("imgprep-runs/tiny/metrics.jsonl").splitlines()]
    assert epochs == [0, 1, 2, 3]
    evaluated, _ = run_command([sys.executable, "-m", "train", "eval", url + "/best.pt", "--arch", "tiny_models:tiny_dropout",
                                "--device", "cpu", "--workers", "1"], env=env)
    assert evaluated.returncode == 0 and "val top-1" in evaluated.stdout, evaluated.stderr
    missing, _ = run_command([sys.executable, "-m", "train", "eval", url + "/nothing.pt"], env=env)
    assert missing.returncode == 1 and f"no checkpoint at {url}/nothing.pt" in missing.stderr, missing.stderr


def test_shard_from_a_tree_in_a_bucket_makes_the_shards_of_the_tree_on_disk(s3_server, fake_src, tmp_path):
    import shutil

    from helpers import shard_hashes

    tree = tmp_path / "tree"
    shutil.copytree(fake_src, tree)
    (tree / "train" / "stray.JPEG").write_bytes((tree / "train" / "n01440764" / "grey.JPEG").read_bytes())
    (tree / "train" / ".ipynb_checkpoints").mkdir()
    (tree / "train" / ".ipynb_checkpoints" / "copy.JPEG").write_bytes(b"never read")
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs.mkdir("imgprep-src")
    fs.put(str(tree), "imgprep-src/imagenet", recursive=True)
    args = ["--size", "32", "--shard-size", "8", "--quiet"]
    from_disk = run_cli(["shard", str(tree), "--out", str(tmp_path / "disk"), *args])
    assert from_disk.exit_code == 0, from_disk.output
    from_bucket = run_cli(["shard", "s3://imgprep-src/imagenet", "--out", str(tmp_path / "bucket"), *args])
    assert from_bucket.exit_code == 0, from_bucket.output
    disk, bucket = shard_hashes(tmp_path / "disk"), shard_hashes(tmp_path / "bucket")
    assert disk and bucket == disk

    def rejects(folder):
        return sorted((r["split"], r["path"], r["reason"]) for r in map(json.loads, (folder / "rejects.jsonl")
                                                                         .read_text().splitlines()))
    assert rejects(tmp_path / "bucket") == rejects(tmp_path / "disk")
    assert ("train", "train/stray.JPEG", "not inside a class folder") in rejects(tmp_path / "bucket")
    missing = run_cli(["shard", "s3://imgprep-src/nothing-here", "--out", str(tmp_path / "none"), *args])
    assert missing.exit_code == 1 and "has no train/ folder" in missing.output
    from prep.job import run_shard_job
    from prep.plan import ShardOptions
    from prep.sources import scan_source

    dataset = scan_source("s3://imgprep-src/imagenet")
    fs.rm_file("imgprep-src/imagenet/train/n01440764/grey.JPEG")  # gone between the scan and the read
    run_shard_job(dataset, tmp_path / "later", ShardOptions(size=32, shard_size=8), workers=1, progress=False)
    assert ("train", "train/n01440764/grey.JPEG", "no longer in the bucket (removed after the scan)") in rejects(
        tmp_path / "later")


def test_a_shard_job_killed_mid_upload_leaves_no_manifest_and_its_rerun_completes_the_bucket(s3_server, fake_src,
                                                                                            tmp_path):
    import signal

    from helpers import assert_group_ends, shard_hashes

    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs.mkdir("imgprep-kill")
    url = "s3://imgprep-kill/run"
    args = ["shard", str(fake_src), "--size", "32", "--shard-size", "1", "--quiet"]  # ~80 objects: a long upload
    process = subprocess.Popen([sys.executable, "-m", "prep.cli", *args, "--out", url], start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not fs.exists("imgprep-kill/run/.imgprep-uploaded.json"):  # the first shard is up
        assert process.poll() is None and time.monotonic() < deadline, "the upload never started"
        time.sleep(0.01)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert_group_ends(process.pid)
    fs.invalidate_cache()
    assert not fs.exists("imgprep-kill/run/manifest.json"), "the kill came too late to test anything"
    rerun = run_cli([*args, "--out", url])
    assert rerun.exit_code == 0 and "were there already" in rerun.output, rerun.output
    assert run_cli([*args, "--out", str(tmp_path / "disk")]).exit_code == 0
    expected = shard_hashes(tmp_path / "disk")
    import hashlib

    got = {key.split("imgprep-kill/run/", 1)[1]: hashlib.sha256(fs.cat_file(key)).hexdigest()
           for key in fs.find("imgprep-kill/run") if key.endswith(".h5")}
    assert got == expected
    assert fs.cat_file("imgprep-kill/run/manifest.json") == (tmp_path / "disk" / "manifest.json").read_bytes()


def shard_on_disk_and_from_a_bucket(src: Path, bucket_path: str, tmp_path: Path) -> None:
    """``src`` uploaded to ``bucket_path`` with s3fs, then sharded from disk into tmp_path/disk and
    from the bucket into tmp_path/bucket with the same options; both must succeed."""
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs.mkdir(bucket_path.split("/", 1)[0])
    fs.put(str(src), bucket_path, recursive=True)
    args = ["--size", "32", "--shard-size", "5", "--workers", "2", "--quiet"]
    for source, out in ((str(src), "disk"), (f"s3://{bucket_path}", "bucket")):
        result = run_cli(["shard", source, "--out", str(tmp_path / out), *args])
        assert result.exit_code == 0, result.output


def test_shard_from_parquet_files_in_a_bucket_reads_them_in_place_to_the_shards_of_the_files_on_disk(
        s3_server, flat_tree, tmp_path):
    from helpers import shard_hashes
    from tools.source_layouts import hf_parquet

    src = hf_parquet(flat_tree, tmp_path / "hf", rows_per_group=4, files=3, test_rows=2)
    shard_on_disk_and_from_a_bucket(src, "imgprep-hf/imagenet-1k", tmp_path)
    assert shard_hashes(tmp_path / "bucket") == shard_hashes(tmp_path / "disk") != {}
    manifest = json.loads((tmp_path / "bucket" / "manifest.json").read_text())
    assert manifest["source"] == "s3://imgprep-hf/imagenet-1k"
    assert not any(p.suffix == ".parquet" for p in (tmp_path / "bucket").rglob("*"))  # read in place, not staged


def test_shard_with_ray_to_a_bucket_has_each_worker_upload_and_needs_no_shared_folder(s3_server, fake_src, shards,
                                                                                        tmp_path):
    ray = pytest.importorskip("ray", reason="the ray extra is not installed: pip install -e '.[ray]'")
    import hashlib

    from helpers import shard_hashes

    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs.mkdir("imgprep-ray")
    url = "s3://imgprep-ray/run"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)  # its workers inherit the S3 variables
    try:
        args = ["shard", str(fake_src), "--out", url, "--shard-size", "16", "--engine", "ray", "--quiet"]
        result = run_cli(args)
        assert result.exit_code == 0, result.output
        assert "uploaded by the Ray workers" in result.output
        again = run_cli(args)  # complete: nothing is made again
        assert again.exit_code == 0 and "already complete" in again.output, again.output
    finally:
        ray.shutdown()
    got = {key.split("imgprep-ray/run/", 1)[1]: hashlib.sha256(fs.cat_file(key)).hexdigest()
           for key in fs.find("imgprep-ray/run") if key.endswith(".h5")}
    assert got == shard_hashes(shards)  # `shards`: the same options on the local engine, on disk
    assert fs.cat_file("imgprep-ray/run/manifest.json") == (shards / "manifest.json").read_bytes()
    staged = list((tmp_path / "xdg").rglob("*.h5"))
    assert not staged  # the shards were made on the workers' own disks, not in the driver's staging folder


def test_shard_from_webdataset_tars_in_a_bucket_makes_the_shards_of_the_tars_on_disk(s3_server, flat_tree, tmp_path):
    from helpers import shard_hashes
    from tools.source_layouts import webdataset_tars

    src = webdataset_tars(flat_tree, tmp_path / "wds", shards=2, extra={"x.txt": b"not a sample"})
    shard_on_disk_and_from_a_bucket(src, "imgprep-wds/imagenet", tmp_path)
    assert shard_hashes(tmp_path / "bucket") == shard_hashes(tmp_path / "disk") != {}
    rejects = [(tmp_path / side / "rejects.jsonl").read_text() for side in ("disk", "bucket")]
    assert rejects[0] == rejects[1]
    disk, bucket = (json.loads((tmp_path / side / "manifest.json").read_text()) for side in ("disk", "bucket"))
    assert bucket["classes"] == disk["classes"] and bucket["splits"] == disk["splits"]


def same_shards_rejects_and_classes(tmp_path: Path) -> dict:
    """The shards of tmp_path/bucket are those of tmp_path/disk, with the same rejects, classes
    and splits; returns the bucket run's manifest."""
    from helpers import shard_hashes

    assert shard_hashes(tmp_path / "bucket") == shard_hashes(tmp_path / "disk") != {}
    rejects = [(tmp_path / side / "rejects.jsonl").read_text() for side in ("disk", "bucket")]
    assert rejects[0] == rejects[1]
    disk, bucket = (json.loads((tmp_path / side / "manifest.json").read_text()) for side in ("disk", "bucket"))
    assert bucket["classes"] == disk["classes"] and bucket["splits"] == disk["splits"]
    return bucket


def test_shard_from_the_ilsvrc_archives_in_a_bucket_reads_them_in_place_to_the_shards_of_the_archives_on_disk(
        s3_server, flat_tree, tmp_path):
    from tools.source_layouts import ilsvrc_archives

    src = ilsvrc_archives(flat_tree, tmp_path / "ilsvrc", extra_train={"README.txt": b"not a class tar"},
                          extra_class={"notes.txt": b"not an image"})
    shard_on_disk_and_from_a_bucket(src, "imgprep-ilsvrc/downloads", tmp_path)
    manifest = same_shards_rejects_and_classes(tmp_path)
    assert manifest["source"] == "s3://imgprep-ilsvrc/downloads"
    assert manifest["classes"][0] == {"index": 0, "wnid": "n01440764", "name": "tench, Tinca tinca"}  # the devkit's
    assert manifest["splits"]["train"]["count"] == 18 and manifest["splits"]["val"]["count"] == 9
    assert "README.txt" in (tmp_path / "bucket" / "rejects.jsonl").read_text()
    assert not [p for p in tmp_path.rglob("*.tar") if not p.is_relative_to(src)]  # read in place, nothing staged


def test_shard_from_kaggles_layout_in_a_bucket_lists_it_once_to_the_shards_of_the_folder_on_disk(
        s3_server, flat_tree, tmp_path, monkeypatch):
    from prep.remote import Remote
    from prep.sources import scan_source
    from tools.source_layouts import kaggle_folder

    src = kaggle_folder(flat_tree, tmp_path / "kaggle")
    (src / "ILSVRC/Data/CLS-LOC/train/notes.txt").write_text("not in a class folder")
    shard_on_disk_and_from_a_bucket(src, "imgprep-kaggle/download", tmp_path)
    manifest = same_shards_rejects_and_classes(tmp_path)
    assert manifest["splits"]["val"]["count"] == 9  # labelled by the LOC_val_solution.csv object
    assert manifest["classes"][1]["name"].startswith("goldfish")  # LOC_synset_mapping.txt beside the tree
    assert "train/notes.txt" in (tmp_path / "bucket" / "rejects.jsonl").read_text()

    listings = []
    real = Remote.listing
    monkeypatch.setattr(Remote, "listing", lambda self, *a: listings.append(self.url) or real(self, *a))
    dataset = scan_source("s3://imgprep-kaggle/download")
    assert listings == ["s3://imgprep-kaggle/download"]  # the tree inside took its part of that one listing
    assert len(dataset.splits["train"]) == 18

    # --val-labels may be an object: one request (no listing of its folder), read like a file.
    listings.clear()
    labels = "s3://imgprep-kaggle/download/LOC_val_solution.csv"
    flat = scan_source("s3://imgprep-kaggle/download/ILSVRC/Data/CLS-LOC", labels)
    assert [key for key, _ in flat.splits["val"]] == [key for key, _ in dataset.splits["val"]]
    assert listings == ["s3://imgprep-kaggle/download/ILSVRC/Data/CLS-LOC"]
    missing = run_cli(["shard", "s3://imgprep-kaggle/download/ILSVRC/Data/CLS-LOC", "--val-labels",
                       "s3://imgprep-kaggle/download/no-such.csv", "--out", str(tmp_path / "none")])
    assert missing.exit_code == 1
    assert "validation labels file s3://imgprep-kaggle/download/no-such.csv does not exist" in missing.output


def test_shard_from_hugging_faces_archives_in_a_bucket_stages_them_to_the_shards_of_the_archives_on_disk(
        s3_server, flat_tree, tmp_path, monkeypatch):
    from prep.sources import hf_archives, scan_source
    from tools.source_layouts import hf_archives as make_hf_archives

    src = make_hf_archives(flat_tree, tmp_path / "hf", extra={"notes.txt": b"not an image"})
    shard_on_disk_and_from_a_bucket(src, "imgprep-hfgz/imagenet-1k", tmp_path)
    manifest = same_shards_rejects_and_classes(tmp_path)
    assert manifest["source"] == "s3://imgprep-hfgz/imagenet-1k"
    assert not list((tmp_path / "bucket").rglob("*.tar"))  # the staged tars went with the journal

    # A staged tar is kept while its object is unchanged, and made again once it is replaced.
    url = "s3://imgprep-hfgz/imagenet-1k"
    reader = scan_source(url).reader
    reader.prepare(tmp_path / "journal", 1, False)
    staged = tmp_path / "journal" / "staged"
    made = {p.name: p.stat().st_mtime_ns for p in staged.iterdir()}
    assert sorted(made) == ["train_images_0.tar", "train_images_1.tar", "val_images.tar"]
    decompressed = []
    real = hf_archives._decompress
    monkeypatch.setattr(hf_archives, "_decompress", lambda todo, *rest: decompressed.append(todo) or real(todo, *rest))
    scan_source(url).reader.prepare(tmp_path / "journal", 1, False)
    assert decompressed == []
    time.sleep(1.1)  # a newer LastModified (whole seconds)
    s3fs.S3FileSystem(skip_instance_cache=True).put_file(str(src / "val_images.tar.gz"),
                                                         "imgprep-hfgz/imagenet-1k/val_images.tar.gz")
    scan_source(url).reader.prepare(tmp_path / "journal", 1, False)
    assert [Path(target).name for _, target, _ in decompressed[0]] == ["val_images.tar"]
    assert (staged / "val_images.tar").stat().st_mtime_ns > made["val_images.tar"]

    result = run_cli(["shard", url, "--out", "s3://imgprep-hfgz/out", "--engine", "ray", "--quiet"])
    assert result.exit_code == 1 and "the Ray workers do not see" in result.output, result.output

