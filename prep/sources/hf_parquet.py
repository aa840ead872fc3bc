"""Hugging Face parquet datasets, as ``datasets`` writes them and as the Hub serves ImageNet-1k:
read in place, one row group at a time; nothing is extracted or copied.

    SRC/data/train-00000-of-00294.parquet ...        (or the same files directly in SRC)
    SRC/data/validation-00000-of-00028.parquet ...   becomes the val split
    SRC/data/test-00000-of-00055.parquet ...         not sharded: ImageNet's test labels are all -1

File names are ``{split}-{index:05d}-of-{count:05d}.parquet``; datasets 2.3-2.14 put
``-{fingerprint}`` before ``.parquet``. A split must have all ``count`` of its files: a partial
download is an error, not a smaller dataset. Each row holds ``image``, the Image feature (a
struct of ``bytes`` and ``path``), and an integer ``label``.

Classes come from the ``huggingface`` key of the Arrow schema metadata, the JSON object
``{"info": {"features": {..., "label": {"names": [...], "_type": "ClassLabel"}}}}``. The class
index is the dataset's own label. With 1000 classes the dataset is taken to be ImageNet-1k,
whose labels follow the sorted wnids (our index too): the manifest gets the real wnids
(``imagenet1k_wnids()``) with the ClassLabel names as names. Otherwise the wnid is the ClassLabel
name, or the index as text for a plain integer label.

Keys are ``<file relative to SRC>/<row number in the file, 8 digits>``, for example
``data/train-00000-of-00294.parquet/00004211``: unique, sorted in file order, and enough to
find the row again. A scan reads the footers and the label column only. Rows without a usable
label are rejects then; rows whose image bytes are missing or undecodable become rejects when a
worker reads them.

SRC may be a URL (``s3://bucket/imagenet-1k``, the same files in a bucket): the scan lists the
folder once and reads footers and label columns by range requests of SCAN_BLOCK bytes, a worker
reads its row group's image column the same way in blocks of READ_BLOCK; nothing is downloaded
whole, and the shards are those of the same files on disk.
"""

from __future__ import annotations

import bisect
import errno
import itertools
import json
import os
import re
from pathlib import Path
from typing import NamedTuple

from prep.errors import BadImage, SourceError
from prep.remote import folder_at, is_url
from prep.sources.common import MAX_CLASSES, ClassInfo, Dataset, Reject
from prep.sources.imagenet1k import numbered_classes

FILE_NAME = re.compile(r"(train|validation|test)-(\d{5,})-of-(\d{5,})(-[0-9a-f]+)?\.parquet")
SPLIT_OF = {"train": "train", "validation": "val", "test": "test"}  # file name -> our split
IMAGE_BYTES = "image.bytes"  # the one column a worker reads: labels and paths stay on disk
UNLABELLED = -1  # datasets' mark for an unknown label (every row of ImageNet's test split)
SCAN_BLOCK = 1 << 18  # bytes a range request of the scan reads: a footer, a label column chunk
READ_BLOCK = 1 << 22  # bytes a range request of a worker reads: a row group's images come in a few


class Place:
    """Where the parquet files are: a folder, or a URL read by range requests. Picklable (a
    path or URL; a URL's client is made in each process)."""

    def __init__(self, root: str):
        self.root = root
        self.remote = folder_at(root) if is_url(root) else None

    def __str__(self) -> str:
        return self.root

    def path(self, rel: str) -> str:
        """File ``rel`` as messages name it (and as pyarrow opens a local one)."""
        return f"{self.root}/{rel}" if self.remote else os.path.join(self.root, rel)

    def names(self, folder: str) -> list[str] | None:
        """The names directly in ``folder`` ('' the root), sorted; None if there is no such folder."""
        if self.remote is None:
            try:
                return sorted(entry.name for entry in os.scandir(os.path.join(self.root, folder)))
            except OSError:  # not a folder, or unreadable: the tree's scan says so
                return None
        prefix = f"{folder}/" if folder else ""
        found = sorted(name[len(prefix):] for name in self._listing() if name.startswith(prefix)
                       and "/" not in name[len(prefix):])
        return found or None

    def is_file(self, rel: str) -> bool:
        return rel in self._listing() if self.remote else os.path.isfile(os.path.join(self.root, rel))

    def _listing(self) -> dict[str, int]:
        return self.remote.listed()  # one listing of the whole folder, shared by the scan

    def open(self, rel: str, block: int):
        """What pq.ParquetFile reads ``rel`` from: the path, or a file of range requests."""
        if self.remote is None:
            return self.path(rel)
        return self.remote.fs.open(self.path(rel), "rb", block_size=block, cache_type="readahead")


