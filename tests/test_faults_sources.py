"""Faulty sources: odd names, link loops, damaged devkits, duplicate members, oversized files.

Each one must end as a reject with its reason (or, for a damaged devkit, one SourceError),
never as a traceback that stops the run.
"""

import errno
import io
import json
import os
import shutil
import tarfile
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import run_cli
from prep.build import max_file_bytes
from prep.decode import decode_resize
from prep.errors import BadImage, SourceError
from prep.sources.common import ReadsImagesAlone
from prep.plan import ShardOptions
from prep.sources import TreeReader, scan_source, scan_tree
from tools.source_layouts import add_file, tar_bytes
from tools.source_layouts import ilsvrc_archives as make_archives
from tools.fake_imagenet import make_fake_imagenet

FIRST = "n01440764"
SECOND = "n01443537"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """2 classes x (3 train + 2 val) small JPEGs, val in class folders."""
    return make_fake_imagenet(tmp_path_factory.mktemp("faults") / "src", classes=2, train_per_class=3,
                              val_per_class=2, awkward=False, large_fraction=0)


@pytest.fixture(scope="module")
def flat(tmp_path_factory):
    """The same with a flat val/ and val_labels.txt, the shape make_archives wants."""
    return make_fake_imagenet(tmp_path_factory.mktemp("faults-flat") / "src", classes=2, train_per_class=3,
                              val_per_class=2, flat_val=True, awkward=False, large_fraction=0)


@pytest.fixture
def src(tmp_path, pristine):
    """A private copy of ``pristine``, free to damage."""
    return Path(shutil.copytree(pristine, tmp_path / "src", symlinks=True))


def shard(source, out, *extra):
    result = run_cli(["shard", str(source), "--out", str(out), "--quiet", "--workers", "1", *extra])
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    # rejects.jsonl must be plain UTF-8 JSON, whatever the names on disk were
    lines = (out / "rejects.jsonl").read_bytes().decode("utf-8").splitlines()
    return manifest, {r["path"]: r["reason"] for r in map(json.loads, lines)}


def first_image(folder: Path) -> bytes:
    return sorted(folder.glob("*.JPEG"))[0].read_bytes()


def write_bytes_name(folder: Path, name: bytes, data: bytes = b"") -> None:
    """A file whose name is raw bytes (not necessarily UTF-8)."""
    with open(os.path.join(os.fsencode(folder), name), "wb") as f:
        f.write(data)


# ----------------------------------------------------------------------------- extracted trees


@pytest.mark.timeout(120)
def test_a_run_survives_bad_names_link_loops_and_huge_sparse_files(src, tmp_path):
    folder = src / "train" / FIRST
    write_bytes_name(folder, b"bad\xff.JPEG", first_image(folder))  # a good image under a bad name
    (folder / "loop.JPEG").symlink_to("loop.JPEG")
    with open(folder / "huge.JPEG", "wb") as f:
        f.truncate(200_000_000)  # apparent size only: nothing is written
    manifest, rejects = shard(src, tmp_path / "out", "--max-pixels", "310000")  # file cap 8 x 310,000 + 1 MiB
    assert rejects[f"train/{FIRST}/bad\\xff.JPEG"] == "file name is not valid UTF-8"
    assert rejects[f"train/{FIRST}/loop.JPEG"] == "symlink loop"
    assert rejects[f"train/{FIRST}/huge.JPEG"].startswith("file too large: 200,000,000 bytes")
    assert manifest["splits"]["train"]["count"] == 2 * 3 and manifest["splits"]["val"]["count"] == 2 * 2
    assert manifest["rejected"] == 3


