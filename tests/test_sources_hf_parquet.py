"""Sharding Hugging Face parquet datasets: the same images as the tree they were written from,
classes from the ClassLabel, bad rows as rejects, and a plan that reads each row group once."""

import hashlib
import json
import os
import pickle
import shutil
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from helpers import run_cli, shard_hashes
from prep.sources import scan_source, scan_tree
from prep.sources.hf_parquet import ParquetReader, is_hf_parquet
from tools.fake_imagenet import WNIDS
from tools.source_layouts import hf_parquet, tree_images, write_hf_parquet

TRAIN_FILE = "data/train-00000-of-00001.parquet"


@pytest.fixture(scope="module")
def tree(flat_tree):
    return flat_tree


@pytest.fixture(scope="module")
def parquet(tree, tmp_path_factory):
    """The tree as parquet: 3 files a split, row groups of 4 rows, and 3 unlabelled test rows."""
    return hf_parquet(tree, tmp_path_factory.mktemp("hf") / "src", rows_per_group=4, files=3, test_rows=3)


@pytest.fixture(scope="module")
def parquet_shards(parquet, tmp_path_factory):
    """(output folder, what the command printed) of the parquet sharded by 2 workers."""
    out = tmp_path_factory.mktemp("parquet-shards") / "out"
    return out, shard(parquet, out, "--workers", "2")


def shard(source, out, *extra) -> str:
    result = run_cli(["shard", str(source), "--out", str(out), "--shard-size", "5", "--quiet", *extra])
    assert result.exit_code == 0, result.output
    return result.output


def images_by_name(out: Path, name_of) -> dict:
    """(split, source file name) -> (label, pixels) of every image in a shard folder."""
    from prep.shards import open_shards

    shards, found = open_shards(out), {}
    for split in shards.splits:
        reader = shards.split(split)
        for i in range(len(reader)):
            pixels, label = reader[i]
            found[(split, name_of(reader.key(i)))] = (label, pixels)
    return found


def image_paths(root: Path) -> dict:
    """Parquet key (file/row) -> the row's image.path, read back from the files."""
    paths = {}
    for file in sorted(root.glob("data/*.parquet")):
        column = pq.ParquetFile(file).read(columns=["image.path"]).column("image").flatten()[0].to_pylist()
        paths.update({f"data/{file.name}/{row:08d}": path for row, path in enumerate(column)})
    return paths


def rejects_of(out: Path) -> dict:
    return {r["path"]: r["reason"] for r in map(json.loads, (out / "rejects.jsonl").read_text().splitlines())}


@pytest.mark.timeout(300)
def test_parquet_gives_the_same_images_and_labels_as_the_tree(tree, parquet, parquet_shards, tmp_path):
    out, _ = parquet_shards
    shard(tree, tmp_path / "from-tree", "--val-labels", str(tree / "val_labels.txt"))
    from_tree = images_by_name(tmp_path / "from-tree", lambda key: key.rsplit("/", 1)[1])
    from_parquet = images_by_name(out, image_paths(parquet).__getitem__)
    assert from_parquet.keys() == from_tree.keys() and len(from_tree) == 27
    for name, (label, pixels) in from_tree.items():
        assert from_parquet[name][0] == label, name
        assert (from_parquet[name][1] == pixels).all(), name
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["classes"] == [{"index": i, "wnid": w, "name": ""} for i, (w, _) in enumerate(WNIDS[:3])]


@pytest.mark.timeout(300)
def test_unlabelled_test_rows_are_skipped_and_counted(parquet_shards):
    out, printed = parquet_shards
    assert printed.count("skipped 3 test rows: unlabelled (label -1)") == 1
    manifest = json.loads((out / "manifest.json").read_text())
    assert list(manifest["splits"]) == ["train", "val"] and manifest["rejected"] == 0


@pytest.mark.timeout(300)
def test_same_shards_with_one_or_two_workers_and_on_rerun(parquet, parquet_shards, tmp_path):
    out, _ = parquet_shards
    shard(parquet, tmp_path / "one", "--workers", "1")
    shard(parquet, tmp_path / "again", "--workers", "2")
    assert shard_hashes(tmp_path / "one") == shard_hashes(out) == shard_hashes(tmp_path / "again")
    assert len(shard_hashes(out)) == 6


