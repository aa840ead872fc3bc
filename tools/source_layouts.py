"""The layouts ``imgprep shard`` reads, built from an extracted tree (``SRC/train/<wnid>/...``,
``SRC/val/...`` with ``val_labels.txt`` when flat) holding the same image bytes: tests compare
each layout's shards with the tree's, and ``tools.bench_shard`` times each against the tree.

Each builder is ``build(tree, root) -> root``, writing only under ``root``.
"""

from __future__ import annotations

import gzip
import io
import json
import tarfile
from pathlib import Path

import numpy as np


def add_file(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    archive.addfile(info, io.BytesIO(data))


def tar_bytes(files: dict) -> bytes:
    """A tar of name -> bytes (a regular file) or name -> TarInfo (a member without data)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for name, data in files.items():
            archive.addfile(data) if isinstance(data, tarfile.TarInfo) else add_file(archive, name, data)
    return buffer.getvalue()


def tree_classes(tree: Path) -> list[str]:
    return sorted(p.name for p in (Path(tree) / "train").iterdir() if p.is_dir())


def val_labels_of(tree: Path) -> dict:
    """Flat val file name -> wnid, from the tree's val_labels.txt."""
    return dict(line.split() for line in (Path(tree) / "val_labels.txt").read_text().splitlines())


# ----------------------------------------------------------------------------- ILSVRC-2012

def write_devkit(path: Path, wnids: list[str], val_wnids: list[str], ids: dict) -> None:
    """A devkit tar.gz whose meta.mat is written by scipy, as the real one is read."""
    import scipy.io

    from tools.fake_imagenet import WNIDS

    synsets = np.zeros(len(wnids) + 2, dtype=[("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"), ("gloss", "O"),
                                              ("num_children", "O"), ("wordnet_height", "O"), ("num_train_images", "O")])
    names = dict(WNIDS)
    for row, wnid in enumerate(wnids):
        synsets[row] = (ids[wnid], wnid, names.get(wnid, wnid), "a gloss", 0, 0, 10)
    synsets[len(wnids)] = (len(wnids) + 1, "n00001740", "entity", "the root", 2, 18, 0)  # not a leaf: ignored
    synsets[len(wnids) + 1] = (len(wnids) + 2, "n00002137", "abstraction", "", 5, 17, 0)
    meta = io.BytesIO()
    scipy.io.savemat(meta, {"synsets": synsets})
    truth = "".join(f"{ids[w]}\n" for w in val_wnids).encode()
    with tarfile.open(path, "w:gz") as devkit:
        add_file(devkit, "ILSVRC2012_devkit_t12/data/meta.mat", meta.getvalue())
        add_file(devkit, "ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt", truth)


def ilsvrc_archives(tree: Path, root: Path, extra_train=None, extra_class=None, devkit=True) -> Path:
    """The ILSVRC archives of ``tree``: a tar of per-class tars, the flat val tar (when the tree
    has a flat val/) and a devkit whose ids run in reverse wnid order (n01440764 is not id 1, so
    a reader that took devkit ids for class indices would be caught). ``extra_train`` adds
    members to the outer tar, ``extra_class`` to the first class's tar."""
    tree, root = Path(tree), Path(root)
    root.mkdir(parents=True, exist_ok=True)
    wnids = tree_classes(tree)
    outer = {}
    for wnid in wnids:
        files = {p.name: p.read_bytes() for p in sorted((tree / "train" / wnid).iterdir())}
        if wnid == wnids[0] and extra_class:
            files.update(extra_class)
        outer[f"{wnid}.tar"] = tar_bytes(files)
    outer.update(extra_train or {})
    (root / "ILSVRC2012_img_train.tar").write_bytes(tar_bytes(outer))
    if (tree / "val_labels.txt").is_file():
        val = sorted((tree / "val").iterdir())
        (root / "ILSVRC2012_img_val.tar").write_bytes(tar_bytes({p.name: p.read_bytes() for p in val}))
        if devkit:
            labels = val_labels_of(tree)
            ids = {w: len(wnids) - i for i, w in enumerate(wnids)}
            write_devkit(root / "ILSVRC2012_devkit_t12.tar.gz", wnids, [labels[p.name] for p in val], ids)
    return root


# ----------------------------------------------------------------------------- tar layouts (webdataset, Hugging Face archives)

def kaggle_folder(tree: Path, root: Path) -> Path:
    """Kaggle's download of ``tree`` (which has a flat val/): the tree under
    ``ILSVRC/Data/CLS-LOC``, ``LOC_val_solution.csv`` (image id, then the wnid and a box, twice)
    and the synset names beside it."""
    import shutil

    tree, root = Path(tree), Path(root)
    for split in ("train", "val"):
        shutil.copytree(tree / split, root / "ILSVRC/Data/CLS-LOC" / split)
    rows = [line.split() for line in (tree / "val_labels.txt").read_text().splitlines()]
    (root / "LOC_val_solution.csv").write_text(
        "ImageId,PredictionString\n" + "".join(f"{n[:-5]},{w} 10 20 200 220 {w} 1 2 3 4\n" for n, w in rows))
    shutil.copy(tree / "LOC_synset_mapping.txt", root / "LOC_synset_mapping.txt")
    return root


def webdataset_tars(tree: Path, root: Path, shards: int = 3, extra=None) -> Path:
    """timm's webdataset layout of ``tree``: samples KEY.jpg + KEY.cls + KEY.json (KEY: the file's
    stem), dealt in turn over ``shards`` training tars, and over two validation tars when the
    tree has a flat val/. A label is the index of its wnid among the tree's sorted classes.
    ``extra`` adds members (name -> bytes or TarInfo) to the first training tar."""
    tree, root = Path(tree), Path(root)
    root.mkdir(parents=True, exist_ok=True)
    wnids = tree_classes(tree)
    train = [(p, label) for label, wnid in enumerate(wnids) for p in sorted((tree / "train" / wnid).iterdir())]
    _write_webdataset(root / "imagenet1k-train-{:04d}.tar", train, shards, extra)
    if (tree / "val_labels.txt").is_file():
        labels = val_labels_of(tree)
        val = [(p, wnids.index(labels[p.name])) for p in sorted((tree / "val").iterdir())]
        _write_webdataset(root / "imagenet1k-validation-{:02d}.tar", val, 2, None)
    return root


def _write_webdataset(pattern: Path, samples: list, shards: int, extra) -> None:
    for shard in range(shards):
        files = {}
        for path, label in samples[shard::shards]:
            kind = path.suffix.lower().lstrip(".").replace("jpeg", "jpg")
            files[f"{path.stem}.{kind}"] = path.read_bytes()
            files[f"{path.stem}.cls"] = str(label).encode()
            files[f"{path.stem}.json"] = json.dumps({"filename": path.name, "label": label}).encode()
        files.update(extra if shard == 0 and extra else {})
        Path(str(pattern).format(shard)).write_bytes(tar_bytes(files))


def hf_archives(tree: Path, root: Path, archives: int = 2, extra=None) -> Path:
    """Hugging Face's ImageNet archives of ``tree``: its training images dealt in turn over
    ``archives`` train_images_N.tar.gz, and val_images.tar.gz when the tree has a flat val/, each
    member named <stem>_<wnid><extension>. ``extra`` adds members to train_images_0.tar.gz."""
    tree, root = Path(tree), Path(root)
    root.mkdir(parents=True, exist_ok=True)
    train = [(p, wnid) for wnid in tree_classes(tree) for p in sorted((tree / "train" / wnid).iterdir())]
    for n in range(archives):
        files = {f"{p.stem}_{wnid}{p.suffix}": p.read_bytes() for p, wnid in train[n::archives]}
        files.update(extra if n == 0 and extra else {})
        (root / f"train_images_{n}.tar.gz").write_bytes(gzip.compress(tar_bytes(files), mtime=0))
    if (tree / "val_labels.txt").is_file():
        labels = val_labels_of(tree)
        files = {f"{p.stem}_{labels[p.name]}{p.suffix}": p.read_bytes() for p in sorted((tree / "val").iterdir())}
        (root / "val_images.tar.gz").write_bytes(gzip.compress(tar_bytes(files), mtime=0))
    return root


# ----------------------------------------------------------------------------- parquet (Hugging Face)

def hf_metadata(names) -> dict:
    """The schema metadata ``datasets`` writes: the features as JSON under "huggingface", here the
    Image feature and a ClassLabel of ``names`` (a plain int64 label when None)."""
    label = {"dtype": "int64", "_type": "Value"} if names is None else {"names": list(names), "_type": "ClassLabel"}
    return {"huggingface": json.dumps({"info": {"features": {"image": {"_type": "Image"}, "label": label}}})}


def write_hf_parquet(path: Path, rows, names, rows_per_group: int) -> None:
    """One parquet file as ``datasets`` writes it. ``rows`` are (image, label): the image a dict of
    ``bytes`` and ``path`` or None, the label an int or None."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    image = pa.struct({"bytes": pa.binary(), "path": pa.string()})  # the Image feature's storage
    table = pa.table({"image": pa.array([row[0] for row in rows], image),
                      "label": pa.array([row[1] for row in rows], pa.int64())})
    # No dictionary for the images: real ones all differ, so pyarrow's would fall back to plain
    # encoding, while a corpus replicated for a benchmark would shrink to its distinct images.
    pq.write_table(table.replace_schema_metadata(hf_metadata(names)), path, row_group_size=rows_per_group,
                   use_dictionary=["label"])


def tree_images(tree: Path, split: str) -> list[tuple[Path, str]]:
    """(file, wnid) of each image of a split of ``tree``, sorted by path."""
    if split == "val" and (tree / "val_labels.txt").is_file():
        labels = val_labels_of(tree)
        return [(p, labels[p.name]) for p in sorted((tree / "val").iterdir())]
    return [(p, p.parent.name) for p in sorted((tree / split).glob("*/*"))]


def hf_parquet(tree: Path, root: Path, rows_per_group: int = 100, files: int = 2, test_rows: int = 0,
               names=None) -> Path:
    """``tree`` as ``datasets`` pushes it to the Hub: ``root/data/{train,validation}-NNNNN-of-NNNNN.parquet``,
    each split's images in the tree's sorted order cut into ``files`` files of row groups of
    ``rows_per_group`` rows (100: what ``datasets`` wrote for images before 4.1). Labels are the tree's class indices, ``names`` the ClassLabel names
    (default: the tree's wnids); image.path is the file name. ``test_rows`` validation images are
    written again with label -1, like ImageNet's unlabelled test split."""
    tree, data = Path(tree), Path(root) / "data"
    data.mkdir(parents=True, exist_ok=True)
    wnids = tree_classes(tree)
    rows = {word: [({"bytes": p.read_bytes(), "path": p.name}, wnids.index(w)) for p, w in tree_images(tree, split)]
            for word, split in (("train", "train"), ("validation", "val")) if (tree / split).is_dir()}
    rows["test"] = [(image, -1) for image, _ in rows.get("validation", [])[:test_rows]]
    for word, split_rows in rows.items():
        count = min(files, len(split_rows))
        for i in range(count):
            part = split_rows[i * len(split_rows) // count : (i + 1) * len(split_rows) // count]
            write_hf_parquet(data / f"{word}-{i:05d}-of-{count:05d}.parquet", part,
                             wnids if names is None else names, rows_per_group)
    return Path(root)



# ----------------------------------------------------------------------------- all of them

# name -> builder, for benchmarks and tests that run every layout
BUILDERS = {
    "ILSVRC-2012 archives": ilsvrc_archives,
    "Hugging Face parquet": hf_parquet,
    "webdataset tars": webdataset_tars,
    "Hugging Face ImageNet archives": hf_archives,
}
