"""Sharding Hugging Face's original ImageNet archives: gzip'd tars, decompressed once into the
output's journal (staged) and read at offsets there."""

import gzip
import io
import json
import os
import re
import shutil
import tarfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from helpers import run_cli, shard_hashes, shard_into
from prep.errors import OutputError, SourceError
from prep.sources import TreeReader, scan_source
from prep.sources.hf_archives import stage_archives
from tools.source_layouts import add_file, hf_archives, tar_bytes

WNIDS = ["n01440764", "n01443537", "n01484850"]


@pytest.fixture(scope="module")
def tree(flat_tree):
    return flat_tree


@pytest.fixture(scope="module")
def archives(tree, tmp_path_factory):
    return hf_archives(tree, tmp_path_factory.mktemp("hf") / "src")


def shard(source, out, *extra):
    return shard_into(source, out, "--size", "64", *extra)


def images_by_name(out: Path, split: str) -> dict:
    """Source file name, less any _<wnid> the archives add -> (label, pixels)."""
    from prep.shards import open_shards

    reader = open_shards(out).split(split)
    return {re.sub(r"_n[0-9]{8}$", "", Path(reader.key(i)).stem): (reader[i][1], reader[i][0])
            for i in range(len(reader))}


def append(tar: bytes, name: str, data: bytes) -> bytes:
    """``tar`` with one more member (its end-of-archive blocks rewritten after it)."""
    buffer = io.BytesIO(tar)
    with tarfile.open(fileobj=buffer, mode="a") as archive:
        add_file(archive, name, data)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def from_archives(archives, tmp_path_factory):
    out = tmp_path_factory.mktemp("from-hf") / "out"
    shard(archives, out, "--workers", "2")
    return out


@pytest.mark.timeout(120)
def test_archives_give_the_labels_and_pixels_of_the_tree(tree, from_archives, tmp_path):
    from_tree = tmp_path / "from-tree"
    shard(tree, from_tree, "--val-labels", str(tree / "val_labels.txt"))
    manifest = json.loads((from_archives / "manifest.json").read_text())
    assert [(c["index"], c["wnid"]) for c in manifest["classes"]] == list(enumerate(WNIDS))
    assert manifest["splits"]["train"]["count"] == 18 and manifest["splits"]["val"]["count"] == 9
    for split in ("train", "val"):
        ours, expected = images_by_name(from_archives, split), images_by_name(from_tree, split)
        assert sorted(ours) == sorted(expected) and len(ours) == {"train": 18, "val": 9}[split]
        for name, (label, pixels) in expected.items():
            assert ours[name][0] == label, name
            np.testing.assert_array_equal(ours[name][1], pixels)
    assert not (from_archives / ".partial").exists()  # the staged tars went with the journal


@pytest.mark.timeout(120)
def test_dot_prefixed_member_names_give_the_same_shards(archives, from_archives, tmp_path):
    # ``tar -C DIR -czf x.tar.gz .`` names every member ./NAME, after a ./ folder: the same keys
    # and labels (taken from the names) as without the prefix.
    source = tmp_path / "src"
    source.mkdir()
    for path in sorted(archives.iterdir()):
        files = {"./": None}
        with tarfile.open(fileobj=io.BytesIO(gzip.decompress(path.read_bytes()))) as archive:
            files.update({"./" + m.name: archive.extractfile(m).read() for m in archive.getmembers()})
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as archive:
            folder = tarfile.TarInfo("./")
            folder.type = tarfile.DIRTYPE
            archive.addfile(folder)
            for name, data in files.items():
                if data is not None:
                    add_file(archive, name, data)
        (source / path.name).write_bytes(gzip.compress(buffer.getvalue(), mtime=0))
    with tarfile.open(source / "train_images_0.tar.gz") as archive:
        assert archive.getnames()[0] == "." and archive.getnames()[1].startswith("./")
    shard(source, tmp_path / "out", "--workers", "2")
    assert shard_hashes(tmp_path / "out") == shard_hashes(from_archives)


@pytest.mark.timeout(120)
def test_one_worker_writes_the_same_shards_as_two(archives, from_archives, tmp_path):
    shard(archives, tmp_path / "out", "--workers", "1")
    assert shard_hashes(tmp_path / "out") == shard_hashes(from_archives) and len(shard_hashes(from_archives)) == 6


