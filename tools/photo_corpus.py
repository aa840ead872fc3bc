"""An ImageNet-like benchmark corpus made from the real photographs scikit-image and
scikit-learn ship (``pip install .[bench]``).

    python -m tools.photo_corpus bench/corpus --images 400

Composition, after the ImageNet training set: 90% of the files are 4:3 or 3:4 crops about
500x375 (shorter side 333-400), 10% are large (longer side 1000-3000 px). The photographs are
only 300-1400 px, so a large file is a collage of tiles cut from them at native resolution:
pixel-level detail everywhere, which is harder for DCT-domain reduction than a real camera's
softer pixels, so the quality figures it gives are pessimistic. Greyscale textures are tinted.
Every file is a baseline 4:2:0 JPEG of quality 75-95. Written as ``OUT/train/<photo>/*.JPEG``
so ``imgprep shard`` reads it directly. The same seed writes the same bytes.
"""

from __future__ import annotations

import os
from pathlib import Path

import click
import numpy as np
from PIL import Image

SKIMAGE_FILES = ["astronaut.png", "coffee.png", "chelsea.png", "motorcycle_left.png", "motorcycle_right.png",
                 "rocket.jpg", "hubble_deep_field.jpg", "retina.jpg", "ihc.png", "gravel.png", "brick.png",
                 "grass.png", "camera.png", "moon.png", "coins.png"]
SKLEARN_FILES = ["china.jpg", "flower.jpg"]


def load_photographs() -> dict[str, Image.Image]:
    """Name -> RGB photograph, from the data folders of scikit-image and scikit-learn."""
    try:
        import skimage.data
        import sklearn.datasets
    except ImportError as error:
        raise SystemExit(f"the benchmark corpus needs scikit-image and scikit-learn: pip install '.[bench]' ({error})")
    folders = [(Path(skimage.data.__file__).parent, SKIMAGE_FILES),
               (Path(sklearn.datasets.__file__).parent / "images", SKLEARN_FILES)]
    photos = {}
    for folder, names in folders:
        for name in names:
            if (folder / name).is_file():
                image = Image.open(folder / name)
                if image.mode in ("L", "I;16"):  # tint greyscale textures so all three channels carry detail
                    grey = np.asarray(image.convert("L"), np.float32)[..., None]
                    image = Image.fromarray(np.clip(grey * [1.0, 0.9, 0.75] + 12, 0, 255).astype(np.uint8))
                photos[Path(name).stem] = image.convert("RGB")
    if len(photos) < 8:
        raise SystemExit(f"found only {len(photos)} photographs in scikit-image and scikit-learn")
    return photos


def ordinary_image(rng, photo: Image.Image) -> Image.Image:
    """A 4:3 or 3:4 crop of shorter side 333-400 px, rescaled from the photograph with Lanczos."""
    short = int(rng.integers(333, 401))
    long = round(short * 4 / 3)
    width, height = (long, short) if photo.width >= photo.height else (short, long)
    scale = max(width / photo.width, height / photo.height)
    scaled = photo.resize((max(width, round(photo.width * scale)), max(height, round(photo.height * scale))),
                          Image.LANCZOS)
    x = int(rng.integers(0, scaled.width - width + 1))
    y = int(rng.integers(0, scaled.height - height + 1))
    return scaled.crop((x, y, x + width, y + height))


def large_image(rng, photos: list[Image.Image]) -> Image.Image:
    """A collage 1000-3000 px long of native-resolution tiles from several photographs."""
    long = int(rng.integers(1000, 3001))
    aspect = float(rng.choice([4 / 3, 3 / 2, 1.0]))
    width, height = long, round(long / aspect)
    if rng.random() < 0.5:
        width, height = height, width
    canvas = Image.new("RGB", (width, height))
    tile = int(rng.integers(250, 450))
    for top in range(0, height, tile):
        for left in range(0, width, tile):
            photo = photos[rng.integers(len(photos))]
            x = int(rng.integers(0, max(1, photo.width - tile)))
            y = int(rng.integers(0, max(1, photo.height - tile)))
            canvas.paste(photo.crop((x, y, x + tile, y + tile)), (left, top))
    return canvas


def make_corpus(out, images: int = 400, large_fraction: float = 0.1, seed: int = 0) -> Path:
    out = Path(out)
    rng = np.random.default_rng(seed)
    photos = load_photographs()
    names, pictures = list(photos), list(photos.values())
    for i in range(images):
        if rng.random() < large_fraction:
            image, folder = large_image(rng, pictures), "collage"
        else:
            k = int(rng.integers(len(pictures)))
            image, folder = ordinary_image(rng, pictures[k]), names[k]
        path = out / "train" / folder / f"{i:05d}.JPEG"
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path, "JPEG", quality=int(rng.integers(75, 96)), subsampling="4:2:0")
    return out


def corpus_files(root) -> list[Path]:
    return sorted(Path(root).glob("train/*/*.JPEG"))


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--images", default=400, show_default=True, help="Number of JPEG files.")
@click.option("--large-fraction", default=0.1, show_default=True, help="Share of files 1000-3000 px long.")
@click.option("--seed", default=0, show_default=True)
def main(out, images, large_fraction, seed):
    """Write an ImageNet-like corpus of real photographs to OUT."""
    make_corpus(out, images, large_fraction, seed)
    total = sum(os.path.getsize(p) for p in corpus_files(out))
    click.echo(f"wrote {images} JPEGs ({total / 2**20:.1f} MiB) to {out}")


if __name__ == "__main__":
    main()
