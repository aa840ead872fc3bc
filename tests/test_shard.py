"""``imgprep shard``, ``info`` and ``verify`` end to end on a generated tree."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from helpers import run_cli, shard_hashes
from prep.sources.common import ReadsImagesAlone
from tools.fake_imagenet import AWKWARD, make_fake_imagenet

FIRST = "train/n01440764"
pytestmark = pytest.mark.timeout(300)  # shard jobs start worker processes


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_manifest_follows_the_contract(shards, fake_src):
    manifest = json.loads((shards / "manifest.json").read_text())
    assert manifest["format"] == "imgprep-shards" and manifest["version"] == 1
    assert manifest["source"] == str(fake_src.resolve())
    assert manifest["options"] == {"size": 256, "policy": "crop", "encoding": "raw", "quality": 90,
                                   "shard_size": 16, "seed": 0, "max_pixels": 100_000_000}
    assert manifest["classes"][0] == {"index": 0, "wnid": "n01440764", "name": "tench, Tinca tinca"}
    assert [c["index"] for c in manifest["classes"]] == [0, 1, 2, 3]
    usable = sum(1 for _, outcome, _ in AWKWARD if outcome == "ok")
    assert manifest["splits"]["train"]["count"] == 4 * 12 + usable
    assert manifest["splits"]["val"]["count"] == 4 * 4
    for entry in manifest["splits"]["train"]["shards"]:
        assert sha256(shards / entry["file"]) == entry["sha256"]


def test_every_h5_follows_the_contract(shards):
    for path in shards.glob("*/*.h5"):
        with h5py.File(path, "r") as f:
            assert dict(f.attrs) == {"format": "imgprep-shard", "version": 1, "split": path.parent.name,
                                     "encoding": "raw", "size": 256}
            n = len(f["labels"])
            assert f["labels"].dtype == np.int16 and f["keys"].shape == (n,)
            assert f["images"].shape == (n, 256, 256, 3) and f["images"].dtype == np.uint8
            assert f["images"].chunks == (1, 256, 256, 3) and f["images"].compression is None
            assert all(k.decode().startswith(f"{path.parent.name}/") for k in f["keys"][:])


def test_awkward_files_are_kept_or_rejected_with_reasons(shards):
    keys = set()
    for path in shards.glob("train/*.h5"):
        with h5py.File(path, "r") as f:
            keys |= {k.decode() for k in f["keys"][:]}
    rejects = {r["path"]: r["reason"] for r in map(json.loads, (shards / "rejects.jsonl").read_text().splitlines())}
    for name, outcome, what in AWKWARD:
        key = f"{FIRST}/{name}"
        assert (key in keys) == (outcome == "ok"), what
        assert (key in rejects) == (outcome == "reject"), what
    assert rejects["train/README.txt"] == "not inside a class folder"
    assert "too large: 10000x10001" in rejects[f"{FIRST}/bomb.png"]
    manifest = json.loads((shards / "manifest.json").read_text())
    assert manifest["rejected"] == len(rejects) == manifest["splits"]["train"]["rejected"]


def test_shards_mix_classes(shards):
    for path in shards.glob("train/*.h5"):
        with h5py.File(path, "r") as f:
            assert len(set(f["labels"][:].tolist())) >= 3, path


def test_same_input_same_bytes_whatever_the_worker_count(shards, fake_src, tmp_path):
    result = run_cli(["shard", str(fake_src), "--out", str(tmp_path / "again"), "--shard-size", "16",
                      "--workers", "1", "--quiet"])
    assert result.exit_code == 0, result.output
    assert shard_hashes(tmp_path / "again") == shard_hashes(shards)
    assert (tmp_path / "again" / "manifest.json").read_bytes() == (shards / "manifest.json").read_bytes()
    assert (tmp_path / "again" / "rejects.jsonl").read_bytes() == (shards / "rejects.jsonl").read_bytes()
    assert not (tmp_path / "again" / ".partial").exists()


def test_jpeg_encoding(fake_src, tmp_path):
    from tools.reference import psnr
    from prep.shards import open_shards

    out = tmp_path / "jpeg"
    result = run_cli(["shard", str(fake_src), "--out", str(out), "--encoding", "jpeg", "--quality", "95",
                      "--shard-size", "100", "--quiet"])
    assert result.exit_code == 0, result.output
    with h5py.File(out / "train" / "train-00000.h5", "r") as f:
        assert "images" not in f and f["jpeg"].dtype == h5py.vlen_dtype(np.uint8)
        assert f.attrs["encoding"] == "jpeg"
        assert bytes(f["jpeg"][0][:3]) == b"\xff\xd8\xff"
    val = open_shards(out).split("val")
    image, _ = val[0]
    key = val.key(0)
    from prep.decode import decode_resize

    raw = decode_resize((fake_src / key).read_bytes(), 256, "crop", 10**8)
    assert image.shape == (256, 256, 3) and psnr(image, raw) > 35


def test_info_reports_splits_classes_and_rejects(shards):
    result = run_cli(["info", str(shards)])
    assert result.exit_code == 0, result.output
    assert "train" in result.output and "val" in result.output and "n01440764 (tench" in result.output
    assert "classes  4:" in result.output and "too large" in result.output


def test_verify_passes_then_names_a_flipped_byte_and_a_missing_file(fresh_copy):
    assert run_cli(["verify", str(fresh_copy)]).exit_code == 0
    victim = sorted(fresh_copy.glob("train/*.h5"))[1]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    gone = sorted(fresh_copy.glob("val/*.h5"))[0]
    gone.unlink()
    result = run_cli(["verify", str(fresh_copy)])
    assert result.exit_code == 1
    assert f"sha256 mismatch: {victim}" in result.output and f"missing: {gone}" in result.output


def test_rerun_of_a_complete_folder_does_nothing(shards, fake_src):
    before = shard_hashes(shards)
    result = run_cli(["shard", str(fake_src), "--out", str(shards), "--shard-size", "16", "--quiet"])
    assert result.exit_code == 0 and "already complete" in result.output
    assert shard_hashes(shards) == before


def test_deleted_shard_is_rebuilt_alone(fresh_copy, fake_src, shards):
    victim = sorted(fresh_copy.glob("train/*.h5"))[2]
    others = {p: p.stat().st_mtime_ns for p in fresh_copy.glob("*/*.h5") if p != victim}
    victim.unlink()
    result = run_cli(["shard", str(fake_src), "--out", str(fresh_copy), "--shard-size", "16", "--quiet"])
    assert result.exit_code == 0, result.output
    assert shard_hashes(fresh_copy) == shard_hashes(shards)
    assert (fresh_copy / "manifest.json").read_bytes() == (shards / "manifest.json").read_bytes()
    assert (fresh_copy / "rejects.jsonl").read_bytes() == (shards / "rejects.jsonl").read_bytes()
    assert all(p.stat().st_mtime_ns == t for p, t in others.items())


def test_other_options_are_refused_unless_overwrite(fresh_copy, fake_src):
    args = ["shard", str(fake_src), "--out", str(fresh_copy), "--shard-size", "16", "--size", "128", "--quiet"]
    result = run_cli(args)
    assert result.exit_code == 1
    assert "made with other options or from another source; use --overwrite" in result.output
    assert "Traceback" not in result.output
    result = run_cli(args + ["--overwrite"])
    assert result.exit_code == 0, result.output
    assert json.loads((fresh_copy / "manifest.json").read_text())["options"]["size"] == 128


def test_flat_validation_folder_with_labels(tmp_path):
    src = make_fake_imagenet(tmp_path / "src", classes=3, train_per_class=3, val_per_class=2, flat_val=True,
                             awkward=False)
    out = tmp_path / "out"
    assert run_cli(["shard", str(src), "--out", str(out), "--quiet"]).exit_code == 1  # labels needed
    result = run_cli(["shard", str(src), "--out", str(out), "--val-labels", str(src / "val_labels.txt"), "--quiet"])
    assert result.exit_code == 0, result.output
    with h5py.File(out / "val" / "val-00000.h5", "r") as f:
        # Generated val names encode their class: ILSVRC2012_val_<label:03d><i:05d>.JPEG
        for key, label in zip(f["keys"][:], f["labels"][:]):
            assert int(key.decode().split("_val_")[1][:3]) == label


@pytest.mark.parametrize("args,message", [
    (["shard", "/no/such/folder"], "source folder /no/such/folder does not exist"),
    (["info", "/no/such/shards"], "shard folder /no/such/shards does not exist"),
])
def test_bad_arguments_give_one_line(args, message):
    result = run_cli(args)
    assert result.exit_code == 1 and message in result.output and "Traceback" not in result.output


def test_unwritable_output_gives_one_line(fake_src, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    result = run_cli(["shard", str(fake_src), "--out", str(blocker / "sub"), "--quiet"])
    assert result.exit_code == 1 and "cannot create output folder" in result.output


def test_nothing_usable_is_an_error(tmp_path):
    (tmp_path / "src/train/n01").mkdir(parents=True)
    (tmp_path / "src/train/n01/a.JPEG").write_bytes(b"")
    (tmp_path / "src/train/n01/b.JPEG").write_bytes(b"not a jpeg")
    result = run_cli(["shard", str(tmp_path / "src"), "--out", str(tmp_path / "out"), "--quiet"])
    assert result.exit_code == 1 and "no usable images" in result.output
    assert not (tmp_path / "out" / "manifest.json").exists()
    assert len((tmp_path / "out" / "rejects.jsonl").read_text().splitlines()) == 2


def shard_command(src, out):
    return [sys.executable, "-m", "prep.cli", "shard", str(src), "--out", str(out), "--shard-size", "4",
            "--workers", "1", "--quiet"]


def wait_for_records(out: Path, n: int, process, timeout=60.0):
    deadline = time.time() + timeout
    while len(list((out / ".partial").glob("*-*.json"))) < n:
        assert process.poll() is None, "finished before it could be interrupted"
        assert time.time() < deadline
        time.sleep(0.05)


def wait_for_group_exit(group: int, timeout=30.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    raise AssertionError("worker processes outlived the run")


@pytest.fixture(scope="module")
def src_and_clean(tmp_path_factory):
    """A small source, and its shards from a run that nothing stopped."""
    root = tmp_path_factory.mktemp("interrupted")
    src = make_fake_imagenet(root / "src", classes=4, train_per_class=20, val_per_class=2, awkward=False,
                             large_fraction=0)
    subprocess.run(shard_command(src, root / "clean"), check=True, capture_output=True, timeout=120)
    return src, root / "clean"


@pytest.mark.timeout(120)  # it runs the job twice
@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_interrupted_run_resumes_to_identical_output(src_and_clean, tmp_path, sig):
    src, clean = src_and_clean
    out = tmp_path / "out"
    process = subprocess.Popen(shard_command(src, out), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               start_new_session=True)
    wait_for_records(out, 3, process)
    os.killpg(process.pid, sig)
    output = process.communicate(timeout=30)[0].decode()
    wait_for_group_exit(process.pid)  # pool workers share the output lock until they are gone
    assert not (out / "manifest.json").exists()
    if sig == signal.SIGINT:
        assert process.returncode == 1 and "interrupted; finished shards are kept" in output
    done_before = len(list((out / ".partial").glob("*-*.json")))
    resumed = subprocess.run(shard_command(src, out), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"{done_before} shards kept from an earlier run" in resumed.stdout
    assert shard_hashes(out) == shard_hashes(clean)
    assert (out / "manifest.json").read_bytes() == (clean / "manifest.json").read_bytes()
    assert not list(out.glob("*/*.tmp"))


class DyingReader(ReadsImagesAlone):
    """Kills the worker process that reads one particular file, as an out-of-memory kill would."""

    def __init__(self, inner, victim):
        self.inner, self.victim = inner, victim

    def read(self, key, max_bytes):
        if key == self.victim:
            os._exit(9)
        return self.inner.read(key, max_bytes)


def test_a_dead_worker_stops_the_job_with_one_line_and_keeps_finished_shards(fake_src, tmp_path):
    from dataclasses import replace

    from prep.errors import PrepError
    from prep.job import run_shard_job
    from prep.plan import ShardOptions
    from prep.sources import scan_source

    dataset = scan_source(fake_src)
    victim = dataset.splits["val"][0][0]
    with pytest.raises(PrepError, match="a worker process died while making val/val-00000.h5"):
        run_shard_job(replace(dataset, reader=DyingReader(dataset.reader, victim)), tmp_path / "out",
                      ShardOptions(shard_size=16), workers=2, progress=False)
    assert (tmp_path / "out" / ".partial").is_dir() and not (tmp_path / "out" / "manifest.json").exists()
    summary = run_shard_job(dataset, tmp_path / "out", ShardOptions(shard_size=16), workers=2, progress=False)
    assert summary.counts["val"] == 16  # the rerun completes the job
