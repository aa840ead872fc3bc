"""ImageNet-1k's 1000 classes, for sources that give labels as integers only (Hugging Face's
parquet and archives, webdataset tars).

Those datasets number the classes 0-999 in the order of the sorted WordNet ids, the order the
ILSVRC-2012 devkit's ``LOC_synset_mapping.txt`` lists them in and the index our trees get. The
list ships with the package (``imagenet1k_wnids.txt``, one wnid a line, sorted), so a source
with exactly 1000 integer classes gets the real wnids in its manifest.
"""

from __future__ import annotations

from importlib import resources

from prep.errors import SourceError
from prep.sources.common import MAX_CLASSES, ClassInfo

CLASSES = 1000


def imagenet1k_wnids() -> tuple[str, ...]:
    """The 1000 wnids by class index: index 0 = n01440764 (tench), 999 = n15075141."""
    text = resources.files("prep.sources").joinpath("imagenet1k_wnids.txt").read_text(encoding="ascii")
    return tuple(text.split())


def numbered_classes(ids: list[str], names: dict[str, str], where) -> tuple[ClassInfo, ...]:
    """Classes of a source that numbers them itself (its labels are the class indices): ``ids[i]``
    names class i (a ClassLabel name, or the index as text), ``names`` maps a wnid or id to a
    name (a synset file). Exactly 1000 classes are taken to be ImageNet-1k's: their wnids
    replace the ids, and an id other than its index's text becomes the class's name."""
    if len(ids) > MAX_CLASSES:
        raise SourceError(f"{where} has {len(ids)} classes; at most {MAX_CLASSES} fit int16 labels")
    if len(ids) == CLASSES:
        return tuple(ClassInfo(i, wnid, names.get(wnid) or ("" if ids[i] == str(i) else ids[i]))
                     for i, wnid in enumerate(imagenet1k_wnids()))
    return tuple(ClassInfo(i, id_, names.get(id_, "")) for i, id_ in enumerate(ids))
