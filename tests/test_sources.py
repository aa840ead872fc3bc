"""Source layouts, class order, names files, validation labels, and scan-time rejects."""

import os

import pytest

from prep.errors import SourceError
from prep.sources import read_val_labels, scan_tree


def touch(path, data=b"x"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


@pytest.fixture
def tree(tmp_path):
    for wnid in ("n02", "n01", "n03"):  # created out of order: indices must follow sorted names
        touch(tmp_path / "train" / wnid / f"{wnid}_1.JPEG")
        touch(tmp_path / "train" / wnid / f"{wnid}_2.jpg")
    return tmp_path


def test_classes_follow_sorted_folder_names(tree):
    dataset = scan_tree(tree)
    assert [c.wnid for c in dataset.classes] == ["n01", "n02", "n03"]
    assert dict(dataset.splits["train"])["train/n03/n03_2.jpg"] == 2
    assert list(dataset.splits) == ["train"]  # no val/ folder: train only


def test_class_folder_validation(tree):
    touch(tree / "val" / "n03" / "v1.JPEG")
    touch(tree / "val" / "n99" / "v2.JPEG")
    dataset = scan_tree(tree)
    assert dataset.splits["val"] == (("val/n03/v1.JPEG", 2),)
    assert [(r.path, r.reason) for r in dataset.rejects] == [("val/n99/v2.JPEG", "class folder 'n99' is not in train/")]


def test_hidden_folders_are_not_classes(tree):
    # A notebook's checkpoint folder sorts first: as a class it would shift every label by one.
    touch(tree / "train" / ".ipynb_checkpoints" / "n01_1-checkpoint.JPEG")
    touch(tree / "val" / ".ipynb_checkpoints" / "v0.JPEG")
    touch(tree / "val" / "n01" / "v1.JPEG")
    dataset = scan_tree(tree)
    assert [c.wnid for c in dataset.classes] == ["n01", "n02", "n03"]
    assert dict(dataset.splits["train"])["train/n01/n01_1.JPEG"] == 0
    assert dataset.splits["val"] == (("val/n01/v1.JPEG", 0),)
    hidden = "a hidden folder, not a class; its files are not read"
    assert [(r.path, r.reason) for r in dataset.rejects] == [("train/.ipynb_checkpoints", hidden),
                                                             ("val/.ipynb_checkpoints", hidden)]


@pytest.mark.parametrize("contents", ["nothing", "no images", "shards written into it"])
def test_class_folders_without_images_are_refused(tree, contents):
    # As torchvision's ImageFolder: a class with no image would take a label and shift the rest.
    folder = tree / "train" / "n015"
    folder.mkdir()
    if contents == "no images":
        touch(folder / "notes.txt")
    elif contents == "shards written into it":  # imgprep shard --out SRC/train/n015, then a rerun
        touch(folder / "train" / "train-00000.h5")
        touch(folder / "manifest.json")
    with pytest.raises(SourceError, match=r"train has class folders without images \(n015\).*--out outside"):
        scan_tree(tree)


@pytest.mark.parametrize("name,line", [("LOC_synset_mapping.txt", "n02 goldfish, Carassius auratus"),
                                       ("synset_words.txt", "n02 goldfish, Carassius auratus"),
                                       ("words.txt", "n02\tgoldfish, Carassius auratus")])
def test_names_files(tree, name, line):
    (tree / name).write_text(f"n01 tench\n{line}\n")
    names = {c.wnid: c.name for c in scan_tree(tree).classes}
    assert names == {"n01": "tench", "n02": "goldfish, Carassius auratus", "n03": ""}


def test_extensions_are_case_insensitive_and_other_files_rejected(tree):
    touch(tree / "train" / "n01" / "upper.JPG")
    touch(tree / "train" / "n01" / "mixed.Png")
    touch(tree / "train" / "n01" / "notes.txt")
    touch(tree / "train" / "n01" / "Makefile")
    touch(tree / "train" / "loose.JPEG")
    dataset = scan_tree(tree)
    keys = {key for key, _ in dataset.splits["train"]}
    assert {"train/n01/upper.JPG", "train/n01/mixed.Png"} <= keys
    reasons = {r.path: r.reason for r in dataset.rejects}
    assert reasons == {
        "train/n01/notes.txt": "not an image file (extension '.txt')",
        "train/n01/Makefile": "not an image file (no extension)",
        "train/loose.JPEG": "not inside a class folder",
    }


@pytest.mark.parametrize("content", [
    "ILSVRC2012_val_00000001.JPEG n03\nILSVRC2012_val_00000002.JPEG n01\nILSVRC2012_val_00000003.JPEG n77\n",
    "ImageId,PredictionString\nILSVRC2012_val_00000001,n03 10 20 30 40\nILSVRC2012_val_00000002,n01 1 2 3 4\n"
    "ILSVRC2012_val_00000003,n77 1 2 3 4\n",
])
def test_flat_validation_with_labels_file(tree, content):
    for i in (1, 2, 3, 4):
        touch(tree / "val" / f"ILSVRC2012_val_0000000{i}.JPEG")
    (tree / "labels").write_text(content)
    dataset = scan_tree(tree, tree / "labels")
    assert dataset.splits["val"] == (("val/ILSVRC2012_val_00000001.JPEG", 2), ("val/ILSVRC2012_val_00000002.JPEG", 0))
    assert {r.path: r.reason for r in dataset.rejects} == {
        "val/ILSVRC2012_val_00000003.JPEG": "label 'n77' is not a class in train/",
        "val/ILSVRC2012_val_00000004.JPEG": "no label for this file in the validation labels",
    }


def test_read_val_labels_maps_names_with_and_without_extension(tmp_path):
    (tmp_path / "l.txt").write_text("a.JPEG n01\n\n")
    assert read_val_labels(tmp_path / "l.txt") == {"a.JPEG": "n01", "a": "n01"}


@pytest.mark.parametrize("setup,message", [
    (lambda root: None, "does not exist"),
    (lambda root: touch(root / "x.JPEG"), "has no train/ folder"),
    (lambda root: (root / "train").mkdir(parents=True), "has no class folders"),
    (lambda root: touch(root / "train" / "n01" / "a.txt"), "no image files found"),
])
def test_unusable_sources_raise_one_clear_error(tmp_path, setup, message):
    root = tmp_path / "src"
    setup(root)
    with pytest.raises(SourceError, match=message):
        scan_tree(root)


def test_flat_val_without_labels_asks_for_them(tree):
    touch(tree / "val" / "ILSVRC2012_val_00000001.JPEG")
    with pytest.raises(SourceError, match="give --val-labels FILE"):
        scan_tree(tree)


def test_val_labels_without_val_folder(tree):
    (tree / "labels.txt").write_text("a.JPEG n01\n")
    with pytest.raises(SourceError, match="has no val/ folder"):
        scan_tree(tree, tree / "labels.txt")


def test_devices_pipes_and_broken_links_are_rejected_not_read(tree):
    folder = tree / "train" / "n01"
    (folder / "zero.JPEG").symlink_to("/dev/zero")
    os.mkfifo(folder / "pipe.JPEG")
    (folder / "gone.JPEG").symlink_to(folder / "missing.JPEG")
    (folder / "fine.JPEG").symlink_to(folder / "n01_1.JPEG")  # a link to a regular file is fine
    dataset = scan_tree(tree)
    reasons = {r.path: r.reason for r in dataset.rejects}
    for name in ("zero.JPEG", "pipe.JPEG", "gone.JPEG"):
        assert reasons[f"train/n01/{name}"].startswith("not a regular file"), name
    assert ("train/n01/fine.JPEG", 0) in dataset.splits["train"]
