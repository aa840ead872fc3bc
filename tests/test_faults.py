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

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from helpers import assert_group_ends, living_processes, run_cli, run_command
from tools.fake_imagenet import make_fake_imagenet

pytestmark = pytest.mark.timeout(600)

TESTS = Path(__file__).resolve().parent
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
FAST = ["--device", "cpu", "--backend", "torch", "--workers", "0", "--batch-size", "8"]
TINY = ["--arch", "tiny_models:tiny"]  # a run over an import-path network names it again to resume or evaluate


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


@pytest.fixture(scope="module")
def slow_shards(slow_src, tmp_path_factory):
    """slow_src sharded by a run that nothing stopped."""
    clean = tmp_path_factory.mktemp("clean") / "shards"
    assert imgprep("shard", slow_src, "--out", clean, "--shard-size", 8, "--workers", 2, "--quiet").returncode == 0
    return clean


@pytest.mark.slow
@pytest.mark.parametrize("kill", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_a_killed_shard_job_leaves_no_worker_and_no_lock_and_resumes_identically(slow_src, slow_shards, tmp_path,
                                                                                  kill):
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
    assert tree_bytes(out) == tree_bytes(slow_shards)


# ----------------------------------------------------------------------------- train: checkpoints


@pytest.fixture(scope="module")
def trained(tmp_path_factory, stats_shards):
    """A one-epoch run of the tiny model on the session's shards (4 classes)."""
    out = tmp_path_factory.mktemp("trained") / "run"
    result = train_cli("run", stats_shards, "--arch", "tiny_models:tiny", "--epochs", 1, *FAST, "--out", out)
    assert result.exit_code == 0, result.output
    return out


def one_line_error(result, *phrases) -> None:
    """Exit 1 and one error line (the last), naming ``phrases``; no traceback."""
    assert result.exit_code == 1, result.output
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("Error: ") and result.output.count("Error") == 1, result.output
    assert "Traceback" not in result.output
    for phrase in phrases:
        assert phrase in last, last


class Payload:
    """Not a tensor or a plain value: weights_only must refuse it."""


@pytest.mark.parametrize("damage", ["empty", "truncated", "garbage", "pickled object", "not ours"])
def test_damaged_checkpoints_are_one_line_on_resume_and_eval(trained, tmp_path, damage):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained, run)
    last = run / "last.pt"
    whole = last.read_bytes()
    if damage == "empty":
        last.write_bytes(b"")
    elif damage == "truncated":
        last.write_bytes(whole[: len(whole) // 2])
    elif damage == "garbage":
        last.write_bytes(os.urandom(len(whole)))
    elif damage == "pickled object":
        torch.save({"model": Payload()}, last)
    else:
        torch.save({"weights": torch.zeros(3), "step": 7}, last)  # not bare weights either (see test_train)
    expected = {"empty": "is empty", "truncated": "is damaged", "garbage": "is damaged",
                "pickled object": "refusing to load it", "not ours": "is not a train checkpoint"}[damage]
    for result in (train_cli("run", "--resume", run, *TINY, "--device", "cpu"), train_cli("eval", last, *TINY, "--device", "cpu")):
        one_line_error(result, str(last), expected)
        assert "weights_only=False" not in result.output


def test_a_checkpoint_does_not_choose_the_code_that_runs(trained, tmp_path, monkeypatch):
    # A downloaded checkpoint names a module of its choosing, planted where Python looks (beside
    # it): neither eval nor a resume may import it unless the user names it with --arch.
    import shutil
    import sys

    planted = tmp_path / "planted"
    planted.mkdir()
    marker = tmp_path / "it ran"
    (planted / "planted_net.py").write_text(f"open({str(marker)!r}, 'w').close()\ndef net(num_classes): pass\n")
    monkeypatch.syspath_prepend(str(planted))
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    state = torch.load(run / "last.pt", weights_only=True)
    state["config"]["arch"] = "planted_net:net"
    torch.save(state, run / "last.pt")
    for result in (train_cli("run", "--resume", run, "--device", "cpu"), train_cli("eval", run / "last.pt", *FAST)):
        one_line_error(result, str(run / "last.pt"), "planted_net:net", "may not choose code",
                       "pass --arch planted_net:net")
    for result in (train_cli("run", "--resume", run, *TINY, "--device", "cpu"),
                   train_cli("eval", run / "last.pt", *TINY, *FAST)):
        one_line_error(result, "was trained as --arch planted_net:net, not tiny_models:tiny")
    assert not marker.exists() and "planted_net" not in sys.modules
    # A built-in name runs nothing of the file's choosing: taken without --arch.
    state["config"]["arch"] = "alexnet-owt"
    torch.save(state, run / "last.pt")
    one_line_error(train_cli("eval", run / "last.pt", *FAST), "do not fit --arch alexnet-owt")


def test_resume_and_eval_refuse_shards_other_than_the_runs(stats_shards, tmp_path, monkeypatch):
    # Started from one working folder with a relative path, resumed from another: the same shards.
    # Then the folder is re-sharded (its manifest changes): resume and eval refuse with one line,
    # unless told to accept it.
    import json
    import shutil

    from prep.stats import compute_stats

    work = tmp_path / "work"
    shutil.copytree(stats_shards, work / "shards")
    monkeypatch.chdir(work)
    assert train_cli("run", "shards", *TINY, "--epochs", 1, *FAST, "--out", "run").exit_code == 0
    monkeypatch.chdir(tmp_path)
    run = work / "run"
    assert train_cli("run", "--resume", run, *TINY, "--epochs", 2, "--device", "cpu").exit_code == 0
    manifest = json.loads((work / "shards" / "manifest.json").read_text())
    manifest["resharded"] = "with another seed"
    (work / "shards" / "manifest.json").write_text(json.dumps(manifest))
    compute_stats(work / "shards", workers=1, progress=False)  # so that only the shards' identity differs
    resumed = train_cli("run", "--resume", run, *TINY, "--epochs", 3, "--device", "cpu")
    one_line_error(resumed, f"{work / 'shards'} holds other shards than {run / 'last.pt'} was trained on",
                   "--accept-changed-shards")
    evaluated = train_cli("eval", run / "last.pt", *TINY, *FAST)
    one_line_error(evaluated, "holds other shards", "--shards")
    assert train_cli("eval", run / "last.pt", *TINY, *FAST, "--shards", work / "shards").exit_code == 0
    accepted = train_cli("run", "--resume", run, *TINY, "--epochs", 3, "--device", "cpu", "--accept-changed-shards")
    assert accepted.exit_code == 0, accepted.output
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 3


def test_leftovers_of_a_save_cut_short_are_removed_on_resume(trained, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained, run)
    leftover = run / "last.pt.tmp-0123456789ab"
    leftover.write_bytes(b"half a checkpoint")
    result = train_cli("run", "--resume", run, *TINY, "--device", "cpu", "--epochs", 2, "--workers", 0, "--backend", "torch")
    assert result.exit_code == 0, result.output
    assert not leftover.exists()


def test_train_eval_refuses_shards_of_another_class_list(trained, tmp_path):
    from prep.stats import compute_stats

    for classes, phrase in ((2, "4 classes against 2"), (6, "4 classes against 6")):
        src = make_fake_imagenet(tmp_path / f"src{classes}", classes=classes, train_per_class=2, val_per_class=2,
                                 awkward=False, large_fraction=0)
        other = tmp_path / f"shards{classes}"
        assert run_cli(["shard", str(src), "--out", str(other), "--quiet"]).exit_code == 0
        compute_stats(other, progress=False)
        result = train_cli("eval", trained / "best.pt", *TINY, "--shards", other, "--device", "cpu", "--workers", 0,
                           "--backend", "torch")
        one_line_error(result, "was trained on other classes", phrase)


@pytest.mark.slow
def test_a_second_run_on_the_same_folder_is_refused(stats_shards, tmp_path):
    out = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "train", "run", str(stats_shards), "--arch", "tiny_models:tiny",
                              "--epochs", "200", *FAST, "--out", str(out)], env=ENV, start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (out / "last.pt").is_file():
            assert first.poll() is None and time.time() < deadline
            time.sleep(0.05)
        second = train_cli("run", stats_shards, "--arch", "tiny_models:tiny", *FAST, "--out", out, "--epochs", 3)
        one_line_error(second, f"another train run is writing to {out}")
        resumed = train_cli("run", "--resume", out, *TINY, "--device", "cpu")
        one_line_error(resumed, f"another train run is writing to {out}")
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()


# ----------------------------------------------------------------------------- train: silent no-ops


def test_plateau_refuses_an_empty_val_split(tmp_path):
    from prep.stats import compute_stats

    src = make_fake_imagenet(tmp_path / "src", classes=2, train_per_class=8, val_per_class=2, awkward=False,
                             large_fraction=0)
    flat = tmp_path / "flat"
    (flat / "val").mkdir(parents=True)
    (flat / "train").symlink_to(src / "train")
    for image in (src / "val").rglob("*.JPEG"):
        (flat / "val" / image.name).write_bytes(image.read_bytes())
    labels = tmp_path / "labels.txt"
    labels.write_text("".join(f"{image.name},n00000000\n" for image in (flat / "val").iterdir()))  # unknown wnid
    assert run_cli(["shard", str(flat), "--out", str(tmp_path / "shards"), "--val-labels", str(labels),
                    "--quiet"]).exit_code == 0
    compute_stats(tmp_path / "shards", progress=False)
    result = train_cli("run", tmp_path / "shards", "--arch", "tiny_models:tiny", *FAST, "--out", tmp_path / "run")
    one_line_error(result, "has an empty val split", "--schedule plateau")


@pytest.mark.parametrize("option", ["--lr", "--weight-decay", "--lighting", "--warmup-epochs", "--momentum"])
def test_nan_options_are_refused(stats_shards, tmp_path, option):
    result = train_cli("run", stats_shards, "--arch", "tiny_models:tiny", *FAST, option, "nan", "--out", tmp_path / "r")
    one_line_error(result, "must be a finite number, got nan")


def test_a_first_epoch_nan_names_no_checkpoint_that_does_not_exist(stats_shards, tmp_path):
    result = train_cli("run", stats_shards, "--arch", "tiny_models:tiny_nan_after_2", "--epochs", 2, *FAST,
                       "--out", tmp_path / "run")
    one_line_error(result, "loss is nan at epoch 1", "no checkpoint was saved before it")
    assert not (tmp_path / "run" / "last.pt").exists()


def test_a_crop_the_model_cannot_take_is_one_line(stats_shards, tmp_path):
    result = train_cli("run", stats_shards, *FAST, "--crop", 1, "--lighting", 0, "--out", tmp_path / "r")
    one_line_error(result, "--arch alexnet cannot take 1 x 1 inputs", "use a larger --crop")


@pytest.mark.slow
def test_checkpoint_minutes_saves_mid_epoch_so_a_kill_loses_little(stats_shards, tmp_path):
    # Batch 2: 30 steps an epoch, checked every 10; a clock of 0.001 min saves at each check.
    args = ["run", stats_shards, "--arch", "tiny_models:tiny_dropout", "--epochs", 2, "--device", "cpu",
            "--workers", 1, "--batch-size", 2]
    whole, group = run_command([sys.executable, "-m", "train", *args, "--out", tmp_path / "whole"], env=ENV)
    assert whole.returncode == 0, whole.stderr
    out = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, "-m", "train", *map(str, args), "--checkpoint-minutes", "0.001",
                                "--out", str(out)], env=ENV, start_new_session=True, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while True:  # until a mid-epoch checkpoint is on disk
        assert process.poll() is None and time.time() < deadline, "no mid-epoch checkpoint was seen"
        if (out / "last.pt").is_file():
            if torch.load(out / "last.pt", weights_only=True)["partial"]:
                break
        time.sleep(0.01)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert_group_ends(process.pid)
    resumed, _ = run_command([sys.executable, "-m", "train", "run", "--resume", out, "--arch", "tiny_models:tiny_dropout", "--device", "cpu"], env=ENV)
    assert resumed.returncode == 0 and "resuming in epoch" in resumed.stdout, resumed.stdout + resumed.stderr
    a, b = (torch.load(d / "last.pt", weights_only=True)["model"] for d in (tmp_path / "whole", out))
    assert all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------- companion files


