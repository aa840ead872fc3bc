"""An extracted ImageNet tree in object storage: ``imgprep shard s3://bucket/imagenet``.

    URL/train/<wnid>/*.JPEG   URL/val/<wnid>/*.JPEG  (or a flat URL/val/* with --val-labels)
    URL/LOC_synset_mapping.txt (or synset_words.txt, words.txt): class names, optional

The scan is one listing of every object under the URL; no image is read. It finds what the
scan of the same tree on disk finds (``prep.sources.tree``): the same keys, labels and rejects
for what a bucket can hold (a bucket has no links, devices or empty folders, and its keys are
UTF-8), so the shards are byte-identical to those made from the files on disk. Workers read
each image with one request, its size known from the listing; an object gone since the scan is
a reject, a failed request an error that may pass (retried, then a reject; many in a row stop
the job, as a lost mount does).
"""

from __future__ import annotations

from collections import defaultdict

from prep.errors import BadImage, SourceError
from prep.remote import Remote, folder_at, image_bytes
from prep.sources.common import (Dataset, class_items, ReadsImagesAlone, Reject, file_too_large, is_image_name,
                                 label_flat_files, make_classes, not_an_image, read_class_names, read_val_labels)


class BucketTreeReader(ReadsImagesAlone):
    """Reads one image object of a tree in a bucket; picklable (each process opens its own client)."""

    def __init__(self, url: str, sizes: dict[str, int]):
        self.remote, self.sizes = Remote(url), sizes

    def read(self, key: str, max_bytes: int) -> bytes:
        size = self.sizes[key]
        if size > max_bytes:  # refused before a byte of it is fetched
            raise BadImage(file_too_large(size, max_bytes))
        if size == 0:  # S3 refuses a range of an empty object; the decoder says what is wrong
            return b""
        data = image_bytes(self.remote, key, 0, max_bytes + 1)
        if len(data) > max_bytes:  # replaced by a larger object since the scan
            raise BadImage(f"file too large: it grew past the cap of {max_bytes:,} bytes since the scan")
        return data


def scan_bucket_tree(url: str, val_labels=None, names_root: str | None = None) -> Dataset:
    """The tree at ``url``, listed once; SourceError when the layout is unusable. ``names_root``:
    where the synset-names file is, when not at ``url`` (Kaggle's layout)."""
    remote = folder_at(url)  # its listing is the one layout detection made (prep.sources.scan_source)
    sizes = remote.listed()
    if not any(name.startswith("train/") for name in sizes):
        raise SourceError(f"{url} has no train/ folder (expected {url}/train/<class>/<images>)")
    rejects: list[Reject] = []
    train = _class_folders(sizes, "train", rejects)
    if not train:
        raise SourceError(f"{url}/train has no class folders (expected {url}/train/<class>/<images>)")
    classes = make_classes(sorted(train), read_class_names(names_root or url), f"{url}/train")
    index = {c.wnid: c.index for c in classes}
    splits = {"train": _labelled(train, "train", index, rejects)}
    used = {label for _, label in splits["train"]}
    empty = [c.wnid for c in classes if c.index not in used]
    if splits["train"] and empty:
        raise SourceError(f"{url}/train has class folders without images ({', '.join(empty[:3])}): each would still "
                          "take a label and shift those after it; remove them or add their images")
    in_val = sorted(name for name in sizes if name.startswith("val/"))
    if val_labels is not None and not in_val:
        raise SourceError(f"--val-labels was given but {url} has no val/ folder")
    if in_val:
        if val_labels is not None:
            labels = read_val_labels(val_labels)
            found = {}
            for key in in_val:
                if is_image_name(key):
                    found[key] = labels.lookup(key.split("/", 1)[1])
                else:
                    rejects.append(Reject("val", key, not_an_image(key)))
            splits["val"] = label_flat_files("val", found, classes, rejects, "the validation labels", "in train/")
        elif any(name.count("/") >= 2 for name in in_val):
            splits["val"] = _labelled(_class_folders(sizes, "val", rejects), "val", index, rejects)
        elif any(is_image_name(name) for name in in_val):
            raise SourceError(f"{url}/val holds images but no class folders: give --val-labels FILE "
                              "(lines 'filename wnid', or a CSV with those two columns)")
    if not any(splits.values()):
        raise SourceError(f"no image files found under {url}")
    kept = {key for items in splits.values() for key, _ in items}
    return Dataset(url, classes, splits, tuple(rejects), BucketTreeReader(url, {k: sizes[k] for k in kept}))


def _class_folders(sizes: dict[str, int], split: str, rejects: list[Reject]) -> dict[str, list[str]]:
    """Class name -> the keys below its folder, sorted, for the folders of ``split``/; objects
    directly in it, and hidden folders (.ipynb_checkpoints), are rejects, as on disk."""
    folders, hidden = defaultdict(list), set()
    for name in sorted(sizes):
        if not name.startswith(split + "/"):
            continue
        parts = name.split("/")
        if len(parts) == 2:
            rejects.append(Reject(split, name, "not inside a class folder"))
        elif parts[1].startswith("."):
            hidden.add(parts[1])
        else:
            folders[parts[1]].append(name)
    rejects += [Reject(split, f"{split}/{folder}", "a hidden folder, not a class; its files are not read")
                for folder in sorted(hidden)]
    return dict(folders)


def _labelled(folders: dict[str, list[str]], split: str, index: dict[str, int], rejects: list[Reject]):
    """(key, label) of the image keys of ``folders``; the other keys become rejects."""
    items = []
    for name, keys in sorted(folders.items()):
        items += class_items(split, name, keys, index.get(name), rejects)
    return tuple(items)