class ParquetReader:
    """Reads one image by its key; holds the image bytes of the last row group it read.

    ``groups`` maps each file (relative to ``root``) to the row numbers its row groups start at,
    followed by its row count. The plan hands a worker the images of one row group together
    (``unit``, see ``prep.plan``), so each row group is read once per task; holding one at a
    time bounds a worker's memory by one row group's image column (``datasets`` writes groups of
    100 images, or of about 100 MB since 4.1). Picklable: the held row group is not part of the state, so no
    open file and no image bytes travel to a worker.
    """

    def __init__(self, root: str, groups: dict):
        self.root, self.groups = root, groups
        self.place = Place(root)
        self._held = None  # ((file, group), its image bytes column, or why it cannot be read)

    def __getstate__(self):
        return {"root": self.root, "groups": self.groups}

    def __setstate__(self, state):
        self.__init__(**state)

    def unit(self, key: str) -> str:
        """The row group holding ``key``: the plan keeps the images of one unit together."""
        file, group, _ = self._locate(key)
        return f"{file}#{group}"

    def prepare(self, journal: Path, workers: int, progress: bool) -> None:
        return None  # row groups are read in place

    def read(self, key: str, max_bytes: int) -> bytes:
        file, group, offset = self._locate(key)
        value = self._row_group(file, group)[offset]
        if not value.is_valid:
            raise BadImage("no image bytes in this row (null)")
        data = value.as_buffer()  # no copy yet: an oversized image is refused before it is copied
        if data.size > max_bytes:
            raise BadImage(f"image too large: row {key.rsplit('/', 1)[1]} of {file} holds {data.size:,} bytes, "
                           f"over the cap of {max_bytes:,}")
        return data.to_pybytes()

    def _locate(self, key: str) -> tuple[str, int, int]:
        """(file, row group, row within the group) of a key our scan made."""
        file, row = key.rsplit("/", 1)
        starts = self.groups[file]
        group = bisect.bisect_right(starts, int(row)) - 1
        return file, group, int(row) - starts[group]

    def _row_group(self, file: str, group: int):
        if self._held is None or self._held[0] != (file, group):
            self._held = ((file, group), self._load(file, group))
        images = self._held[1]
        if isinstance(images, str):  # a damaged row group: each of its rows is a reject, read once
            raise BadImage(images)
        return images

    def _load(self, file: str, group: int):
        """The image bytes of one row group, or the reason they cannot be read.

        An error that names a system call (EIO, ENOENT...) is raised for ``prep.build`` to judge,
        and so is a file changed since the scan (the plan no longer describes it); pyarrow's
        complaints about the bytes themselves make the group's rows rejects.
        """
        import pyarrow
        import pyarrow.parquet as pq

        starts = self.groups[file]
        where = f"row group {group} of {file}"
        try:
            with pq.ParquetFile(self.place.open(file, READ_BLOCK)) as parquet:
                metadata = parquet.metadata
                if (metadata.num_row_groups != len(starts) - 1
                        or metadata.row_group(group).num_rows != starts[group + 1] - starts[group]):
                    raise OSError(errno.ESTALE, f"{file} has changed since the scan")
                # one process per core already: threads would only fight
                table = parquet.read_row_group(group, columns=[IMAGE_BYTES], use_threads=False)
        except OSError as error:
            if error.errno is not None:
                raise
            return f"{where} cannot be read: {_first_line(error)}"
        except pyarrow.ArrowException as error:
            return f"{where} cannot be read: {_first_line(error)}"
        return table.column("image").flatten()[0]  # flatten: a null image struct gives null bytes


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


# ----------------------------------------------------------------------------- scan


def is_hf_parquet(root) -> bool:
    """Split files named as ``datasets`` names them, and no train/ folder: an ordinary tree has
    a train/ folder and no train-00000-of-00001.parquet. ``root``: a folder, or a URL."""
    place = Place(str(root))
    return place.names("train") is None and _parquet_folder(place) is not None


def _parquet_folder(place: Place) -> str | None:
    """"data" (SRC/data) when it holds split files, else "" (SRC) when it does, else None."""
    for folder in ("data", ""):
        names = place.names(folder) or []
        if any(FILE_NAME.fullmatch(name) and place.is_file(f"{folder}/{name}".lstrip("/")) for name in names):
            return folder
    return None


