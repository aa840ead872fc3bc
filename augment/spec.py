"""What the online stage does to each image: ``AugmentSpec``."""

from __future__ import annotations

import math
from dataclasses import dataclass

from augment.errors import AugmentError

BACKENDS = ("dali", "torch")  # the loader's two implementations of one recipe (see augment.loader)


def dali_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("nvidia.dali") is not None


def usable_backends() -> tuple[str, ...]:
    """The backends this machine can run: both with DALI installed, else torch."""
    return BACKENDS if dali_available() else ("torch",)

MODES = ("train", "val", "test10")
CROP_MODES = ("paper", "random-resized")
NORMALIZE = ("channel", "mean-image", "torchvision", "none")
DTYPES = ("float32", "float16")
LAYOUTS = ("NCHW", "NHWC")


@dataclass(frozen=True)
class AugmentSpec:
    """The augmentation recipe. The defaults are the paper's crops, mirrors and lighting with
    per-channel normalisation; the paper itself subtracts the mean image (``normalize=
    "mean-image"``), which ``train`` picks for AlexNet (``TrainConfig.normalize``).

    mode "train": a uniformly random ``crop`` x ``crop`` window of the stored image
    (``crop_mode="paper"``) or a random-resized crop (``"random-resized"``: a window of 8-100%
    of the whole image's area and aspect 3/4-4/3, resized to ``crop``, as torchvision's
    RandomResizedCrop), mirrored with probability ``flip``, plus PCA lighting; the Loader's
    ``set_epoch(epoch, res=...)`` may make an epoch's side ``res`` instead of ``crop``. "val": the
    central window, or with ``val_resize`` the image's shorter side resized to ``val_resize`` and
    then the central ``crop`` x ``crop`` (torchvision's Resize + CenterCrop). "test10": the
    paper's ten crops, [B, 10, ...]: top-left, top-right, bottom-left, bottom-right, centre, then
    the mirror images of those five in the same order (of the image resized as for "val").
    """

    mode: str = "train"
    crop: int = 224  # output side in pixels
    flip: float = 0.5  # probability of a horizontal mirror (train only)
    lighting: float = 0.1  # std of the PCA-lighting alpha; 0 turns lighting off (train only: 0 in the other modes)
    normalize: str = "channel"  # "channel": (x - mean) / std per channel, from stats.json; "mean-image":
    #                             x - mean image (the paper; no division); "torchvision": (x - mean) / std
    #                             with torchvision's ImageNet constants, which its published weights
    #                             expect; "none": 0-255 values, to inspect the maths
    dtype: str = "float32"  # output element type
    layout: str = "NCHW"  # output layout of each image
    crop_mode: str = "paper"  # train window: "paper" (fixed size) or "random-resized"
    val_resize: int | None = None  # val, test10: shorter side resized to this before the central crop
    #                                (None: the central crop of the stored image, no resize; None in train)

    def __post_init__(self):
        for name, value, allowed in (("mode", self.mode, MODES), ("normalize", self.normalize, NORMALIZE),
                                     ("dtype", self.dtype, DTYPES), ("layout", self.layout, LAYOUTS),
                                     ("crop_mode", self.crop_mode, CROP_MODES)):
            if value not in allowed:
                raise AugmentError(f"AugmentSpec {name} must be one of {', '.join(allowed)}, got {value!r}")
        if self.crop < 1:
            raise AugmentError(f"AugmentSpec crop must be positive, got {self.crop}")
        if not (math.isfinite(self.flip) and 0 <= self.flip <= 1):
            raise AugmentError(f"AugmentSpec flip is a probability, got {self.flip}")
        if not (math.isfinite(self.lighting) and 0 <= self.lighting <= 10):
            raise AugmentError(f"AugmentSpec lighting is a standard deviation from 0 to 10, got {self.lighting}")
        if self.val_resize is not None and self.val_resize < self.crop:
            raise AugmentError(f"AugmentSpec val_resize {self.val_resize} is smaller than the crop {self.crop}")
        # Lighting is for training, val_resize for evaluation: the other mode's value is dropped
        # here, the one place that rule is stated (a config holds both for all modes).
        if self.random:
            object.__setattr__(self, "val_resize", None)
        else:
            object.__setattr__(self, "lighting", 0.0)
        if self.resizes and self.normalize == "mean-image":
            raise AugmentError("mean-image normalisation goes with the paper's crops: resized windows (random-resized "
                               "crops, val_resize) cannot have the mean image cut to match (use --normalize channel)")

    @property
    def random(self) -> bool:
        """Whether each sample draws its own crop, mirror and lighting."""
        return self.mode == "train"

    @property
    def per_channel(self) -> bool:
        """Whether normalisation is (x - mean) / std with one mean and std per channel."""
        return self.normalize in ("channel", "torchvision")

    @property
    def resizes(self) -> bool:
        """Whether windows are resized to the output (random-resized crops, or val_resize in
        evaluation), rather than cut at the output's size."""
        if self.random:
            return self.crop_mode == "random-resized"
        return self.val_resize is not None

    @property
    def uses_lighting(self) -> bool:
        return self.lighting > 0
