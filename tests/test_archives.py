"""Sharding straight from ILSVRC-2012-style archives and from Kaggle's layout."""

import io
import json
import tarfile

import pytest

from helpers import ForwardReads, run_cli, shard_hashes, shard_into
from tools.source_layouts import add_file, tar_bytes
from tools.source_layouts import ilsvrc_archives as make_archives

pytestmark = pytest.mark.timeout(300)  # shard jobs start worker processes


@pytest.fixture(scope="module")
def tree(flat_tree):
    return flat_tree


shard = shard_into


def test_archives_give_the_same_shards_as_the_extracted_tree(tree, tmp_path):
    archives = make_archives(tree, tmp_path / "ilsvrc")
    from_tree = tmp_path / "from-tree"
    shard(tree, from_tree, "--val-labels", str(tree / "val_labels.txt"))
    manifest = shard(archives, tmp_path / "from-archives")
    assert shard_hashes(tmp_path / "from-archives") == shard_hashes(from_tree)
    assert manifest["splits"]["val"]["count"] == 9 and manifest["splits"]["train"]["count"] == 18
    assert manifest["classes"][0] == {"index": 0, "wnid": "n01440764", "name": "tench, Tinca tinca"}


def test_the_scan_reads_each_archive_forward_once(tree, tmp_path, monkeypatch):
    """A tar in a bucket is read in large forward requests: a scan that went back (to each
    per-class tar after listing the outer one) would download the training archive twice."""
    from prep.sources import ilsvrc, scan_source

    archives = make_archives(tree, tmp_path / "ilsvrc")
    reads = ForwardReads()
    monkeypatch.setattr(ilsvrc, "open_archive", reads.open)
    dataset = scan_source(archives)
    assert len(dataset.splits["train"]) == 18 and len(dataset.splits["val"]) == 9
    assert set(reads.back) == {str(archives / "ILSVRC2012_img_train.tar"), str(archives / "ILSVRC2012_img_val.tar")}
    assert max(reads.back.values()) <= tarfile.BLOCKSIZE  # a header or end block read again, no more


def dot_prefixed(tar: bytes, inner: bool = False) -> bytes:
    """The tar as ``tar -C DIR -cf x.tar .`` writes it: a ``./`` folder first, every name under ``./``."""
    members = {"./": tarfile.TarInfo("./")}
    members["./"].type = tarfile.DIRTYPE
    with tarfile.open(fileobj=io.BytesIO(tar)) as archive:
        for member in archive.getmembers():
            data = archive.extractfile(member).read()
            members["./" + member.name] = dot_prefixed(data) if inner else data
    return tar_bytes(members)


def test_dot_prefixed_member_names_give_the_extracted_trees_shards(tree, tmp_path):
    archives = make_archives(tree, tmp_path / "ilsvrc")
    for name, inner in (("ILSVRC2012_img_train.tar", True), ("ILSVRC2012_img_val.tar", False)):
        path = archives / name
        path.write_bytes(dot_prefixed(path.read_bytes(), inner))
    with tarfile.open(archives / "ILSVRC2012_img_val.tar") as val:
        assert val.getnames()[:2] == [".", "./" + sorted((tree / "val").iterdir())[0].name]
    from_tree = tmp_path / "from-tree"
    shard(tree, from_tree, "--val-labels", str(tree / "val_labels.txt"))
    manifest = shard(archives, tmp_path / "from-archives")
    assert manifest["splits"]["val"]["count"] == 9 and manifest["splits"]["train"]["count"] == 18
    assert shard_hashes(tmp_path / "from-archives") == shard_hashes(from_tree)


def test_devkit_ids_are_mapped_through_wnids(tree, tmp_path):
    # The devkit numbers the classes in reverse; labels must still be sorted-wnid indices.
    from prep.shards import open_shards

    shard(make_archives(tree, tmp_path / "ilsvrc"), tmp_path / "out")
    val = open_shards(tmp_path / "out").split("val")
    for i in range(len(val)):  # generated val names encode the class: ILSVRC2012_val_<label:03d><i:05d>
        assert val[i][1] == int(val.key(i).split("_val_")[1][:3])