def scan_parquet(root, val_labels=None) -> Dataset:
    """``root``: a folder, or a URL."""
    root = str(root) if is_url(str(root)) else str(Path(root).expanduser().resolve())
    place = Place(root)
    if val_labels is not None:
        raise SourceError(f"--val-labels does not apply to {root}: its parquet files hold their own labels")
    rejects: list[Reject] = []
    files = _split_files(place, _parquet_folder(place), rejects)
    scans = {rel: _scan_file(place, rel) for rels in files.values() for rel in rels}
    labelled = {split: rels for split, rels in files.items() if split != "test"}
    classes = _classes(scans, labelled, root)
    if "test" in files:
        _say_skipped_test([label for rel in files["test"] for label in scans[rel].labels])
    splits = {split: _label_rows(split, rels, scans, len(classes), rejects) for split, rels in labelled.items()}
    if not any(splits.values()):
        raise SourceError(f"{root} has no train or validation rows with a usable label")
    groups = {rel: scans[rel].starts for rels in labelled.values() for rel in rels}
    return Dataset(root, classes, splits, tuple(rejects), ParquetReader(root, groups))


def _split_files(place: Place, folder: str, rejects: list[Reject]) -> dict[str, list[str]]:
    """Split -> its files relative to ``root`` in index order; each split must be complete.

    Other ``.parquet`` files in the folder are rejects (never read): skipping a file of images
    without a word would make a smaller dataset nobody asked for.
    """
    named: dict[str, dict[int, list[str]]] = {}  # split word of the names -> index -> files
    counts: dict[str, set[int]] = {}
    for name in place.names(folder):
        rel = f"{folder}/{name}" if folder else name
        match = FILE_NAME.fullmatch(name)
        if match:
            named.setdefault(match[1], {}).setdefault(int(match[2]), []).append(rel)
            counts.setdefault(match[1], set()).add(int(match[3]))
        elif name.endswith(".parquet"):
            rejects.append(Reject("train", rel, "not a split file (train-00000-of-00001.parquet ...); not read"))
    where = place.path(folder) if folder else str(place)
    return {SPLIT_OF[word]: _complete_split(where, word, indices, counts[word]) for word, indices in named.items()}


def _complete_split(folder: str, word: str, indices: dict[int, list[str]], counts: set[int]) -> list[str]:
    """The files of one split in index order, when it has each of its -of-NNNNN files exactly once."""
    if len(counts) > 1:
        sets = " and ".join(f"-of-{c:05d}" for c in sorted(counts))
        raise SourceError(f"{folder} mixes two sets of {word} files ({sets}): remove the older download")
    count = counts.pop()
    for index, files in sorted(indices.items()):
        if len(files) > 1:
            raise SourceError(f"{folder} holds two {word} files numbered {index:05d}: {' and '.join(files)}")
    missing = [f"{word}-{i:05d}-of-{count:05d}" for i in range(count) if i not in indices]
    if missing or len(indices) != count:
        listed = ", ".join(missing[:3]) + (" ..." if len(missing) > 3 else "") if missing else "an index past the count"
        raise SourceError(f"{folder} has {len(indices)} {word} files where their names say {count} "
                          f"({listed}): an interrupted download?")
    return [indices[i][0] for i in range(count)]


class FileScan(NamedTuple):
    """What the scan learns of one file from its footer and its label column."""

    starts: tuple[int, ...]  # the row number each row group starts at, then the file's row count
    labels: list  # each row's label, None where null
    names: tuple[str, ...] | None  # the ClassLabel names; None for a plain integer label


def _scan_file(place: Place, rel: str) -> FileScan:
    import pyarrow
    import pyarrow.parquet as pq

    path = place.path(rel)
    try:
        with pq.ParquetFile(place.open(rel, SCAN_BLOCK)) as parquet:
            schema = parquet.schema_arrow
            _check_columns(schema, path)
            sizes = [parquet.metadata.row_group(g).num_rows for g in range(parquet.metadata.num_row_groups)]
            labels = parquet.read(columns=["label"], use_threads=False).column("label").to_pylist()
    except (OSError, pyarrow.ArrowException) as error:
        raise SourceError(f"{path} is not a readable parquet file ({_first_line(error)}); download it again") from None
    return FileScan(tuple(itertools.accumulate(sizes, initial=0)), labels, _class_names(schema, path))


