"""Colour constants of a shard folder: normalisation mean and std, PCA-lighting eigenpairs.

PCA lighting (the paper, with fb.resnet.torch's units): for each image draw alpha ~ N(0, s^2)
per component and add to every pixel

    offset = P (alpha * lambda),   lambda = eigval / 255^2   (eigenvalues for pixels on [0, 1])

where P holds the eigenvectors of the pixel covariance as columns. The offset is on the [0, 1]
scale; our pixels are on 0-255, so we add 255 * offset = P (alpha * eigval) / 255, with eigval
from stats.json (0-255 scale). ImageNet's lambda is about (0.2175, 0.0188, 0.0045).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from augment.errors import AugmentError
from augment.spec import AugmentSpec
from prep.errors import ShardFormatError
from prep.stats import InvalidStatsError, load_stats

# torchvision's ImageNet constants, on the 0-255 scale: what its published weights expect
# (normalize "torchvision"), and the fallback of "channel" without stats.json.
IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)


@dataclass(frozen=True)
class ColourStats:
    mean: np.ndarray  # [3], 0-255
    std: np.ndarray  # [3], 0-255
    eigval: np.ndarray  # [3], descending, 0-255^2 units
    eigvec: np.ndarray  # [3, 3], column i belongs to eigval[i]
    mean_image: np.ndarray | None = None  # [S, S, 3] float32, 0-255


def colour_stats(root, spec: AugmentSpec) -> ColourStats:
    """The constants ``spec`` needs from ``root/stats.json``; refuses stale statistics."""
    needs_stats = spec.uses_lighting or spec.normalize == "mean-image"
    try:
        stats = load_stats(root, with_mean_image=spec.normalize == "mean-image")
    except InvalidStatsError:  # there but unusable: never fall back silently
        raise
    except ShardFormatError as error:  # no stats.json (stale ones raise StaleStatsError through)
        if needs_stats:
            what = "PCA lighting" if spec.uses_lighting else "mean-image normalisation"
            raise AugmentError(f"{what} needs colour statistics: run 'imgprep pca-stats {root}' "
                               f"(or set lighting=0 / normalize='channel'); {error}") from None
        if spec.normalize == "channel":
            warnings.warn(f"no stats.json in {Path(root)}: normalising with torchvision's ImageNet mean and std; "
                          f"run 'imgprep pca-stats {root}' for this dataset's own", stacklevel=2)
        return ColourStats(np.array(IMAGENET_MEAN), np.array(IMAGENET_STD), np.zeros(3), np.eye(3))
    mean_image = stats.get("mean_image")
    fixed = spec.normalize == "torchvision"
    if spec.normalize == "channel" and min(stats["std"]) <= 0:
        # Every image holds one value in that channel: dividing by its std makes every input NaN.
        channel = "RGB"[int(np.argmin(stats["std"]))]
        raise AugmentError(f"{Path(root) / 'stats.json'} gives channel {channel} a std of 0 (it holds one value "
                           "in every image): --normalize channel would divide by zero; use --normalize "
                           "torchvision or none")
    return ColourStats(
        mean=np.array(IMAGENET_MEAN if fixed else stats["mean"]), std=np.array(IMAGENET_STD if fixed else stats["std"]),
        eigval=np.array(stats["eigval"]), eigvec=np.array(stats["eigvec"]),
        mean_image=None if mean_image is None or isinstance(mean_image, str) else mean_image.astype(np.float32),
    )


def lighting_offsets(alpha: np.ndarray, colour: ColourStats) -> np.ndarray:
    """[B, 3] offsets on the 0-255 scale for alphas [B, 3]: P (alpha * eigval) / 255."""
    return (alpha * colour.eigval) @ colour.eigvec.T / 255.0