@pytest.mark.timeout(300)
def test_imagenet_1k_classlabel_gets_the_real_wnids(tree, tmp_path):
    names = [name for _, name in WNIDS] + [f"class {i}" for i in range(len(WNIDS), 1000)]
    images = [{"bytes": path.read_bytes(), "path": path.name} for path, _ in tree_images(tree, "train")[:3]]
    (tmp_path / "src/data").mkdir(parents=True)
    write_hf_parquet(tmp_path / "src" / TRAIN_FILE, list(zip(images, [0, 1, 999])), names, rows_per_group=2)
    shard(tmp_path / "src", tmp_path / "out")
    classes = json.loads((tmp_path / "out/manifest.json").read_text())["classes"]
    assert len(classes) == 1000
    assert classes[0] == {"index": 0, "wnid": "n01440764", "name": "tench, Tinca tinca"}
    assert classes[999] == {"index": 999, "wnid": "n15075141", "name": "class 999"}
    from prep.shards import open_shards

    assert sorted(open_shards(tmp_path / "out").split("train").labels.tolist()) == [0, 1, 999]


def test_plain_integer_labels_name_classes_by_index(tmp_path):
    (tmp_path / "data").mkdir()
    write_hf_parquet(tmp_path / TRAIN_FILE, [({"bytes": b"x", "path": "a"}, 2), ({"bytes": b"x", "path": "b"}, 0)],
                     None, rows_per_group=1)
    dataset = scan_source(tmp_path)
    assert [(c.index, c.wnid, c.name) for c in dataset.classes] == [(0, "0", ""), (1, "1", ""), (2, "2", "")]
    assert dataset.splits["train"] == ((f"{TRAIN_FILE}/00000000", 2), (f"{TRAIN_FILE}/00000001", 0))


@pytest.mark.timeout(30)
def test_labels_and_class_counts_past_the_class_limit_cost_nothing(tmp_path):
    # One row labelled 2**40 is a reject, not a list of 2**40 class names; a ClassLabel declaring
    # 10**10 classes is one line, before any list of its names is made.
    from prep.errors import SourceError

    (tmp_path / "data").mkdir()
    rows = [({"bytes": b"x", "path": "a"}, 2**40), ({"bytes": b"x", "path": "b"}, 1)]
    write_hf_parquet(tmp_path / TRAIN_FILE, rows, None, rows_per_group=1)
    dataset = scan_source(tmp_path)
    assert [c.wnid for c in dataset.classes] == ["0", "1"]
    assert [(r.path, r.reason) for r in dataset.rejects] == [(f"{TRAIN_FILE}/00000000", f"label {2**40} is not a class (0-1)")]
    table = pq.read_table(tmp_path / TRAIN_FILE)
    label = {"num_classes": 10**10, "_type": "ClassLabel"}
    metadata = {"huggingface": json.dumps({"info": {"features": {"image": {"_type": "Image"}, "label": label}}})}
    pq.write_table(table.replace_schema_metadata(metadata), tmp_path / TRAIN_FILE)
    with pytest.raises(SourceError, match="declares 10,000,000,000 classes; at most 32,767"):
        scan_source(tmp_path)


@pytest.mark.timeout(300)
def test_bad_rows_become_rejects_with_reasons(tree, tmp_path):
    good = tree_images(tree, "train")[0][0].read_bytes()
    rows = [({"bytes": good, "path": "good.JPEG"}, 0), ({"bytes": good, "path": "a"}, None),
            ({"bytes": good, "path": "b"}, 7), ({"bytes": good, "path": "c"}, -1),
            ({"bytes": b"not an image at all", "path": "d"}, 1), ({"bytes": None, "path": "e.JPEG"}, 1),
            (None, 2), ({"bytes": b"\xff" * 3_000_000, "path": "f"}, 2)]
    (tmp_path / "src/data").mkdir(parents=True)
    write_hf_parquet(tmp_path / "src" / TRAIN_FILE, rows, ["n01", "n02", "n03"], rows_per_group=3)
    out = tmp_path / "out"
    shard(tmp_path / "src", out, "--max-pixels", "400000")  # caps files at 4 x 400,000 + 1 MiB = 2.6 MB
    reasons = {key.rsplit("/", 1)[1]: reason for key, reason in rejects_of(out).items()}
    assert reasons.pop("00000001") == "no label (null)"
    assert reasons.pop("00000002") == "label 7 is not a class (0-2)"
    assert reasons.pop("00000003") == "unlabelled (label -1)"
    assert reasons.pop("00000005") == reasons.pop("00000006") == "no image bytes in this row (null)"
    assert reasons.pop("00000007").startswith(f"image too large: row 00000007 of {TRAIN_FILE} holds 3,000,000 bytes")
    assert list(reasons) == ["00000004"] and "unexpected" not in reasons["00000004"]
    assert json.loads((out / "manifest.json").read_text())["splits"]["train"]["count"] == 1