def test_a_missing_mean_image_is_one_line(fresh_copy, stats_shards, tmp_path):
    for name in ("stats.json", "stats-mean.npy"):
        (fresh_copy / name).write_bytes((stats_shards / name).read_bytes())
    (fresh_copy / "stats-mean.npy").unlink()
    result = train_cli("run", fresh_copy, "--arch", "tiny_models:tiny", *FAST, "--normalize", "mean-image",
                       "--out", tmp_path / "run")
    one_line_error(result, "stats-mean.npy", "is missing", "imgprep pca-stats")


@pytest.mark.parametrize("damage", ["not json", "no eigenvectors"])
def test_an_invalid_stats_file_is_named_by_info_and_refused_by_train(fresh_copy, stats_shards, tmp_path, damage):
    stats = json.loads((stats_shards / "stats.json").read_text())
    (fresh_copy / "stats-mean.npy").write_bytes((stats_shards / "stats-mean.npy").read_bytes())
    if damage == "not json":
        (fresh_copy / "stats.json").write_text("{ truncated")
    else:
        del stats["eigvec"]
        (fresh_copy / "stats.json").write_text(json.dumps(stats))
    info = run_cli(["info", str(fresh_copy)])
    assert info.exit_code == 0 and "stats    present but unusable" in info.output, info.output
    result = train_cli("run", fresh_copy, "--arch", "tiny_models:tiny", *FAST, "--out", tmp_path / "run")
    one_line_error(result, "stats.json")