def test_non_utf8_folder_and_file_names_are_rejected_at_scan(src):
    os.mkdir(os.path.join(os.fsencode(src / "train"), b"n0\xfe"))  # would be a class named by bad bytes
    write_bytes_name(os.path.join(os.fsencode(src / "train"), b"n0\xfe"), b"a.JPEG", b"x")
    write_bytes_name(src / "val" / SECOND, b"v\xc3(.JPEG", b"x")  # an invalid two-byte sequence
    dataset = scan_tree(src)
    assert [c.wnid for c in dataset.classes] == [FIRST, SECOND]
    assert {r.path: r.reason for r in dataset.rejects} == {
        "train/n0\\xfe": "folder name is not valid UTF-8; its files are not read",
        f"val/{SECOND}/v\\xc3(.JPEG": "file name is not valid UTF-8",
    }
    assert len(dataset.splits["train"]) == 6 and len(dataset.splits["val"]) == 4


def test_symlink_loops_are_rejects_at_every_level(src):
    folder = src / "train" / FIRST
    (folder / "a.JPEG").symlink_to("b.JPEG")  # a two-link loop
    (folder / "b.JPEG").symlink_to("a.JPEG")
    (src / "train" / "n09999999").symlink_to("n09999999")  # where class folders are listed
    (src / "val" / "n09999999").symlink_to("n09999999")
    dataset = scan_tree(src)
    assert [c.wnid for c in dataset.classes] == [FIRST, SECOND]
    assert {r.path: r.reason for r in dataset.rejects} == {
        f"train/{FIRST}/a.JPEG": "symlink loop", f"train/{FIRST}/b.JPEG": "symlink loop",
        "train/n09999999": "symlink loop", "val/n09999999": "symlink loop",
    }
    assert len(dataset.splits["train"]) == 6 and len(dataset.splits["val"]) == 4


@pytest.mark.timeout(60)  # a followed cycle would never end
def test_folder_links_to_ancestors_are_not_followed(src):
    folder = src / "train" / FIRST
    (folder / "up").symlink_to("..")  # -> train/
    (folder / "root").symlink_to(src)  # -> the source root, absolute
    (src / "train" / "n09999999").symlink_to(src / "train")  # a class folder that is train/ itself
    (src / "train" / "n09999998").symlink_to(src)
    dataset = scan_tree(src)
    assert [c.wnid for c in dataset.classes] == [FIRST, SECOND]
    reasons = {r.path: r.reason for r in dataset.rejects}
    assert reasons[f"train/{FIRST}/up"] == reasons[f"train/{FIRST}/root"] == "a link to a folder; not followed"
    assert reasons["train/n09999999"] == reasons["train/n09999998"] == "a link to a folder above it (a cycle)"
    assert len(dataset.splits["train"]) == 6


def test_huge_sparse_file_is_refused_by_its_size_before_reading(tmp_path):
    (tmp_path / "huge.JPEG").write_bytes(b"")
    with open(tmp_path / "huge.JPEG", "r+b") as f:
        f.truncate(200_000_000)
    cap = max_file_bytes(ShardOptions(max_pixels=310_000))
    assert 1_000_000 < cap < 10_000_000  # the reader would otherwise read a few MB of it

    def bytes_read() -> int:  # every byte this process read through read() calls
        with open("/proc/self/io") as f:
            return int(next(line for line in f if line.startswith("rchar:")).split()[1])

    if not os.path.exists("/proc/self/io"):
        pytest.skip("needs /proc/self/io")
    before = bytes_read()
    with pytest.raises(BadImage, match=f"file too large: 200,000,000 bytes, over the cap of {cap:,}"):
        TreeReader(str(tmp_path)).read("huge.JPEG", cap)
    assert bytes_read() - before < 64 * 1024


# ----------------------------------------------------------------------------- validation labels


def test_conflicting_val_labels_are_rejects_and_identical_duplicates_are_fine(flat, tmp_path):
    names = sorted(p.name for p in (flat / "val").iterdir())
    lines = [f"{names[0]} {FIRST}", f"{names[0]} {SECOND}",  # one file, two classes
             f"{names[1]} {SECOND}", f"{names[1]} {SECOND}"]  # the same line twice
    lines += [f"{n} {FIRST}" for n in names[2:]]
    (tmp_path / "labels.txt").write_text("\n".join(lines) + "\n")
    dataset = scan_tree(flat, tmp_path / "labels.txt")
    assert {r.path: r.reason for r in dataset.rejects} == {
        f"val/{names[0]}": f"conflicting labels for this file in the validation labels: {FIRST} and {SECOND}"}
    assert dataset.splits["val"] == tuple([(f"val/{names[1]}", 1)] + [(f"val/{n}", 0) for n in names[2:]])


