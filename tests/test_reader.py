"""The reader API other stages build on: checked open, lengths, (image, label) by global index."""

import json
import multiprocessing

import h5py
import numpy as np
import pytest

from prep.errors import ShardFormatError
from prep.shards import open_shards
from tools.reference import lanczos_reference, psnr

pytestmark = pytest.mark.timeout(120)  # a reader is used across a fork


def test_lengths_classes_and_labels(shards):
    shard_set = open_shards(shards)
    assert shard_set.splits == ["train", "val"]
    assert [c["wnid"] for c in shard_set.classes] == ["n01440764", "n01443537", "n01484850", "n01491361"]
    val = shard_set.split("val")
    assert len(val) == 16
    labels = val.labels
    assert labels.dtype == np.int64 and sorted(np.bincount(labels).tolist()) == [4, 4, 4, 4]
    assert [val[i][1] for i in range(len(val))] == labels.tolist()
    indices = np.array([15, 0, 3, 3, 12, 7])  # any order, repeats, across shard files
    assert val.labels_of(indices).tolist() == [val[int(i)][1] for i in indices]


def test_images_by_global_index_match_their_source(shards, fake_src):
    shard_set = open_shards(shards)
    train = shard_set.split("train")
    wnid_index = {c["wnid"]: c["index"] for c in shard_set.classes}
    for i in (0, 15, 16, len(train) - 1):  # both sides of a shard boundary (16 files a shard)
        image, label = train[i]
        key = train.key(i)
        assert image.shape == (256, 256, 3) and image.dtype == np.uint8
        assert label == wnid_index[key.split("/")[1]]
        if key.endswith(".JPEG") and (fake_src / key).read_bytes()[:3] == b"\xff\xd8\xff":
            assert psnr(image, lanczos_reference((fake_src / key).read_bytes())) > 35


def _label_in_child(index):
    return FORKED_READER[index][1]


def test_reader_survives_fork(shards):
    global FORKED_READER
    FORKED_READER = open_shards(shards).split("val")
    expected = [FORKED_READER[i][1] for i in range(len(FORKED_READER))]  # opens files in the parent
    with multiprocessing.get_context("fork").Pool(2) as pool:
        assert pool.map(_label_in_child, range(len(FORKED_READER))) == expected


def test_out_of_range_and_unknown_split(shards):
    shard_set = open_shards(shards)
    with pytest.raises(IndexError):
        shard_set.split("val")[16]
    with pytest.raises(ShardFormatError, match="has no split 'test' \\(it has: train, val\\)"):
        shard_set.split("test")


@pytest.mark.parametrize("change,message", [
    (lambda m: m.update(format="something-else"), "is not an imgprep manifest"),
    (lambda m: m.update(version=3), "has format version 3; this imgprep reads versions 1 and 2"),
    (lambda m: m.update(version=2), "policy 'crop' does not go with format version 2"),
])
def test_foreign_or_newer_manifest_is_refused(fresh_copy, change, message):
    manifest = json.loads((fresh_copy / "manifest.json").read_text())
    change(manifest)
    (fresh_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ShardFormatError, match=message):
        open_shards(fresh_copy)


def test_folder_without_manifest(tmp_path):
    with pytest.raises(ShardFormatError, match="is not a shard folder"):
        open_shards(tmp_path)


def test_shard_file_disagreeing_with_manifest_is_named(fresh_copy):
    victim = fresh_copy / "val" / "val-00000.h5"
    with h5py.File(victim, "r+") as f:
        f.attrs["size"] = 224
    with pytest.raises(ShardFormatError, match=f"shard {victim} has size=224 where the manifest says 256"):
        open_shards(fresh_copy).split("val")[0]


def test_missing_shard_file_is_named(fresh_copy):
    (fresh_copy / "val" / "val-00000.h5").unlink()
    with pytest.raises(ShardFormatError, match="val-00000.h5 is missing"):
        open_shards(fresh_copy).split("val")[0]


def test_a_split_without_shards_has_length_zero(fresh_copy):
    manifest = json.loads((fresh_copy / "manifest.json").read_text())
    manifest["splits"]["val"] = {"count": 0, "rejected": 16, "shards": []}  # every val file rejected
    (fresh_copy / "manifest.json").write_text(json.dumps(manifest))
    val = open_shards(fresh_copy).split("val")
    assert len(val) == 0 and val.labels.tolist() == []


def test_a_jpeg_of_the_wrong_size_is_an_error_not_a_bad_read(fake_src, tmp_path):
    import io

    from PIL import Image

    from helpers import run_cli

    out = tmp_path / "jpeg"
    run_cli(["shard", str(fake_src), "--out", str(out), "--encoding", "jpeg", "--quiet"])
    small = io.BytesIO()
    Image.new("RGB", (8, 8)).save(small, "JPEG")
    with h5py.File(out / "val" / "val-00000.h5", "r+") as f:
        f["jpeg"][0] = np.frombuffer(small.getvalue(), np.uint8)
    with pytest.raises(ShardFormatError, match=r"image 0 is a 8x8 JPEG where the shard holds 256x256 images"):
        open_shards(out).split("val")[0]