def test_a_corrupt_rejects_file_does_not_break_info_and_stops_a_resume_with_one_line(fake_src, tmp_path):
    out = tmp_path / "shards"
    assert run_cli(["shard", str(fake_src), "--out", str(out), "--shard-size", "16", "--quiet"]).exit_code == 0
    (out / "rejects.jsonl").write_text('{"split": "train", "path": "a.JPEG", "reason": "x"}\n{broken\n')
    info = run_cli(["info", str(out)])
    assert info.exit_code == 0 and "rejects  unreadable" in info.output and "line 2" in info.output
    next(out.glob("train/*.h5")).unlink()  # a shard lost: the rerun rebuilds it from the manifest
    one_line_error(run_cli(["shard", str(fake_src), "--out", str(out), "--shard-size", "16", "--quiet"]),
                   "rejects.jsonl line 2")


@pytest.mark.parametrize("key", ["options", "classes", "splits"])
def test_a_manifest_missing_keys_is_one_line(fresh_copy, key):
    manifest = json.loads((fresh_copy / "manifest.json").read_text())
    del manifest[key]
    (fresh_copy / "manifest.json").write_text(json.dumps(manifest))
    one_line_error(run_cli(["info", str(fresh_copy)]), "manifest.json is damaged")


def test_a_foreign_rejects_file_is_not_overwritten(fake_src, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "rejects.jsonl").write_text("somebody else's notes\n")
    one_line_error(run_cli(["shard", str(fake_src), "--out", str(out), "--quiet"]), "rejects.jsonl that no imgprep")
    assert (out / "rejects.jsonl").read_text() == "somebody else's notes\n"