# ----------------------------------------------------------------------------- devkit


def damaged_devkit(path: Path, damage: str) -> None:
    """Rewrite the devkit at ``path`` with its meta.mat (or the whole file) damaged."""
    with tarfile.open(path, "r:gz") as devkit:
        files = {m.name: devkit.extractfile(m).read() for m in devkit.getmembers() if m.isfile()}
    if damage == "empty devkit":
        path.write_bytes(b"")
        return
    if damage == "corrupt devkit":  # a gzip whose deflate stream is damaged half way
        data = path.read_bytes()
        path.write_bytes(data[:60] + bytes(len(data) - 60))
        return
    meta_name = next(name for name in files if name.endswith("meta.mat"))
    meta = files[meta_name]
    files[meta_name] = {"empty meta.mat": b"", "zero-filled meta.mat": bytes(len(meta)),
                        "truncated meta.mat": meta[: len(meta) // 2]}[damage]
    with tarfile.open(path, "w:gz") as devkit:
        for name, data in files.items():
            add_file(devkit, name, data)


@pytest.mark.parametrize("damage", ["empty meta.mat", "zero-filled meta.mat", "truncated meta.mat",
                                    "empty devkit", "corrupt devkit"])
def test_damaged_devkit_is_one_source_error_naming_it(flat, tmp_path, damage):
    archives = make_archives(flat, tmp_path / "ilsvrc")
    damaged_devkit(archives / "ILSVRC2012_devkit_t12.tar.gz", damage)
    what = "data/meta.mat" if "meta.mat" in damage else "the archive"
    with pytest.raises(SourceError, match=rf"ILSVRC2012_devkit_t12\.tar\.gz: {what} cannot be read \(.+\)"):
        scan_source(archives)


# ----------------------------------------------------------------------------- archive members


def append_members(tar: bytes, members: list[tuple[str, bytes]]) -> bytes:
    buffer = io.BytesIO(tar)
    with tarfile.open(fileobj=buffer, mode="a") as archive:
        for name, data in members:
            add_file(archive, name, data)
    return buffer.getvalue()


def rewrite_class_tar(train_tar: Path, wnid: str, extra: list[tuple[str, bytes]]) -> list[str]:
    """Append ``extra`` members to one per-class tar inside the training archive; returns that
    class tar's member names before the change."""
    with tarfile.open(train_tar) as outer:
        members = [(m.name, outer.extractfile(m).read()) for m in outer.getmembers()]
    inner = dict(members)[f"{wnid}.tar"]
    names = tarfile.open(fileobj=io.BytesIO(inner)).getnames()
    with tarfile.open(train_tar, "w") as outer:
        for name, data in members:
            add_file(outer, name, append_members(data, extra) if name == f"{wnid}.tar" else data)
    return names


def pixels_of(out: Path, split: str) -> dict:
    from prep.shards import open_shards

    reader = open_shards(out).split(split)
    return {reader.key(i): reader[i][0] for i in range(len(reader))}


@pytest.mark.timeout(120)
def test_duplicate_member_names_keep_the_last_as_extraction_would(flat, tmp_path):
    archives = make_archives(flat, tmp_path / "ilsvrc")
    class_dir = flat / "train" / FIRST
    images = sorted(class_dir.iterdir())
    # the first image's name again, holding the second image's bytes; and a name that is not UTF-8
    names = rewrite_class_tar(archives / "ILSVRC2012_img_train.tar", FIRST,
                              [(images[0].name, images[1].read_bytes()),
                               ("bad\udcff.JPEG", images[2].read_bytes())])  # stored as the byte 0xff
    assert images[0].name in names
    val = sorted((flat / "val").iterdir())
    val_tar = archives / "ILSVRC2012_img_val.tar"
    val_tar.write_bytes(append_members(val_tar.read_bytes(), [(val[0].name, val[1].read_bytes())]))

    out = tmp_path / "out"
    manifest, rejects = shard(archives, out)  # devkit labels: one per distinct validation image
    duplicate = "duplicate member name: a later member of the same name replaces this one"
    assert rejects == {f"train/{FIRST}/{images[0].name}": duplicate, f"val/{val[0].name}": duplicate,
                       f"train/{FIRST}/bad\\xff.JPEG": "file name is not valid UTF-8"}
    assert manifest["splits"]["train"]["count"] == 6 and manifest["splits"]["val"]["count"] == 4
    train = pixels_of(out, "train")
    assert len(train) == 6
    np.testing.assert_array_equal(train[f"train/{FIRST}/{images[0].name}"], train[f"train/{FIRST}/{images[1].name}"])
    validation = pixels_of(out, "val")
    np.testing.assert_array_equal(validation[f"val/{val[0].name}"], validation[f"val/{val[1].name}"])


@pytest.mark.timeout(120)
def test_a_per_class_tar_given_twice_keeps_the_later_one_as_extraction_would(flat, tmp_path):
    archives = make_archives(flat, tmp_path / "ilsvrc")
    train_tar = archives / "ILSVRC2012_img_train.tar"
    image = sorted((flat / "train" / FIRST).iterdir())[0]
    later = tar_bytes({"later.JPEG": image.read_bytes()})  # the same class again, with one image
    train_tar.write_bytes(append_members(train_tar.read_bytes(), [(f"{FIRST}.tar", later)]))
    manifest, rejects = shard(archives, tmp_path / "out")
    assert rejects == {f"train/{FIRST}.tar": "duplicate member name: a later member of the same name replaces this one"}
    train = pixels_of(tmp_path / "out", "train")
    assert [key for key in train if key.startswith(f"train/{FIRST}/")] == [f"train/{FIRST}/later.JPEG"]
    assert manifest["splits"]["train"]["count"] == 1 + 3 and len(manifest["classes"]) == 2  # 2 classes of 3


# ----------------------------------------------------------------------------- decoded size


def png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def png16_rgb(width: int, height: int) -> bytes:
    """A 16-bit RGB PNG (Pillow cannot write one), written chunk by chunk."""
    import struct

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    rows = b"".join(b"\0" + bytes(range(256)) * (width * 6 // 256) + bytes(width * 6 % 256) for _ in range(height))
    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)  # bit depth 16, colour type 2 (RGB)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def test_decoded_bytes_are_capped_by_bit_depth():
    # 100x100 = 10,000 pixels is under a 12,000-pixel cap, which allows 4 bytes a pixel (8-bit
    # RGBX, as decoders hold RGB): 48,000 bytes. 16-bit RGB takes 6 bytes a pixel: 60,000.
    cap = 12_000
    with pytest.raises(BadImage, match=r"100x100 16-bit RGB needs 60,000 bytes decoded, over the 48,000"):
        decode_resize(png16_rgb(100, 100), 32, "crop", cap)
    assert decode_resize(png16_rgb(80, 80), 32, "crop", cap).shape == (32, 32, 3)  # 38,400 bytes
    grey16 = png_bytes(np.full((100, 100), 40000, np.uint16))  # 2 bytes a pixel: 20,000
    assert (decode_resize(grey16, 32, "crop", cap) == 40000 >> 8).all()
    assert decode_resize(png_bytes(np.zeros((100, 100, 3), np.uint8)), 32, "crop", cap).shape == (32, 32, 3)


def test_16bit_grey_decodes_in_no_more_memory_than_8bit_rgb():
    # numpy reports its buffers to tracemalloc; the image data is made before tracing starts.
    rng = np.random.default_rng(0)
    grey16 = png_bytes(rng.integers(0, 65536, (800, 1200), dtype=np.uint16))
    rgb8 = png_bytes(rng.integers(0, 256, (800, 1200, 3), dtype=np.uint8))

    def traced_peak(data: bytes) -> int:
        tracemalloc.start()
        try:
            decode_resize(data, 64, "crop", 100_000_000)
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    grey_peak, rgb_peak = traced_peak(grey16), traced_peak(rgb8)
    assert grey_peak <= rgb_peak, (grey_peak, rgb_peak)  # it was 2.7x: 8-byte temporaries a pixel


def test_names_with_terminal_control_characters_are_printed_escaped(pristine, tmp_path):
    # A hostile uploader names a class and a file with escape sequences (recolour, clear the
    # screen, retitle the terminal): every command prints them as backslash escapes.
    src = tmp_path / "src"
    shutil.copytree(pristine, src)
    hostile = "n02\x1b]0;owned\x07"
    shutil.copytree(src / "train" / FIRST, src / "train" / hostile)
    (src / "train" / FIRST / "clear\x1b[2J.txt").write_text("not an image")
    out = tmp_path / "shards"
    outputs = [run_cli(["shard", str(src), "--out", str(out), "--shard-size", "4", "--workers", "1", "--quiet"]),
               run_cli(["info", str(out)]), run_cli(["verify", str(out)])]
    assert [result.exit_code for result in outputs] == [0, 0, 0], [r.output for r in outputs]
    (src / "train" / "n03\x1b[31mempty").mkdir()  # now an error names it
    outputs.append(run_cli(["shard", str(src), "--out", str(tmp_path / "other"), "--quiet"]))
    assert outputs[-1].exit_code == 1
    for result in outputs:
        assert "\x1b" not in result.output and "\x07" not in result.output, result.output
    assert "n02\\x1b]0;owned\\x07" in outputs[1].output  # info lists the classes
    assert "clear\\x1b[2J.txt" in outputs[1].output  # and an example reject
    assert "n03\\x1b[31mempty" in outputs[-1].output


@pytest.mark.timeout(30)
def test_a_fifo_in_a_files_place_is_a_reject_not_a_hang(pristine, tmp_path):
    # Swapped in after the scan: the reader opens it without blocking and sees it is no file.
    from prep.sources.tars import ArchiveReader

    fifo = tmp_path / "x.JPEG"
    os.mkfifo(fifo)
    with pytest.raises(BadImage, match="not a regular file"):
        TreeReader(str(tmp_path)).read("x.JPEG", 1 << 20)
    with pytest.raises(BadImage, match="not a regular file"):
        ArchiveReader({"a.tar": str(fifo)}, {"a.tar/x.JPEG": ("a.tar", 512, 10)}).read("a.tar/x.JPEG", 1 << 20)


class FailingReader(ReadsImagesAlone):
    """Reads like ``reader``, but the keys in ``failing`` always fail with EIO (a bad sector)."""

    def __init__(self, reader, failing):
        self.reader, self.failing, self.tries = reader, set(failing), 0

    def read(self, key, max_bytes):
        if key in self.failing:
            self.tries += 1
            raise OSError(errno.EIO, "Input/output error")
        return self.reader.read(key, max_bytes)


@pytest.mark.parametrize("failing", [1, 3])
def test_a_file_that_always_fails_to_read_becomes_a_reject_after_its_retries(pristine, tmp_path, failing):
    # One such file must not block every rerun; three in a row are the disk, not the files.
    from prep.build import JOURNAL, READ_TRIES, build_shard
    from prep.errors import PrepError
    from prep.plan import ShardTask

    dataset = scan_tree(pristine)
    items = dataset.splits["train"][:4]
    reader = FailingReader(dataset.reader, [key for key, _ in items[1:1 + failing]])
    (tmp_path / JOURNAL).mkdir()
    task = ShardTask("train", 0, tuple(items))
    if failing == 1:
        record = build_shard(task, reader, tmp_path, ShardOptions(size=32))
        assert record["count"] == 3 and record["rejects"] == [[items[1][0], "unreadable after 3 tries: Input/output error"]]
        assert reader.tries == READ_TRIES
    else:
        with pytest.raises(PrepError, match="as did the 2 files before it: the disk or mount"):
            build_shard(task, reader, tmp_path, ShardOptions(size=32))
