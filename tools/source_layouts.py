"""The layouts ``imgprep shard`` reads, built from an extracted tree (``SRC/train/<wnid>/...``,
``SRC/val/...`` with ``val_labels.txt`` when flat) holding the same image bytes: tests compare
each layout's shards with the tree's, and ``tools.bench_shard`` times each against the tree.

Each builder is ``build(tree, root) -> root``, writing only under ``root``.
"""

from __future__ import annotations

import io
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


# ----------------------------------------------------------------------------- parquet (Hugging Face)


# ----------------------------------------------------------------------------- all of them

# name -> builder, for benchmarks and tests that run every layout
BUILDERS = {
    "ILSVRC-2012 archives": ilsvrc_archives,
}