# ----------------------------------------------------------------------------- arguments


def test_an_output_folder_that_is_a_file_is_one_line(fake_src, stats_shards, tmp_path):
    target = tmp_path / "a-file"
    target.write_text("not a folder")
    shard = run_cli(["shard", str(fake_src), "--out", str(target), "--quiet"])
    run = train_cli("run", stats_shards, "--arch", "tiny_models:tiny", *FAST, "--out", target)
    for result in (shard, run):  # click's usage error, before anything starts
        assert result.exit_code == 2 and "is a file" in result.output and "Traceback" not in result.output


def test_augment_spec_errors_are_ours_so_commands_report_them_in_one_line():
    from augment import AugmentSpec
    from prep.errors import ImgprepError

    with pytest.raises(ImgprepError, match="lighting is a standard deviation from 0 to 10, got -1"):
        AugmentSpec(lighting=-1)


@pytest.mark.parametrize("debug", [False, True])
def test_imgprep_debug_shows_the_traceback_of_our_errors(monkeypatch, debug):
    import click

    from prep.errors import ImgprepError, report_errors

    @click.command()
    @report_errors
    def command():
        error = ImgprepError("the shard is damaged")
        error.remote_traceback = "Traceback (most recent call last):\n  in the other process\n"
        raise error

    monkeypatch.setenv("IMGPREP_DEBUG", "1") if debug else monkeypatch.delenv("IMGPREP_DEBUG", raising=False)
    result = CliRunner().invoke(command, [])
    assert result.exit_code == 1
    if debug:  # the other process's traceback, then this one's
        assert isinstance(result.exception, ImgprepError) and "in the other process" in result.output
    else:
        one_line_error(result, "the shard is damaged")


@pytest.mark.slow  # draws several previews (about 14 s)
def test_preview_arguments(stats_shards, tmp_path):
    for bad in (["--images", "0"], ["--versions", "-1"]):
        result = run_cli(["preview", str(stats_shards), "--out", str(tmp_path / "p.png"), *bad])
        assert result.exit_code == 2 and "Invalid value" in result.output
    result = run_cli(["preview", str(stats_shards), "--out", str(tmp_path / "p.png"), "--images", "100"])
    assert result.exit_code == 0 and "(60 images x 5" in result.output  # the split holds 60
    (tmp_path / "a-file").write_text("x")  # a file where the PNG's folder should be
    one_line_error(run_cli(["preview", str(stats_shards), "--out", str(tmp_path / "a-file" / "p.png")]),
                   "cannot write")


def test_a_loader_state_outside_the_epoch_is_refused(stats_shards):
    from augment import AugmentSpec, Loader
    from augment.errors import AugmentError

    with Loader(stats_shards, "train", 8, AugmentSpec(), backend="torch", device="cpu", workers=0) as loader:
        for position in (-1, len(loader) + 1):
            with pytest.raises(AugmentError, match="outside an epoch"):
                loader.load_state_dict({"epoch": 0, "position": position, "seed": 0, "world_size": 1})


# ----------------------------------------------------------------------------- full disks


@pytest.fixture
def small_disk(tmp_path):
    """(folder on a tmpfs of a few MB, resize(megabytes)). Mounting needs root: without it the
    test is skipped, and says why."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(disk)], capture_output=True,
                             text=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a small tmpfs to fill (needs root): {mounted.stderr.strip()}")

    def resize(megabytes: float) -> None:
        subprocess.run(["mount", "-o", f"remount,size={int(megabytes * 1024)}k", str(disk)], check=True)

    yield disk, resize
    subprocess.run(["umount", "-l", str(disk)], check=False)


def fill(disk: Path, leave_bytes: int) -> None:
    """Take all but about ``leave_bytes`` of ``disk``'s free space."""
    import shutil

    free = shutil.disk_usage(disk).free
    with open(disk / "filler", "wb") as f:
        f.write(b"\0" * max(0, free - leave_bytes))


