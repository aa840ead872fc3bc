"""Find the images of a source dataset and their labels, whatever its layout.

Each layout is one module with a ``detect(root) -> bool`` test and a ``scan(root, val_labels)``
that returns a ``Dataset`` without opening an image (``prep.sources.common``). ``scan_source``
tries them in the order of ``LAYOUTS``; a folder that matches none is read as a plain tree,
whose scan says what it expected. A new layout is a module and a line here. At a URL the
parquet and webdataset layouts are read by range requests and a tree by ``bucket_tree``; the
ILSVRC and Hugging Face tar.gz archives are read from disk only, for now.
"""

from __future__ import annotations

import os
from pathlib import Path

from prep.remote import as_url, folder_at, forget_listings, is_url
from prep.sources import hf_archives, hf_parquet, ilsvrc, tree, webdataset
from prep.sources.common import SPLITS, ClassInfo, Dataset, Reject, read_val_labels
from prep.sources.tree import TreeReader, scan_tree

# (name, detect, scan): the first layout whose detect() holds is read
LAYOUTS = (
    ("ILSVRC-2012 archives", ilsvrc.is_ilsvrc_archive, ilsvrc.scan_archives),
    ("Kaggle ILSVRC folder", tree.is_kaggle, tree.scan_kaggle),
    ("Hugging Face parquet", hf_parquet.is_hf_parquet, hf_parquet.scan_parquet),
    ("webdataset tars", webdataset.is_webdataset, webdataset.scan_webdataset),
    ("Hugging Face ImageNet archives", hf_archives.is_hf_archives, hf_archives.scan_hf_archives),
)

__all__ = ["SPLITS", "ClassInfo", "Dataset", "Reject", "TreeReader", "read_val_labels", "scan_source", "scan_tree"]


def scan_source(root: str | os.PathLike, val_labels: str | os.PathLike | None = None) -> Dataset:
    """The dataset at ``root`` in whichever layout it has (see ``LAYOUTS``), else a plain tree;
    at a URL (s3://bucket/prefix): Hugging Face parquet files, else an extracted tree."""
    if is_url(root):
        from prep.sources.bucket_tree import scan_bucket_tree

        url = as_url(root)
        forget_listings()  # one listing of the bucket serves the detection and the scan below
        folder_at(url).check_reachable()
        if hf_parquet.is_hf_parquet(url):
            return hf_parquet.scan_parquet(url, val_labels)
        if webdataset.is_webdataset(url):
            return webdataset.scan_webdataset(url, val_labels)
        return scan_bucket_tree(url, val_labels)
    root = Path(root).expanduser()
    for _, detect, scan in LAYOUTS:
        if detect(root):
            return scan(root, val_labels)
    return scan_tree(root, val_labels)