class CountingReader(ParquetReader):
    """A parquet reader that records each row group it loads."""

    def __init__(self, root, groups):
        super().__init__(root, groups)
        self.loads = []

    def _load(self, file, group):
        self.loads.append(f"{file}#{group}")
        return super()._load(file, group)


def test_plan_reads_each_row_group_in_at_most_two_tasks(parquet, tmp_path):
    from prep.build import JOURNAL, build_shard
    from prep.plan import ShardOptions, item_order, make_plan

    dataset = scan_source(parquet)
    options = ShardOptions(shard_size=5)
    (tmp_path / JOURNAL).mkdir()
    readers = []
    for task in make_plan(dataset, options):
        readers.append(CountingReader(dataset.reader.root, dataset.reader.groups))  # a fresh worker each task
        assert build_shard(task, readers[-1], tmp_path, options)["count"] == len(task.items)
        assert sorted(readers[-1].loads) == sorted({dataset.reader.unit(key) for key, _ in task.items})
    tasks_of_unit = Counter(unit for reader in readers for unit in reader.loads)
    assert len(tasks_of_unit) == 9 and max(tasks_of_unit.values()) <= 2
    # The order of keys alone, even in one worker, reads each row group more than twice on average.
    by_key = CountingReader(dataset.reader.root, dataset.reader.groups)
    for key, _ in sorted(dataset.splits["train"], key=item_order(options.seed)):
        by_key.read(key, 1 << 30)
    assert len(by_key.loads) > 2 * len(set(by_key.loads)) == 2 * 6


def test_plans_of_readers_without_units_are_unchanged(tree):
    from prep.plan import ShardOptions, make_plan

    dataset = scan_tree(tree, tree / "val_labels.txt")
    expected = []
    for split, items in dataset.splits.items():  # the formula of prep.plan, written out again
        ordered = sorted(items, key=lambda item: hashlib.blake2b(f"7\0{item[0]}".encode(), digest_size=16).digest())
        expected += [(split, ordered[start : start + 5]) for start in range(0, len(ordered), 5)]
    assert [(t.split, list(t.items)) for t in make_plan(dataset, ShardOptions(shard_size=5, seed=7))] == expected


def test_reader_pickles_without_what_it_holds(parquet):
    dataset = scan_source(parquet)
    reader, key = dataset.reader, dataset.splits["train"][0][0]
    before = len(pickle.dumps(reader))
    reader.read(key, 1 << 30)
    copy = pickle.loads(pickle.dumps(reader))
    assert len(pickle.dumps(reader)) == before and copy._held is None
    assert copy.read(key, 1 << 30) == reader.read(key, 1 << 30)


def test_a_damaged_file_is_one_line_naming_it(parquet, tmp_path):
    source = shutil.copytree(parquet, tmp_path / "src")
    damaged = source / "data/train-00001-of-00003.parquet"
    damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])
    result = run_cli(["shard", str(source), "--out", str(tmp_path / "out"), "--quiet"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and f"{damaged} is not a readable parquet file" in errors[0], result.output


def test_a_missing_file_is_an_interrupted_download(parquet, tmp_path):
    source = shutil.copytree(parquet, tmp_path / "src")
    os.remove(source / "data/train-00001-of-00003.parquet")
    result = run_cli(["shard", str(source), "--out", str(tmp_path / "out"), "--quiet"])
    assert result.exit_code == 1
    assert "has 2 train files where their names say 3 (train-00001-of-00003): an interrupted download?" in result.output


def test_detection_cannot_take_a_tree_for_parquet(tree, parquet, tmp_path):
    assert is_hf_parquet(parquet) and is_hf_parquet(parquet / "data")
    assert not is_hf_parquet(tree)
    shutil.copytree(tree, tmp_path / "tree")
    shutil.copytree(parquet / "data", tmp_path / "tree/data")  # parquet files beside train/: still a tree
    assert not is_hf_parquet(tmp_path / "tree")
