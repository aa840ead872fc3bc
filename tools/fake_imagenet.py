"""A small synthetic ImageNet: the real layout, realistic JPEGs, and every awkward file kind.

    python -m tools.fake_imagenet demo/src --classes 4 --train-per-class 40 --val-per-class 10

Writes ``OUT/train/<wnid>/*.JPEG``, ``OUT/val/<wnid>/*.JPEG`` (or a flat ``OUT/val`` plus
``OUT/val_labels.txt`` with ``--flat-val``) and ``OUT/LOC_synset_mapping.txt``. Classes use the
first real ImageNet wnids. Each class has its own colour and stripe orientation under random
clutter, so a network can learn them and a wrong label mapping shows as chance accuracy.
Most images are 500x375 or 375x500 like ImageNet's; a few are larger. With awkward files on
(default), ``train/<first wnid>/`` also gets every kind of file a real crawl contains, listed in
``AWKWARD`` with what imgprep should do with it. The same seed writes the same bytes.
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import click
import numpy as np
from PIL import Image

WNIDS = [
    ("n01440764", "tench, Tinca tinca"), ("n01443537", "goldfish, Carassius auratus"),
    ("n01484850", "great white shark, white shark, man-eater, man-eating shark, Carcharodon carcharias"),
    ("n01491361", "tiger shark, Galeocerdo cuvieri"), ("n01494475", "hammerhead, hammerhead shark"),
    ("n01496331", "electric ray, crampfish, numbfish, torpedo"), ("n01498041", "stingray"),
    ("n01514668", "cock"), ("n01514859", "hen"), ("n01518878", "ostrich, Struthio camelus"),
]
SHAPES = [(500, 375), (375, 500), (500, 333), (500, 500), (333, 500), (640, 480)]

# (file name, "ok" or "reject", what it is). imgprep keeps every "ok" file and rejects the rest.
AWKWARD = [
    ("cmyk.JPEG", "ok", "CMYK JPEG (Adobe, inverted)"),
    ("grey.JPEG", "ok", "greyscale JPEG"),
    ("progressive.JPEG", "ok", "progressive JPEG"),
    ("exif_rotated.JPEG", "ok", "EXIF orientation 6, which must be ignored"),
    ("no_eoi.JPEG", "ok", "JPEG missing only its end-of-image marker"),
    ("extraneous.JPEG", "ok", "JPEG with stray bytes before its end marker"),
    ("upper_case.JPG", "ok", "extension in capitals"),
    ("png_named.JPEG", "ok", "a PNG file named .JPEG"),
    ("palette.png", "ok", "palette PNG"),
    ("alpha.png", "ok", "RGBA PNG"),
    ("grey16.png", "ok", "16-bit greyscale PNG"),
    ("rgb16.png", "ok", "16-bit RGB PNG"),
    ("empty.JPEG", "reject", "zero bytes"),
    ("truncated.JPEG", "reject", "JPEG cut in half"),
    ("garbage.JPEG", "reject", "random bytes named .JPEG"),
    ("bomb.png", "reject", "10000x10001 PNG: over the 100-megapixel cap"),
    ("notes.txt", "reject", "not an image extension"),
]


def class_image(rng: np.random.Generator, label: int, n_classes: int, width: int, height: int) -> np.ndarray:
    """A (height, width, 3) uint8 picture of class ``label``: its hue and stripe angle, plus clutter."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    hue = (label / n_classes + rng.normal(0, 0.02)) % 1.0
    base = np.array(_hsv_to_rgb(hue, 0.7, 0.85), np.float32)
    angle = np.pi * label / n_classes + rng.normal(0, 0.08)
    period = rng.uniform(18, 30) * max(width, height) / 500
    stripes = np.sin(2 * np.pi * (x * np.cos(angle) + y * np.sin(angle)) / period + rng.uniform(0, 6.3))
    image = base * (0.65 + 0.3 * stripes[..., None]) * 255
    for _ in range(rng.integers(2, 6)):  # clutter shared by all classes: random coloured ellipses
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        rx, ry = rng.uniform(0.05, 0.2) * width, rng.uniform(0.05, 0.2) * height
        inside = ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 < 1
        image[inside] = rng.uniform(0, 255, 3)
    image += rng.normal(0, 6, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def _hsv_to_rgb(h: float, s: float, v: float) -> tuple[float, float, float]:
    i = int(h * 6) % 6
    f = h * 6 - int(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    return [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]


def jpeg_bytes(pixels: np.ndarray, quality: int, **options) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=quality, **options)
    return buffer.getvalue()


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def png16_rgb(pixels: np.ndarray) -> bytes:
    """A 16-bit RGB PNG written by hand (Pillow cannot write one): each sample is value * 257."""
    height, width, _ = pixels.shape
    rows = (pixels.astype(">u2") * 257).reshape(height, width * 3)
    raw = b"".join(b"\x00" + row.tobytes() for row in rows)
    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", zlib.compress(raw)) + _png_chunk(b"IEND", b"")


def png_bomb(width: int = 10000, height: int = 10001) -> bytes:
    """A valid greyscale PNG of width x height black pixels, a few hundred KB on disk."""
    compressor = zlib.compressobj(9)
    row = b"\x00" * (width + 1)
    data = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", data) + _png_chunk(b"IEND", b"")


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def awkward_files(rng: np.random.Generator) -> dict[str, bytes]:
    """The bytes of every file in ``AWKWARD``."""
    pixels = class_image(rng, 0, 4, 500, 375)
    plain = jpeg_bytes(pixels, 90)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    files = {
        "cmyk.JPEG": _save(Image.fromarray(pixels).convert("CMYK"), "JPEG", quality=90),
        "grey.JPEG": _save(Image.fromarray(pixels).convert("L"), "JPEG", quality=90),
        "progressive.JPEG": jpeg_bytes(pixels, 85, progressive=True),
        "exif_rotated.JPEG": jpeg_bytes(pixels, 90, exif=exif.tobytes()),
        "no_eoi.JPEG": plain[:-2],
        "extraneous.JPEG": plain[:-2] + b"\x00\x00\x00" + plain[-2:],
        "upper_case.JPG": plain,
        "png_named.JPEG": png_bytes(Image.fromarray(pixels)),
        "palette.png": png_bytes(Image.fromarray(pixels).convert("P", palette=Image.Palette.ADAPTIVE)),
        "alpha.png": png_bytes(Image.fromarray(np.dstack([pixels, np.full(pixels.shape[:2], 200, np.uint8)]))),
        "grey16.png": png_bytes(Image.fromarray(pixels[..., 1].astype(np.uint16) * 257)),
        "rgb16.png": png16_rgb(pixels),
        "empty.JPEG": b"",
        "truncated.JPEG": plain[: len(plain) // 2],
        "garbage.JPEG": rng.bytes(5000),
        "bomb.png": png_bomb(),
        "notes.txt": b"not an image\n",
    }
    assert set(files) == {name for name, _, _ in AWKWARD}
    return files


def _save(image: Image.Image, kind: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, kind, **options)
    return buffer.getvalue()


def make_fake_imagenet(out, classes: int = 4, train_per_class: int = 12, val_per_class: int = 4,
                       flat_val: bool = False, awkward: bool = True, large_fraction: float = 0.05,
                       seed: int = 0) -> Path:
    """Write the tree; returns its root. Large images have a longer side of 1000-2000 pixels."""
    if not 1 <= classes <= len(WNIDS):
        raise ValueError(f"classes must be 1-{len(WNIDS)}")
    out = Path(out)
    rng = np.random.default_rng(seed)
    wnids = WNIDS[:classes]
    out.mkdir(parents=True, exist_ok=True)
    (out / "LOC_synset_mapping.txt").write_text("".join(f"{w} {n}\n" for w, n in wnids))
    val_labels = []
    for label, (wnid, _) in enumerate(wnids):
        for split, count in (("train", train_per_class), ("val", val_per_class)):
            folder = out / split / ("" if split == "val" and flat_val else wnid)
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                width, height = SHAPES[rng.integers(len(SHAPES))]
                if rng.random() < large_fraction:
                    scale = rng.uniform(1000, 2000) / max(width, height)
                    width, height = round(width * scale), round(height * scale)
                name = f"{wnid}_{i:05d}.JPEG" if split == "train" else f"ILSVRC2012_val_{label:03d}{i:05d}.JPEG"
                pixels = class_image(rng, label, classes, width, height)
                (folder / name).write_bytes(jpeg_bytes(pixels, int(rng.integers(75, 96))))
                if split == "val":
                    val_labels.append(f"{name} {wnid}\n")
    if flat_val:
        (out / "val_labels.txt").write_text("".join(val_labels))
    if awkward:
        for name, data in awkward_files(rng).items():
            (out / "train" / wnids[0][0] / name).write_bytes(data)
        (out / "train" / "README.txt").write_text("a loose file outside any class folder\n")
    return out


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--classes", default=4, show_default=True, help=f"Number of classes (1-{len(WNIDS)}).")
@click.option("--train-per-class", default=12, show_default=True, help="Training images per class.")
@click.option("--val-per-class", default=4, show_default=True, help="Validation images per class.")
@click.option("--flat-val", is_flag=True, help="Flat OUT/val with OUT/val_labels.txt instead of class folders.")
@click.option("--awkward/--no-awkward", default=True, show_default=True,
              help="Add the awkward files (CMYK, 16-bit, truncated, bombs...) to the first class.")
@click.option("--large-fraction", default=0.05, show_default=True, help="Share of images 1000-2000 px long.")
@click.option("--seed", default=0, show_default=True, help="Same seed, same bytes.")
def main(out, classes, train_per_class, val_per_class, flat_val, awkward, large_fraction, seed):
    """Write a small ImageNet-shaped dataset to OUT."""
    make_fake_imagenet(out, classes, train_per_class, val_per_class, flat_val, awkward, large_fraction, seed)
    click.echo(f"wrote {classes} classes x ({train_per_class} train + {val_per_class} val) images to {out}"
               + (f" plus {len(AWKWARD)} awkward files" if awkward else ""))


if __name__ == "__main__":
    main()