@pytest.mark.slow
def test_a_full_disk_stops_the_shard_job_with_one_line_and_it_resumes_after(fake_src, small_disk, tmp_path):
    disk, resize = small_disk
    clean = tmp_path / "clean"
    assert run_cli(["shard", str(fake_src), "--out", str(clean), "--shard-size", "8", "--quiet"]).exit_code == 0
    out = disk / "out"
    result = imgprep("shard", fake_src, "--out", out, "--shard-size", 8, "--workers", 2, "--quiet")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"no space left on {out}" in result.stderr and "finished shards are kept" in result.stderr
    resize(64)
    assert imgprep("shard", fake_src, "--out", out, "--shard-size", 8, "--workers", 2, "--quiet").returncode == 0
    assert tree_bytes(out) == tree_bytes(clean)


def test_a_full_disk_met_while_hdf5_closes_a_shard_is_the_os_error_its_callers_handle(tmp_path, monkeypatch):
    """libhdf5 reports a write that fails while it closes the file (its metadata flush) as a
    RuntimeError, not an OSError; the shard writer turns a full disk there into ENOSPC (what the
    job turns into its one line), leaves no partial file, and lets any other RuntimeError through."""
    import errno

    import h5py

    import prep.shards as shards
    from prep.plan import ShardOptions

    real = h5py.File

    class ClosingFails:
        def __init__(self, message):
            self.message = message

        def __call__(self, *args, **kwargs):
            self.file = real(*args, **kwargs)
            return self

        def __enter__(self):
            return self.file.__enter__()

        def __exit__(self, *exc):
            self.file.__exit__(*exc)
            raise RuntimeError(self.message)

    full = ("Can't decrement id ref count (file write failed: time = Mon Dec  7 03:15:13 2026, errno = 28, "
            "error message = 'No space left on device', total write size = 3928, offset = 8192)")
    args = (tmp_path / "train" / "00000.h5", "train", ShardOptions(size=16), [0], ["a.JPEG"],
            [np.zeros((16, 16, 3), np.uint8)])
    args[0].parent.mkdir()
    monkeypatch.setattr(shards.h5py, "File", ClosingFails(full))
    with pytest.raises(OSError) as raised:
        shards.write_shard(*args)
    assert raised.value.errno == errno.ENOSPC and "00000.h5" in str(raised.value)
    assert list(args[0].parent.iterdir()) == []  # nothing half-written left behind
    monkeypatch.setattr(shards.h5py, "File", ClosingFails("some other HDF5 failure"))
    with pytest.raises(RuntimeError, match="some other HDF5 failure"):
        shards.write_shard(*args)


def test_a_full_disk_stops_pca_stats_with_one_line(shards, small_disk):
    import shutil

    disk, resize = small_disk
    resize(64)
    copy = disk / "shards"
    shutil.copytree(shards, copy)
    fill(disk, 200_000)  # the mean image takes 1.5 MB
    one_line_error(run_cli(["pca-stats", str(copy), "--quiet"]), f"no space left on {copy}")
    assert not (copy / "stats.json").exists()


def test_a_full_disk_stops_training_with_one_line_and_keeps_the_last_checkpoint(stats_shards, small_disk):
    disk, resize = small_disk
    out = disk / "run"
    args = ["run", stats_shards, "--arch", "tiny_models:tiny", *FAST, "--out", out]
    assert train_cli(*args, "--epochs", 1).exit_code == 0
    before = (out / "last.pt").read_bytes()
    fill(disk, 4096)
    one_line_error(train_cli("run", "--resume", out, *TINY, "--device", "cpu", "--epochs", 2), f"no space left on {out}")
    assert (out / "last.pt").read_bytes() == before


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["dali", "torch"])
def test_loader_workers_die_with_a_killed_parent_even_before_their_first_batch(stats_shards, tmp_path, backend):
    # Eight workers and one batch taken: some workers have not run a batch yet when the
    # process is killed; they must not outlive it (holding its pipes, signals blocked).
    script = tmp_path / "one_batch.py"
    script.write_text(
        "import sys, time\n"
        "from augment import AugmentSpec, Loader\n"
        f"loader = Loader({str(stats_shards)!r}, 'train', 2, AugmentSpec(), backend={backend!r}, device='cpu', workers=8)\n"
        "next(iter(loader))\n"
        "print('ready', flush=True)\n"
        "time.sleep(600)\n")
    process = subprocess.Popen([sys.executable, str(script)], env=ENV, stdout=subprocess.PIPE, text=True,
                               start_new_session=True)
    assert process.stdout.readline().strip() == "ready"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert_group_ends(process.pid)


def ranks_of(pid: int) -> list[int]:
    """The rank processes the launcher ``pid`` has started (multiprocessing's spawn children). Not
    any child: Python itself runs `uname -p` while the launcher imports its libraries, before it
    listens for SIGTERM, and a signal then ends it as it ends any program that is starting."""
    return [child for child, stat, command in living_processes() if stat.parent == pid and b"spawn_main" in command]


