"""ImageNet-1k's 1000 classes, for sources that give labels as integers only (Hugging Face's
parquet and archives, webdataset tars).

Those datasets number the classes 0-999 in the order of the sorted WordNet ids, the order the
ILSVRC-2012 devkit's ``LOC_synset_mapping.txt`` lists them in and the index our trees get. The
list ships with the package (``imagenet1k_wnids.txt``, one wnid a line, sorted), so a source
with exactly 1000 integer classes gets the real wnids in its manifest.
"""

from __future__ import annotations

from importlib import resources

CLASSES = 1000


def imagenet1k_wnids() -> tuple[str, ...]:
    """The 1000 wnids by class index: index 0 = n01440764 (tench), 999 = n15075141."""
    text = resources.files("prep.sources").joinpath("imagenet1k_wnids.txt").read_text(encoding="ascii")
    return tuple(text.split())
