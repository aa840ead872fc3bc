"""``imgprep preview``: a PNG grid of shard images beside augmented versions of each.

Row r shows one image of the split as stored (square shards: S x S; aspect-kept shards: scaled
to fit an S x S cell), then ``versions`` training views of it (epochs 0, 1, ...: each epoch
draws a new window, mirror and lighting), on the 0-255 scale before normalisation, so what the
network sees can be checked by eye. Square shards show the paper's crops; aspect-kept shards
the random-resized crops their recipes train with. The windows are cut and resized by the same
code as the loader's workers (``augment.windows``), then mirrored and lit by
``augment.torch_ops.finish_windows``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from augment.colour import colour_stats, lighting_offsets
from augment.errors import AugmentError
from augment.params import sample_params
from augment.spec import AugmentSpec
from augment.torch_ops import finish_windows, on_device
from augment.windows import cut_windows
from prep.shards import open_shards

GAP = 6  # pixels between cells
LABEL_HEIGHT = 14


def make_preview(root, out, split: str = "train", images: int = 6, versions: int = 5, lighting: float = 0.1,
                 seed: int = 0, crop: int | None = None) -> tuple[Path, int]:
    """(the PNG written, rows drawn: ``images`` or the split's size if smaller). ``crop``
    defaults to the paper's proportion of the shard size, 224 / 256."""
    shard_set = open_shards(root)
    reader = shard_set.split(split)
    size = reader.size
    crop = crop or size * 224 // 256
    if not 0 < crop <= size:
        raise AugmentError(f"crop {crop} does not fit the {size} px shard images")
    spec = AugmentSpec(crop=crop, lighting=lighting, normalize="none", layout="NHWC",
                       crop_mode="paper" if shard_set.square else "random-resized")
    colour = colour_stats(shard_set.root, spec)  # a URL's statistics are in its cache folder
    chosen = np.sort(np.random.default_rng(seed).choice(len(reader), size=min(images, len(reader)), replace=False))
    sources = [reader[int(i)][0] for i in chosen]
    shapes = reader.shapes_of(chosen)
    views = [training_views(sources, sample_params(spec, shapes, seed, epoch, chosen), spec, colour)
             for epoch in range(versions)]
    cell = size + GAP
    sheet = Image.new("RGB", (cell * (versions + 1) + GAP, (cell + LABEL_HEIGHT) * len(chosen) + GAP), "white")
    draw = ImageDraw.Draw(sheet)
    offset = (size - spec.crop) // 2  # centre the smaller views in their cells
    for row, index in enumerate(chosen):
        top = GAP + row * (cell + LABEL_HEIGHT)
        klass = shard_set.classes[int(reader.labels[index])]
        draw.text((GAP, top), f"#{index}  {klass['wnid']} {klass['name'][:40]}", fill="black")
        source = Image.fromarray(sources[row])
        source.thumbnail((size, size))  # an aspect-kept image shrunk to fit its cell
        sheet.paste(source, (GAP, top + LABEL_HEIGHT))
        for version in range(versions):
            sheet.paste(Image.fromarray(views[version][row]), (GAP + (version + 1) * cell + offset,
                                                               top + LABEL_HEIGHT + offset))
    save(sheet, Path(out))
    return Path(out), len(chosen)


def training_views(images: list[np.ndarray], params, spec: AugmentSpec, colour) -> np.ndarray:
    """uint8 [B, crop, crop, 3]: each image's window, mirrored and lit, clamped to 0-255."""
    windows = cut_windows(images, params, spec.crop, np.empty((len(images), spec.crop, spec.crop, 3), np.uint8))
    offsets = torch.as_tensor(lighting_offsets(params.alpha, colour), dtype=torch.float32)
    lit = finish_windows(torch.from_numpy(windows), torch.as_tensor(params.mirror, dtype=torch.bool), offsets, spec,
                         on_device(colour, "cpu"))
    return lit.clamp(0, 255).round().to(torch.uint8).numpy()


def save(sheet: Image.Image, out: Path) -> None:
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        sheet.save(out)
    except (OSError, ValueError) as error:  # ValueError: a name without an image extension
        raise AugmentError(f"cannot write {out}: {getattr(error, 'strerror', None) or error}") from None