def _check_columns(schema, path: str) -> None:
    """An ``image`` struct with binary ``bytes`` (the Image feature) and an integer ``label``."""
    import pyarrow as pa

    image = schema.field("image").type if "image" in schema.names else None
    data = image.field("bytes").type if pa.types.is_struct(image) and image.get_field_index("bytes") >= 0 else None
    if data is None or not (pa.types.is_binary(data) or pa.types.is_large_binary(data)):
        raise SourceError(f"{path} has no 'image' column of the Image feature (a struct of bytes and path)")
    if "label" not in schema.names or not pa.types.is_integer(schema.field("label").type):
        raise SourceError(f"{path} has no integer 'label' column")


def _class_names(schema, path: str) -> tuple[str, ...] | None:
    """The names of the ClassLabel feature of ``label`` in the ``huggingface`` schema metadata,
    or None for a plain integer label (or a file that ``datasets`` did not write)."""
    raw = (schema.metadata or {}).get(b"huggingface")
    if raw is None:
        return None
    try:
        features = json.loads(raw).get("info", {}).get("features") or {}
        feature = features.get("label")
    except (ValueError, AttributeError):  # not JSON, or not the object datasets writes
        raise SourceError(f"{path}: the 'huggingface' schema metadata is not the JSON datasets writes") from None
    if not isinstance(feature, dict) or feature.get("_type") != "ClassLabel":
        return None
    names = feature.get("names")
    declared = len(names) if isinstance(names, list) else feature.get("num_classes")
    if isinstance(declared, int) and declared > MAX_CLASSES:  # before any list of that many names is made
        raise SourceError(f"{path}: the ClassLabel of 'label' declares {declared:,} classes; at most {MAX_CLASSES:,} "
                          "fit the shards' int16 labels")
    if names is None and isinstance(feature.get("num_classes"), int):  # older datasets may keep only the count
        names = [str(i) for i in range(feature["num_classes"])]
    if not isinstance(names, list):
        raise SourceError(f"{path}: the ClassLabel of 'label' has no names list")
    return tuple(str(name) for name in names)


def _classes(scans: dict[str, FileScan], labelled: dict[str, list[str]], root: str) -> tuple[ClassInfo, ...]:
    """Classes in the dataset's own label order (not sorted by name as ``make_classes`` does: the
    labels in the files index the ClassLabel names as they stand)."""
    first = next(iter(scans))
    for rel, scan in scans.items():
        if scan.names != scans[first].names:
            raise SourceError(f"{root}/{rel} has other classes than {root}/{first} (its ClassLabel differs): "
                              "are these files from one dataset?")
    names = scans[first].names
    if names is None:  # a plain integer label: as many classes as the largest label says
        # Labels past the class limit are rows to reject (_label_rows), not a reason to make a
        # list of 2**40 names first.
        labels = [label for rels in labelled.values() for rel in rels for label in scans[rel].labels]
        largest = max((label for label in labels if label is not None and label < MAX_CLASSES), default=-1)
        names = [str(i) for i in range(largest + 1)]
    if not names:
        raise SourceError(f"{root} has no classes: no ClassLabel names and no label of 0 or more")
    return numbered_classes(list(names), {}, root)


def _label_rows(split: str, rels: list[str], scans: dict[str, FileScan], classes: int,
                rejects: list[Reject]) -> tuple[tuple[str, int], ...]:
    """(key, label) pairs of a split's rows, sorted by key; rows without a usable label are rejects."""
    items = []
    for rel in rels:
        for row, label in enumerate(scans[rel].labels):
            key = f"{rel}/{row:08d}"
            if label is None:
                rejects.append(Reject(split, key, "no label (null)"))
            elif label == UNLABELLED:
                rejects.append(Reject(split, key, "unlabelled (label -1)"))
            elif not 0 <= label < classes:
                rejects.append(Reject(split, key, f"label {label} is not a class (0-{classes - 1})"))
            else:
                items.append((key, label))
    return tuple(items)


def _say_skipped_test(labels: list) -> None:
    """One line on stderr for the test split, which the shard format has no place for."""
    import click

    unlabelled = sum(1 for label in labels if label == UNLABELLED)
    if unlabelled == len(labels):
        click.echo(f"skipped {len(labels):,} test rows: unlabelled (label -1)", err=True)
    else:
        click.echo(f"skipped {len(labels):,} test rows ({unlabelled:,} unlabelled, label -1): "
                   "imgprep writes train and val only", err=True)
