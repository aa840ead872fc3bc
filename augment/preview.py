"""``imgprep preview``: a PNG grid of shard images beside augmented versions of each.

Row r shows one image of the split as stored (S x S), then ``versions`` training views of it
(epochs 0, 1, ...: each epoch draws a new window, mirror and lighting), on the 0-255 scale
before normalisation, so what the network sees can be checked by eye.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from augment.colour import colour_stats
from augment.errors import AugmentError
from augment.params import sample_params
from augment.spec import AugmentSpec
from augment.torch_ops import augment_batch
from prep.shards import open_shards

GAP = 6  # pixels between cells
LABEL_HEIGHT = 14


def make_preview(root, out, split: str = "train", images: int = 6, versions: int = 5, lighting: float = 0.1,
                 seed: int = 0, crop: int | None = None) -> tuple[Path, int]:
    """(the PNG written, rows drawn: ``images`` or the split's size if smaller). ``crop``
    defaults to the paper's proportion of the shard size, 224 / 256."""
    shard_set = open_shards(root)
    reader = shard_set.split(split)
    crop = crop or reader.size * 224 // 256
    if not 0 < crop <= reader.size:
        raise AugmentError(f"crop {crop} does not fit the {reader.size} px shard images")
    spec = AugmentSpec(crop=crop, lighting=lighting, normalize="none", layout="NHWC")
    colour = colour_stats(root, spec)
    chosen = np.sort(np.random.default_rng(seed).choice(len(reader), size=min(images, len(reader)), replace=False))
    sources = np.stack([reader[int(i)][0] for i in chosen])
    views = [augment_batch(torch.from_numpy(sources), sample_params(spec, reader.size, seed, epoch, chosen), spec,
                           colour).clamp(0, 255).round().to(torch.uint8).numpy() for epoch in range(versions)]
    size = reader.size
    cell = size + GAP
    sheet = Image.new("RGB", (cell * (versions + 1) + GAP, (cell + LABEL_HEIGHT) * len(chosen) + GAP), "white")
    draw = ImageDraw.Draw(sheet)
    for row, index in enumerate(chosen):
        top = GAP + row * (cell + LABEL_HEIGHT)
        label = int(reader.labels[index])
        klass = shard_set.classes[label]
        draw.text((GAP, top), f"#{index}  {klass['wnid']} {klass['name'][:40]}", fill="black")
        sheet.paste(Image.fromarray(sources[row]), (GAP, top + LABEL_HEIGHT))
        offset = (size - spec.crop) // 2  # centre the smaller views in their cells
        for version in range(versions):
            sheet.paste(Image.fromarray(views[version][row]), (GAP + (version + 1) * cell + offset,
                                                               top + LABEL_HEIGHT + offset))
    out = Path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        sheet.save(out)
    except (OSError, ValueError) as error:  # ValueError: a name without an image extension
        raise AugmentError(f"cannot write {out}: {getattr(error, 'strerror', None) or error}") from None
    return out, len(chosen)