@pytest.mark.slow
def test_a_stop_signal_while_the_ranks_start_still_stops_the_run_in_order(stats_shards, tmp_path):
    out = tmp_path / "run"
    process = subprocess.Popen([sys.executable, "-m", "train", "run", str(stats_shards), "--arch", "tiny_models:tiny",
                                "--epochs", "3", "--nproc", "2", "--device", "cpu", "--workers", "1",
                                "--batch-size", "8", "--out", str(out)], env=ENV, start_new_session=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not ranks_of(process.pid):  # the launcher has started the ranks; they are still starting up
        assert process.poll() is None and time.time() < deadline
        time.sleep(0.01)
    os.kill(process.pid, signal.SIGTERM)
    _, stderr = process.communicate(timeout=240)
    assert process.returncode == 75, stderr
    assert "stopped by SIGTERM" in stderr and (out / "last.pt").is_file()
    assert_group_ends(process.pid)


# ----------------------------------------------------------------------------- round 3: options and files


def test_empty_paths_are_refused_not_taken_for_the_current_folder(fake_src, stats_shards, tmp_path, monkeypatch):
    # `--out "$OUT"` with OUT unset: the current folder would be written into (or read as shards).
    from prep.cli import main as imgprep_main

    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    results = [runner.invoke(imgprep_main, ["shard", str(fake_src), "--out", ""]),
               runner.invoke(imgprep_main, ["shard", str(fake_src)], env={"IMGPREP_SHARDS": ""}),
               runner.invoke(imgprep_main, ["info"], env={"IMGPREP_SHARDS": ""}),
               train_cli("run", stats_shards, *TINY, *FAST, "--out", "")]
    for result in results:
        assert result.exit_code in (1, 2) and "Traceback" not in result.output, result.output
        assert "is empty" in result.output or "set but empty" in result.output, result.output
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("arch", ["os:system", ":", "torch.nn:Linear", "os:getcwd", "os.path:"])
def test_arch_strings_that_are_not_model_factories_are_one_line(stats_shards, tmp_path, arch):
    result = train_cli("run", stats_shards, "--arch", arch, *FAST, "--out", tmp_path / "run")
    one_line_error(result, "--arch")
    assert "not a model factory" in result.output or "names no module or no factory" in result.output


def test_negative_seeds_are_usage_errors(stats_shards, tmp_path):
    from prep.cli import main as imgprep_main

    for result in (CliRunner().invoke(imgprep_main, ["preview", str(stats_shards), "--seed", "-1",
                                                     "--out", str(tmp_path / "p.png")]),
                   train_cli("run", stats_shards, *TINY, *FAST, "--seed", -1, "--out", tmp_path / "run")):
        assert result.exit_code == 2 and "-1 is not in the range x>=0" in result.output, result.output


def test_a_cut_last_metrics_line_is_dropped_and_the_run_resumes(trained, tmp_path):
    # kill -9 (or a full disk) while a line was appended: the resume must not stop on it.
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained, run)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 1, "train_lo')
    result = train_cli("run", "--resume", run, *TINY, "--epochs", 2, "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "was cut short" in result.output
    assert [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [0, 1]
    (run / "metrics.jsonl").write_text('{"epoch": 0}\n{"epo\n{"epoch": 1}\n')  # damage inside: one line
    one_line_error(train_cli("run", "--resume", run, *TINY, "--epochs", 3, "--device", "cpu"),
                   f"{run / 'metrics.jsonl'} is damaged at line 2")


def test_a_constant_channel_is_named_not_blamed_on_the_learning_rate(fresh_copy, tmp_path):
    from prep.stats import compute_stats

    compute_stats(fresh_copy, workers=1, progress=False)
    document = json.loads((fresh_copy / "stats.json").read_text())
    document["std"][1] = 0.0
    (fresh_copy / "stats.json").write_text(json.dumps(document))
    result = train_cli("run", fresh_copy, *TINY, *FAST, "--normalize", "channel", "--out", tmp_path / "run")
    one_line_error(result, "channel G a std of 0", "--normalize torchvision")


@pytest.mark.slow
def test_an_eval_batch_larger_than_the_split_costs_only_the_split(trained):
    # 5000 images a batch on 16: unbounded, the batch's buffers alone would take about 3 GB.
    import resource

    # The largest resident size of the eval and its workers, measured by a parent of its own.
    measure = ("import resource, subprocess, sys; result = subprocess.run(sys.argv[1:]); "
               "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(result.returncode)")
    result = subprocess.run([sys.executable, "-c", measure, sys.executable, "-m", "train", "eval",
                             str(trained / "best.pt"), *TINY, "--device", "cpu", "--batch-size", "5000", "--workers",
                             "1"], env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "over 16 images" in result.stdout
    assert int(result.stdout.split()[-1]) < 1_500_000  # KiB


def test_pca_stats_removes_the_leftover_of_a_killed_save(fresh_copy):
    from prep.stats import compute_stats

    leftovers = [fresh_copy / "stats.json.tmp-0123456789ab", fresh_copy / "stats-mean.npy.tmp-ba9876543210"]
    for leftover in leftovers:
        leftover.write_text("half")
    compute_stats(fresh_copy, workers=1, progress=False)
    assert not any(leftover.exists() for leftover in leftovers) and (fresh_copy / "stats.json").is_file()


@pytest.mark.parametrize("damage", ["weights of another shape", "epoch a string", "world size a string",
                                    "config a list", "lr a string"])
def test_checkpoints_with_wrongly_typed_fields_are_one_line_on_resume_and_eval(trained, tmp_path, damage):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained, run)
    state = torch.load(run / "last.pt", weights_only=True)
    if damage == "weights of another shape":
        state["model"][next(iter(state["model"]))] = torch.zeros(3)
    elif damage == "epoch a string":
        state["epoch"] = "x"
    elif damage == "world size a string":
        state["world_size"] = "two"
    elif damage == "config a list":
        state["config"] = [1, 2]
    else:
        state["config"]["lr"] = "fast"
    torch.save(state, run / "last.pt")
    expected = {"weights of another shape": "do not fit --arch tiny_models:tiny", "epoch a string": "epoch (str)",
                "world size a string": "world_size (str)", "config a list": "config (list)",
                "lr a string": "is damaged: must be real number"}[damage]
    for result in (train_cli("run", "--resume", run, *TINY, "--epochs", 2, "--device", "cpu"),
                   train_cli("eval", run / "last.pt", *TINY, *FAST)):
        one_line_error(result, str(run / "last.pt"), expected)


def test_weights_beyond_float32_and_a_crop_too_large_are_named(stats_shards, tmp_path):
    one_line_error(train_cli("run", stats_shards, *TINY, *FAST, "--lr", "1e308", "--out", tmp_path / "a"),
                   "lr 1e+308 is beyond float32's range")
    one_line_error(train_cli("run", stats_shards, *TINY, *FAST, "--crop", 288, "--out", tmp_path / "b"),
                   "--crop 288 asks for windows larger than the 256 px images")


@pytest.mark.parametrize("last_write", ["rejects", "manifest"])
def test_a_full_disk_at_the_very_end_of_a_shard_job_is_one_line_and_a_rerun_finishes(fake_src, tmp_path, monkeypatch,
                                                                                    last_write):
    import errno

    import prep.job

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    out = tmp_path / "out"
    if last_write == "rejects":
        real = prep.job.atomic_write_text
        monkeypatch.setattr(prep.job, "atomic_write_text",
                            lambda path, text: full() if Path(path).name == "rejects.jsonl" else real(path, text))
    else:
        monkeypatch.setattr(prep.job, "write_manifest", full)
    result = run_cli(["shard", str(fake_src), "--out", str(out), "--shard-size", "16", "--workers", "1", "--quiet"])
    file = {"rejects": "rejects.jsonl", "manifest": "manifest.json"}[last_write]
    one_line_error(result, f"no space left on {out} (writing {file}); every shard is kept")
    monkeypatch.undo()
    rerun = run_cli(["shard", str(fake_src), "--out", str(out), "--shard-size", "16", "--workers", "1", "--quiet"])
    assert rerun.exit_code == 0 and "kept from an earlier run" in rerun.output, rerun.output


# ----------------------------------------------------------------------------- shards that are not what they say


def rewrite_shard(root: Path, change) -> Path:
    """``change(h5, other_folder)`` applied to the first train shard of ``root``, its sha256 in the
    manifest updated (a hostile uploader controls both, so verify's hash check cannot catch it)."""
    import h5py

    from prep.shards import sha256_file

    manifest = json.loads((root / "manifest.json").read_text())
    entry = manifest["splits"]["train"]["shards"][0]
    path = root / entry["file"]
    with h5py.File(path, "r+") as h5:
        change(h5, root.parent)
    entry["sha256"] = sha256_file(path)
    (root / "manifest.json").write_text(json.dumps(manifest))
    return path


def move_labels_out(kind: str):
    """A change that makes the shard's labels (or, "labels 99", its values) come from elsewhere."""
    import h5py
    import numpy as np

    def change(h5, elsewhere: Path):
        labels = h5["labels"][:]
        if kind == "labels 99":
            h5["labels"][0] = 99
            return
        del h5["labels"]
        if kind == "external link":
            with h5py.File(elsewhere / "other.h5", "w") as other:
                other["labels"] = labels
            h5["labels"] = h5py.ExternalLink(str(elsewhere / "other.h5"), "labels")
        elif kind == "soft link":
            h5["stash"] = labels
            h5["labels"] = h5py.SoftLink("/stash")
        elif kind == "virtual dataset":
            with h5py.File(elsewhere / "other.h5", "w") as other:
                other["labels"] = labels
            layout = h5py.VirtualLayout(shape=labels.shape, dtype=labels.dtype)
            layout[:] = h5py.VirtualSource(str(elsewhere / "other.h5"), "labels", shape=labels.shape)
            h5.create_virtual_dataset("labels", layout)
        else:  # external raw storage
            raw = elsewhere / "labels.bin"
            raw.write_bytes(np.ascontiguousarray(labels).tobytes())
            h5.create_dataset("labels", shape=labels.shape, dtype=labels.dtype, external=[(str(raw), 0, raw.stat().st_size)])

    return change


@pytest.mark.parametrize("kind, message", [("external link", "is a ExternalLink, a link out of the shard"),
                                           ("soft link", "is a SoftLink, a link out of the shard"),
                                           ("virtual dataset", "is a virtual dataset"),
                                           ("external storage", "is stored in external files"),
                                           ("labels 99", "outside the 4 classes of its manifest")])
def test_a_shard_may_not_read_outside_itself_nor_hold_labels_of_no_class(fresh_copy, tmp_path, kind, message):
    from prep.errors import ShardFormatError
    from prep.shards import open_shards

    path = rewrite_shard(fresh_copy, move_labels_out(kind))
    with pytest.raises(ShardFormatError, match=message):
        open_shards(fresh_copy).split("train")[0]
    result = run_cli(["verify", str(fresh_copy)])
    assert result.exit_code == 1 and f"unreadable: shard {path}" in result.output and message in result.output
    if kind == "external link":  # the trainer reads through the same reader: once is enough
        one_line_error(train_cli("run", fresh_copy, *TINY, *FAST, "--lighting", 0, "--out", tmp_path / "run"), message)


@pytest.mark.parametrize("backend", ["dali", "torch"])
def test_a_jpeg_blob_of_another_size_is_refused_before_decoding(tmp_path, fake_src, backend):
    # One blob declaring 2000x2000 in a 64-px shard: each backend's workers check the header first.
    import io

    import numpy as np
    from PIL import Image

    if backend == "dali":
        pytest.importorskip("nvidia.dali")
    shards = tmp_path / "jpeg"
    assert run_cli(["shard", str(fake_src), "--out", str(shards), "--encoding", "jpeg", "--size", "64", "--quiet",
                    "--workers", "1"]).exit_code == 0
    big = io.BytesIO()
    Image.new("RGB", (2000, 2000), (90, 120, 30)).save(big, "JPEG")

    def change(h5, elsewhere):
        h5["jpeg"][0] = np.frombuffer(big.getvalue(), np.uint8)

    rewrite_shard(shards, change)
    result = train_cli("run", shards, *TINY, "--device", "cpu", "--backend", backend, "--workers", 1, "--batch-size", 8,
                       "--crop", 56, "--lighting", 0, "--epochs", 1, "--out", tmp_path / "run")
    one_line_error(result, "is a 2000x2000 JPEG where the shard holds 64x64 images")


FLIP_TRIALS = r'''
import json, random, sys
from pathlib import Path
from prep.errors import ImgprepError
from prep.shards import open_shards

root, trials = Path(sys.argv[1]), int(sys.argv[2])
files = sorted((root / "train").glob("*.h5"))
whole = {f: f.read_bytes() for f in files}
rng = random.Random(0)
for trial in range(trials):
    victim = files[rng.randrange(len(files))]
    data = bytearray(whole[victim])
    data[rng.randrange(min(len(data), 4096))] ^= 1 << rng.randrange(8)
    victim.unlink()  # a new inode: no reader may see the last trial's file through a cache
    victim.write_bytes(bytes(data))
    outcome = {"shard": str(victim)}
    try:
        split = open_shards(root).split("train")
        for number in range(len(split.files)):
            split.shard_file(number)
        split.close()
    except ImgprepError as error:
        outcome["error"] = str(error)
    print(json.dumps(outcome), flush=True)
    victim.unlink()
    victim.write_bytes(whole[victim])
'''


def test_single_bit_flips_in_a_shard_header_are_one_line_naming_the_shard(fresh_copy):
    # 120 seeded flips in the first 4 KiB of a shard (its HDF5 superblock, object headers and heaps),
    # each opened as the loader opens shards. Run in a child with a time limit: a flip can make
    # libhdf5 itself loop (docs/RELIABILITY.md), and that must fail this test, not hang the suite.
    result = subprocess.run([sys.executable, "-c", FLIP_TRIALS, str(fresh_copy), "120"], capture_output=True,
                            text=True, timeout=120, env=ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    outcomes = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(outcomes) == 120
    errors = [o for o in outcomes if "error" in o]
    assert len(errors) >= 10  # a fair part of the flips hit something the reader checks
    for outcome in errors:
        message = outcome["error"]
        assert outcome["shard"] in message and "\n" not in message and "(imgprep verify)" in message, message


def test_sizes_are_read_in_decimal_and_binary_units():
    import click

    from prep.options import ByteSize

    size = ByteSize()
    assert [size.convert(v, None, None) for v in ("123", "500MB", "1.5GiB", "2tb")] == \
        [123, 500 * 10**6, int(1.5 * 2**30), 2 * 10**12]
    with pytest.raises(click.BadParameter, match="is not a size"):
        size.convert("12 parsecs", None, None)
