"""The golden shard folders in tests/data/golden (made once; see the README there): today's
reader and loader read them as they were written, and today's ``imgprep shard`` writes the same
bytes from the same source. A change of the format cannot pass unnoticed."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from augment import AugmentSpec, Loader
from augment.loader import dali_available
from helpers import run_cli, shard_hashes
from prep.shards import open_shards
from tools.reference import lanczos_reference, psnr

GOLDEN = Path(__file__).parent / "data" / "golden"
SOURCE = GOLDEN / "source"
FOLDERS = ["raw", "jpeg"]
BACKENDS = [pytest.param("dali", marks=pytest.mark.skipif(not dali_available(), reason="DALI is not installed")),
            "torch"]
CLASSES = [{"index": 0, "wnid": "n00000001", "name": "first class"},
           {"index": 1, "wnid": "n00000002", "name": "second class"}]
# (key, label) of every image in index order: the plan's order, a seeded hash of the key.
IMAGES = {
    "train": [("train/n00000001/b.png", 0), ("train/n00000001/a.png", 0), ("train/n00000002/d.png", 1),
              ("train/n00000002/e.png", 1), ("train/n00000001/c.png", 0)],
    "val": [("val/n00000002/g.png", 1), ("val/n00000001/f.png", 0)],
}
REJECTS = [{"split": "train", "path": "train/n00000002/broken.JPEG", "reason": "empty file", "shard": "train-00000"}]
pytestmark = pytest.mark.timeout(120)  # loader workers and a shard job start


def expected_pixels(key: str) -> np.ndarray:
    """The image ``key`` at 16 x 16 computed without prep: a source with a side of 16 is only cut
    (numpy slicing of Pillow's decode); the one 32 x 32 source is Pillow's Lanczos reduction."""
    image = np.asarray(Image.open(SOURCE / key).convert("RGB"))
    height, width = image.shape[:2]
    if min(height, width) != 16:
        return lanczos_reference((SOURCE / key).read_bytes(), 16)
    top, left = (height - 16) // 2, (width - 16) // 2
    return image[top : top + 16, left : left + 16]


@pytest.mark.parametrize("folder", FOLDERS)
def test_the_reader_reads_the_known_labels_keys_and_pixels(folder):
    shards = open_shards(GOLDEN / folder)
    assert (shards.size, shards.encoding, shards.classes) == (16, folder, CLASSES)
    for split, images in IMAGES.items():
        reader = shards.split(split)
        assert [(reader.key(i), reader[i][1]) for i in range(len(reader))] == images
        assert reader.labels.tolist() == [label for _, label in images]
        for index, (key, _) in enumerate(images):
            image, expected = reader[index][0], expected_pixels(key)
            if folder == "jpeg":  # re-encoded at quality 90: close, not equal
                assert image.shape == expected.shape and psnr(image, expected) > 35, key
            elif key.endswith("e.png"):  # reduced by prep's bicubic, against Pillow's Lanczos
                assert psnr(image, expected) > 50, key
            else:
                np.testing.assert_array_equal(image, expected, err_msg=key)


def test_raw_pixels_are_the_stored_bytes():
    # The raw folder's exact pixels, also through the memory-mapped path the loaders use.
    reader = open_shards(GOLDEN / "raw").split("train")
    stored = reader.gather(np.arange(len(reader)), np.empty((len(reader), 16, 16, 3), np.uint8))
    np.testing.assert_array_equal(stored, np.stack([reader[i][0] for i in range(len(reader))]))


@pytest.mark.parametrize("folder", FOLDERS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_the_loader_yields_the_known_images(folder, backend):
    spec = AugmentSpec(mode="val", crop=16, normalize="none", layout="NHWC")
    reader = open_shards(GOLDEN / folder).split("val")
    with Loader(GOLDEN / folder, "val", 2, spec, backend=backend, device="cpu", workers=1) as loader:
        (images, labels), = list(loader)
    assert labels.tolist() == [label for _, label in IMAGES["val"]]
    for index, image in enumerate(images):
        difference = (image - torch.from_numpy(reader[index][0]).float()).abs()
        if folder == "jpeg" and backend == "dali":  # DALI decodes with its own IDCT
            assert difference.mean() < 1.0
        else:
            assert difference.max() == 0


@pytest.mark.parametrize("folder", FOLDERS)
def test_sharding_the_source_again_gives_the_same_bytes(folder, tmp_path):
    golden = json.loads((GOLDEN / folder / "manifest.json").read_text())
    options = golden["options"]
    out = tmp_path / folder
    flags = [f"--{name.replace('_', '-')}={value}" for name, value in options.items()]  # --shard-size=3 ...
    result = run_cli(["shard", str(SOURCE), "--out", str(out), *flags, "--workers", "1", "--quiet"])
    assert result.exit_code == 0, result.output
    assert shard_hashes(out) == shard_hashes(GOLDEN / folder)
    manifest = json.loads((out / "manifest.json").read_text())
    for name in ("source", "tool"):  # where it was made, and by which imgprep version
        del manifest[name], golden[name]
    assert manifest == golden
    assert [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()] == REJECTS
    assert (out / "rejects.jsonl").read_bytes() == (GOLDEN / folder / "rejects.jsonl").read_bytes()
