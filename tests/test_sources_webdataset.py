"""Sharding webdataset tars (timm's ImageNet layout), read in place like the ILSVRC tars."""

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

from helpers import ForwardReads, shard_hashes, shard_into
from prep.sources import TreeReader, scan_source
from prep.sources.tars import DUPLICATE
from tools.source_layouts import tar_bytes, webdataset_tars


@pytest.fixture(scope="module")
def tree(flat_tree):
    return flat_tree


def shard(source, out, *extra):
    return shard_into(source, out, "--size", "64", *extra)


def images_by_stem(out: Path, split: str) -> dict:
    """File stem of each image's source -> (label, pixels)."""
    from prep.shards import open_shards

    reader = open_shards(out).split(split)
    return {Path(reader.key(i)).stem: (reader[i][1], reader[i][0]) for i in range(len(reader))}


@pytest.fixture(scope="module")
def from_tree(tree, tmp_path_factory):
    out = tmp_path_factory.mktemp("from-tree") / "out"
    shard(tree, out, "--val-labels", str(tree / "val_labels.txt"))
    return out


@pytest.fixture(scope="module")
def tars(tree, tmp_path_factory):
    return webdataset_tars(tree, tmp_path_factory.mktemp("wds") / "src")


@pytest.mark.timeout(120)
def test_tars_give_the_labels_and_pixels_of_the_tree_with_one_worker_or_two(tars, from_tree, tmp_path):
    manifest = shard(tars, tmp_path / "two", "--workers", "2")
    assert [(c["index"], c["wnid"]) for c in manifest["classes"]] == [(0, "0"), (1, "1"), (2, "2")]
    assert manifest["splits"]["train"]["count"] == 18 and manifest["splits"]["val"]["count"] == 9
    for split in ("train", "val"):
        ours, expected = images_by_stem(tmp_path / "two", split), images_by_stem(from_tree, split)
        assert sorted(ours) == sorted(expected)
        for stem, (label, pixels) in expected.items():
            assert ours[stem][0] == label, stem
            np.testing.assert_array_equal(ours[stem][1], pixels)
    from prep.shards import open_shards

    train = open_shards(tmp_path / "two").split("train")
    assert {train.key(i).split("/")[0] for i in range(len(train))} == {
        "imagenet1k-train-0000.tar", "imagenet1k-train-0001.tar", "imagenet1k-train-0002.tar"}
    shard(tars, tmp_path / "one", "--workers", "1")
    assert shard_hashes(tmp_path / "one") == shard_hashes(tmp_path / "two") and len(shard_hashes(tmp_path / "one")) == 6


@pytest.mark.timeout(120)
def test_the_scan_reads_each_tar_forward_once_labels_included(tars, monkeypatch):
    from prep.sources import webdataset

    reads = ForwardReads()
    monkeypatch.setattr(webdataset, "open_archive", reads.open)
    dataset = scan_source(tars)
    assert len(dataset.splits["train"]) == 18 and len(dataset.splits["val"]) == 9
    assert len(reads.back) == 5  # 3 train tars, 2 val tars
    assert max(reads.back.values()) <= tarfile.BLOCKSIZE  # a header or end block read again, no more


def test_bad_samples_are_rejected_with_their_reason(tree, tmp_path):
    image = next((tree / "train" / "n01440764").iterdir()).read_bytes()
    empty_duplicate = tarfile.TarInfo("n01440764_00000.jpg")  # a second member of a name already there
    tars = webdataset_tars(tree, tmp_path / "wds", extra={
        "nolabel.jpg": image, "garbage.jpg": b"\xff\xd8 not a jpeg", "garbage.cls": b"1",
        "word.jpg": image, "word.cls": b"one", "negative.jpg": image, "negative.cls": b"-1",
        "huge.jpg": image, "huge.cls": b"40000", "lonely.cls": b"0", "lonely.json": b"{}",
        "twice.jpg": image, "twice.png": image, "twice.cls": b"0",
        "bad\udcff.jpg": image, "bad\udcff.cls": b"0",  # stored as the byte 0xff
        "duplicate": empty_duplicate})
    out = tmp_path / "out"
    manifest = shard(tars, out, "--workers", "1")
    rejects = [(r["path"], r["reason"]) for r in map(json.loads, (out / "rejects.jsonl").read_text().splitlines())]
    first = "imagenet1k-train-0000.tar/"
    assert sorted(rejects) == sorted([
        (f"{first}nolabel.jpg", "no label: the sample has no .cls member"),
        (f"{first}garbage.jpg", "not an image (unrecognised file format)"),
        (f"{first}word.jpg", "the .cls member is not an integer: b'one'"),
        (f"{first}negative.jpg", "label -1 in the .cls member is negative"),
        (f"{first}huge.jpg", "label 40000 in the .cls member is over 32766, the largest int16 label"),
        (f"{first}lonely", "a sample without an image (no .jpg, .jpeg, .png or .webp member)"),
        (f"{first}twice", "two images in one sample (twice.jpg and twice.png): which one the label is for is unknown"),
        (f"{first}bad\\xff.jpg", "file name is not valid UTF-8"),
        (f"{first}bad\\xff.cls", "file name is not valid UTF-8"),
        (f"{first}n01440764_00000.jpg", DUPLICATE),  # the first of the name; the last is read:
        (f"{first}n01440764_00000.jpg", "empty file"),
    ])
    assert manifest["splits"]["train"]["count"] == 17 and manifest["splits"]["val"]["count"] == 9


def test_exactly_1000_classes_take_imagenet_1k_wnids(tmp_path):
    from prep.sources.imagenet1k import imagenet1k_wnids

    samples = {"a.jpg": b"x", "a.cls": b"0", "b.jpg": b"x", "b.cls": b"999\n"}
    (tmp_path / "in1k-train-0.tar").write_bytes(tar_bytes(samples))
    classes = scan_source(tmp_path).classes
    assert len(classes) == 1000 and [c.wnid for c in classes] == list(imagenet1k_wnids())
    assert (classes[0].wnid, classes[999].wnid) == ("n01440764", "n15075141")
    (tmp_path / "in1k-val-0.tar").write_bytes(tar_bytes({"c.webp": b"x", "c.cls": b"1000"}))
    assert [c.wnid for c in scan_source(tmp_path).classes][-2:] == ["999", "1000"]  # 1001: numbered only


def test_a_damaged_tar_keeps_the_samples_before_the_damage(tmp_path):
    data = tar_bytes({"a.jpg": b"x" * 600, "a.cls": b"0", "b.jpg": b"x" * 600, "b.cls": b"1"})
    (tmp_path / "x-train-0.tar").write_bytes(data[:2560] + b"\x01" * 512)  # b.jpg's header is garbage
    dataset = scan_source(tmp_path)
    assert dataset.splits["train"] == (("x-train-0.tar/a.jpg", 0),)
    assert [r.path for r in dataset.rejects] == ["x-train-0.tar"]
    assert dataset.rejects[0].reason.startswith("unreadable tar: ")


def test_a_tree_holding_such_a_tar_is_still_a_tree(tree, tmp_path):
    import shutil

    src = Path(shutil.copytree(tree, tmp_path / "src"))
    (src / "extra-train-0.tar").write_bytes(tar_bytes({"a.jpg": b"x", "a.cls": b"0"}))
    assert isinstance(scan_source(src, src / "val_labels.txt").reader, TreeReader)
