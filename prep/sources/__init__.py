"""Find the images of a source dataset and their labels, whatever its layout.

Each layout is one module with a ``detect(root) -> bool`` test and a ``scan(root, val_labels)``
that returns a ``Dataset`` without opening an image (``prep.sources.common``). ``scan_source``
tries them in the order of ``LAYOUTS``; a folder that matches none is read as a plain tree,
whose scan says what it expected. A new layout is a module and a line here. At a URL the
layouts that read a bucket are tried (the tars and parquet files in place by range requests,
Hugging Face's gzip'd archives streamed), and an extracted tree is read by ``bucket_tree``.
"""

from __future__ import annotations

import os
from pathlib import Path

from prep.remote import as_url, folder_at, forget_listings, is_url
from prep.sources import hf_archives, hf_parquet, ilsvrc, tree, webdataset
from prep.sources.common import SPLITS, ClassInfo, Dataset, Reject, read_val_labels
from prep.sources.tree import TreeReader, scan_tree

# (name, detect, scan, reads a bucket): the first layout whose detect() holds is read
LAYOUTS = (
    ("ILSVRC-2012 archives", ilsvrc.is_ilsvrc_archive, ilsvrc.scan_archives, True),
    ("Kaggle ILSVRC folder", tree.is_kaggle, tree.scan_kaggle, True),
    ("Hugging Face parquet", hf_parquet.is_hf_parquet, hf_parquet.scan_parquet, True),
    ("webdataset tars", webdataset.is_webdataset, webdataset.scan_webdataset, True),
    ("Hugging Face ImageNet archives", hf_archives.is_hf_archives, hf_archives.scan_hf_archives, True),
)

__all__ = ["SPLITS", "ClassInfo", "Dataset", "Reject", "TreeReader", "read_val_labels", "scan_source", "scan_tree"]


def scan_source(root: str | os.PathLike, val_labels: str | os.PathLike | None = None) -> Dataset:
    """The dataset at ``root`` in whichever layout it has (see ``LAYOUTS``), else a plain tree;
    ``root`` may be a URL (s3://bucket/prefix), whose folder is listed once for all of this."""
    if is_url(root):
        from prep.sources.bucket_tree import scan_bucket_tree

        root = as_url(root)
        forget_listings()  # one listing of the bucket serves the detection and the scan below
        folder_at(root).check_reachable()
        layouts, plain_tree = [layout for layout in LAYOUTS if layout[3]], scan_bucket_tree
    else:
        root, layouts, plain_tree = Path(root).expanduser(), LAYOUTS, scan_tree
    for _, detect, scan, _ in layouts:
        if detect(root):
            return scan(root, val_labels)
    return plain_tree(root, val_labels)