@pytest.mark.timeout(120)
def test_bad_members_are_rejected_with_their_reason(tree, tmp_path):
    image = next((tree / "train" / WNIDS[0]).iterdir()).read_bytes()
    source = hf_archives(tree, tmp_path / "hf", extra={
        "no_class.JPEG": image, "garbage_n01440764.JPEG": b"\xff\xd8 not a jpeg", "notes_n01440764.txt": b"x"})
    val = source / "val_images.tar.gz"
    val.write_bytes(gzip.compress(append(gzip.decompress(val.read_bytes()), "ILSVRC2012_val_1_n09999999.JPEG", image)))
    out = tmp_path / "out"
    manifest = shard(source, out, "--workers", "1")
    rejects = {r["path"]: r["reason"] for r in map(json.loads, (out / "rejects.jsonl").read_text().splitlines())}
    assert rejects == {
        "train_images_0.tar.gz/no_class.JPEG":
            "no label for this file in its name (expected <name>_<wnid>.JPEG, as in n01440764_10026_n01440764.JPEG)",
        "train_images_0.tar.gz/garbage_n01440764.JPEG": "not an image (unrecognised file format)",
        "train_images_0.tar.gz/notes_n01440764.txt": "not an image file (extension '.txt')",
        "val_images.tar.gz/ILSVRC2012_val_1_n09999999.JPEG":
            "label 'n09999999' is not a class of the training archives",
    }
    assert manifest["splits"]["train"]["count"] == 18 and manifest["splits"]["val"]["count"] == 9


@pytest.mark.timeout(120)
def test_an_interrupted_run_resumes_from_its_staged_tars(archives, from_archives, tmp_path):
    out = tmp_path / "out"
    scan_source(archives).reader.prepare(out / ".partial", 1, False)  # as if a run stopped after decompressing
    staged = out / ".partial" / "staged"
    (staged / "val_images.tar").unlink()  # ... all but one archive,
    (staged / "val_images.tar.tmp-0123456789ab").write_bytes(b"half a tar")  # whose copy was half written
    shard(archives, out, "--workers", "2")
    assert shard_hashes(out) == shard_hashes(from_archives)
    assert not (out / ".partial").exists()


@pytest.mark.timeout(120)
def test_staged_tars_are_reused_only_when_whole_and_from_the_same_archive(archives, tmp_path):
    gzips = scan_source(archives).reader.gzips
    staged = stage_archives(gzips, tmp_path, 2, False)
    assert sorted(Path(p).name for p in staged.values()) == ["train_images_0.tar", "train_images_1.tar",
                                                             "val_images.tar"]
    for name, path in staged.items():  # each is the archive's tar, byte for byte
        assert Path(path).read_bytes() == gzip.decompress(Path(gzips[name][0]).read_bytes())
    inodes = {name: os.stat(path).st_ino for name, path in staged.items()}
    (tmp_path / "train_images_0.tar.tmp-0123456789ab").write_bytes(b"x")
    with open(staged["train_images_1.tar.gz"], "r+b") as f:
        f.truncate(1000)  # cut short
    copy = tmp_path / "copy"
    gzips = {**gzips, "val_images.tar.gz": (str(shutil.copy(gzips["val_images.tar.gz"][0], copy)),
                                            gzips["val_images.tar.gz"][1])}  # another file: another mtime
    os.utime(copy, ns=(0, 0))
    again = stage_archives(gzips, tmp_path, 2, False)
    assert [name for name, path in again.items() if os.stat(path).st_ino == inodes[name]] == ["train_images_0.tar.gz"]
    assert os.path.getsize(again["train_images_1.tar.gz"]) == gzips["train_images_1.tar.gz"][1]
    assert not list(tmp_path.glob("*.tmp-*"))


def test_a_corrupt_archive_is_one_line_naming_it(archives, tmp_path):
    source = Path(shutil.copytree(archives, tmp_path / "hf"))
    damaged = source / "train_images_1.tar.gz"
    damaged.write_bytes(damaged.read_bytes()[:-100])
    result = run_cli(["shard", str(source), "--out", str(tmp_path / "out"), "--quiet"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"{damaged} cannot be read as a gzip'd tar (Compressed file ended before" in result.output
    assert len(result.output.strip().splitlines()) == 2  # the command's settings line, then the error


@pytest.mark.timeout(120)
def test_an_archive_damaged_after_the_scan_is_one_error_naming_it(archives, tmp_path):
    source = Path(shutil.copytree(archives, tmp_path / "hf"))
    reader = scan_source(source).reader
    data = bytearray((source / "val_images.tar.gz").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (source / "val_images.tar.gz").write_bytes(bytes(data))
    with pytest.raises(SourceError, match=r"val_images\.tar\.gz cannot be decompressed \(.+\); download it again"):
        reader.prepare(tmp_path / "out" / ".partial", 2, False)


def test_staging_needs_room_for_the_tars(archives, tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "disk_usage", lambda path: SimpleNamespace(free=1000))
    with pytest.raises(OutputError, match=r"needs 0\.0 GB free for the decompressed archives"):
        stage_archives(scan_source(archives).reader.gzips, tmp_path, 1, False)


def test_a_tree_holding_such_an_archive_is_still_a_tree(tree, tmp_path):
    src = Path(shutil.copytree(tree, tmp_path / "src"))
    (src / "train_images_0.tar.gz").write_bytes(gzip.compress(tar_bytes({"a_n01440764.JPEG": b"x"})))
    assert isinstance(scan_source(src, src / "val_labels.txt").reader, TreeReader)