def test_kaggle_layout(tree, tmp_path):
    from tools.source_layouts import kaggle_folder

    root = kaggle_folder(tree, tmp_path / "kaggle")
    manifest = shard(root, tmp_path / "from-kaggle")
    shard(tree, tmp_path / "from-tree", "--val-labels", str(tree / "val_labels.txt"))
    assert shard_hashes(tmp_path / "from-kaggle") == shard_hashes(tmp_path / "from-tree")
    assert manifest["classes"][1]["name"].startswith("goldfish")


def test_bad_members_are_rejected_not_read(tree, tmp_path):
    link = tarfile.TarInfo("link.JPEG")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    archives = make_archives(
        tree, tmp_path / "ilsvrc",
        extra_train={"README.txt": b"hello", "extra/n09999999.tar": tar_bytes({"a.JPEG": b"x"})},
        extra_class={"inner.tar": tar_bytes({"a.JPEG": b"x"}), "../escape.JPEG": b"x", "notes.txt": b"x",
                     "huge.JPEG": b"\xff" * 5_000_000, "link.JPEG": link})
    out = tmp_path / "out"
    shard(archives, out, "--max-pixels", "310000")  # caps files at 4 x 310,000 + 1 MiB = 2.3 MB
    rejects = {r["path"]: r["reason"] for r in map(json.loads, (out / "rejects.jsonl").read_text().splitlines())}
    first = "train/n01440764"
    assert rejects["train/README.txt"].startswith("not a per-class tar")
    assert rejects["train/extra/n09999999.tar"].startswith("not a per-class tar")
    assert rejects[f"{first}/inner.tar"] == "a nested archive inside a per-class tar; not read"
    assert rejects[f"{first}/link.JPEG"] == "not a regular file (link, device or sparse file)"
    assert rejects[f"{first}/../escape.JPEG"] == "unsafe member name"
    assert rejects[f"{first}/notes.txt"] == "not an image file (extension '.txt')"
    assert rejects[f"{first}/huge.JPEG"].startswith("file too large")
    assert not list(out.rglob("escape*")) and not (tmp_path / "escape.JPEG").exists()


def test_flat_val_archive_without_labels_says_what_to_add(tree, tmp_path):
    archives = make_archives(tree, tmp_path / "ilsvrc", devkit=False)
    result = run_cli(["shard", str(archives), "--out", str(tmp_path / "out"), "--quiet"])
    assert result.exit_code == 1
    assert "holds a flat validation set without labels: add ILSVRC2012_devkit_t12.tar.gz" in result.output
    assert "--val-labels FILE" in result.output and "Traceback" not in result.output
    labels_given = shard(archives, tmp_path / "with-labels", "--val-labels", str(tree / "val_labels.txt"))
    assert labels_given["splits"]["val"]["count"] == 9


def test_devkit_without_ground_truth(tree, tmp_path):
    archives = make_archives(tree, tmp_path / "ilsvrc", devkit=False)
    with tarfile.open(archives / "ILSVRC2012_devkit_t12.tar.gz", "w:gz") as devkit:
        add_file(devkit, "ILSVRC2012_devkit_t12/data/meta.mat", b"")
    result = run_cli(["shard", str(archives), "--out", str(tmp_path / "out"), "--quiet"])
    assert result.exit_code == 1 and "has no ILSVRC2012_validation_ground_truth.txt" in result.output


@pytest.mark.parametrize("damage", ["truncated", "bad meta.mat"])
def test_damaged_devkit_is_one_line(tree, tmp_path, damage):
    archives = make_archives(tree, tmp_path / "ilsvrc")
    devkit = archives / "ILSVRC2012_devkit_t12.tar.gz"
    if damage == "truncated":
        devkit.write_bytes(devkit.read_bytes()[:300])
    else:
        with tarfile.open(devkit, "w:gz") as archive:
            add_file(archive, "ILSVRC2012_devkit_t12/data/meta.mat", b"not a mat file at all")
            add_file(archive, "ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt", b"1\n")
    result = run_cli(["shard", str(archives), "--out", str(tmp_path / "out"), "--quiet"])
    assert result.exit_code == 1 and "ILSVRC2012_devkit_t12.tar.gz" in result.output, result.output
    assert "Traceback" not in result.output and "Aborted" not in result.output
