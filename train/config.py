"""What a training run is: ``TrainConfig``, one frozen dataclass, and its named presets.

The defaults are the paper's recipe (Krizhevsky et al. 2012, with the cuda-convnet code it
used where the text is silent), each written once, here:

- AlexNet with two columns; SGD, momentum 0.9, weight decay 5e-4 on the weights but not the
  biases (cuda-convnet's weight-decay term applies to weights only), batch 128, lr 0.01
  divided by 10 when validation top-1 stops improving, 90 epochs;
- random 224 windows of the 256 images, mirrors, PCA lighting of std 0.1;
- inputs: the paper subtracts the mean image, which its N(0, 0.01) initialisation expects. So
  ``normalize`` left unset becomes "mean-image" for AlexNet with the paper's crops and
  "channel" (per-channel mean and std) for every other network or crop mode;
- ``out`` left unset becomes runs/<arch>.

``train run`` builds one from its options (its --help takes the defaults from here); a
checkpoint stores it as a plain dict, so a resumed run is the same run.
"""

from __future__ import annotations

import math
from dataclasses import MISSING, asdict, dataclass, fields, replace

from augment.spec import AugmentSpec, CROP_MODES, NORMALIZE
from prep import DEFAULT_SHARDS
from prep.errors import ImgprepError

SCHEDULES = ("plateau", "step", "cosine")
AMP = ("bf16", "fp16", "off")
DEVICES = ("cuda", "cpu")
BACKENDS = ("dali", "torch")


class ConfigError(ImgprepError, ValueError):
    """An option, or a combination of options, that cannot work."""


@dataclass(frozen=True)
class TrainConfig:
    shards: str = DEFAULT_SHARDS  # shard folder made by `imgprep shard` and `imgprep pca-stats`
    out: str | None = None  # run folder: last.pt, best.pt, metrics.jsonl, curves.png (None: runs/<arch>)
    arch: str = "alexnet"  # a train.models.MODELS name, package.module:factory, or a torchvision name
    epochs: int = 90  # passes over the training split
    batch_size: int = 128  # images per step over all processes (each takes batch_size / world)
    lr: float = 0.01  # learning rate of SGD at the start (after warm-up)
    momentum: float = 0.9  # SGD momentum
    weight_decay: float = 5e-4  # L2 penalty, applied by SGD
    no_bias_decay: bool = True  # exempt biases and 1-d parameters from weight decay (cuda-convnet)
    label_smoothing: float = 0.0  # cross-entropy label smoothing (0: the paper)
    schedule: str = "plateau"  # plateau: lr / 10 when val top-1 stalls (paper); step; cosine
    patience: int = 5  # plateau: epochs without a better val top-1 before lr / 10 (at most 3 times)
    step_epochs: int = 30  # step: lr / 10 every this many epochs
    warmup_epochs: float = 0.0  # step, cosine: linear warm-up from 0 over this many epochs
    crop_mode: str = "paper"  # paper: random 224 window of 256; random-resized: RandomResizedCrop
    crop: int = 224  # input side in pixels
    lighting: float = 0.1  # std of the PCA-lighting alpha (0: off)
    normalize: str | None = None  # channel | mean-image | torchvision | none (None: see the module docstring)
    backend: str | None = None  # augment backend: dali | torch (default: dali when installed)
    workers: int = 4  # loader worker processes per training process
    device: str = "cuda"  # cuda | cpu
    amp: str = "bf16"  # bf16 | fp16 | off: autocast on CUDA (CPU runs fp32)
    channels_last: bool = False  # NHWC memory format for model and inputs
    compile: bool = False  # torch.compile the model
    seed: int = 0  # seed of order, augmentation, initialisation and dropout
    log_every: int = 10  # steps between loss checks (and stop checks) and progress-bar updates
    checkpoint_minutes: float = 0.0  # also save last.pt mid-epoch this often (0: only after each epoch)

    def __post_init__(self):
        if self.normalize is None:
            paper_input = self.arch == "alexnet" and self.crop_mode == "paper"
            object.__setattr__(self, "normalize", "mean-image" if paper_input else "channel")
        if self.out is None:
            object.__setattr__(self, "out", "runs/" + self.arch.replace(":", "-").replace(".", "-"))
        for name, value, allowed in (("schedule", self.schedule, SCHEDULES), ("crop_mode", self.crop_mode, CROP_MODES),
                                     ("amp", self.amp, AMP), ("device", self.device, DEVICES),
                                     ("normalize", self.normalize, NORMALIZE)):
            if value not in allowed:
                raise ConfigError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
        for name in ("lr", "momentum", "weight_decay", "label_smoothing", "warmup_epochs", "lighting",
                     "checkpoint_minutes"):
            if not math.isfinite(getattr(self, name)):
                raise ConfigError(f"{name} must be a finite number, got {getattr(self, name)}")
        for name in ("epochs", "batch_size", "patience", "step_epochs", "log_every", "crop"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.lr <= 0 or self.weight_decay < 0 or not 0 <= self.momentum < 1:
            raise ConfigError("lr must be positive, weight decay non-negative, momentum in [0, 1)")
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError(f"label smoothing must be in [0, 1), got {self.label_smoothing}")
        for name in ("lighting", "workers", "warmup_epochs", "checkpoint_minutes"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must not be negative, got {getattr(self, name)}")
        self.augment_spec("train")  # the augmentation's own checks (crop mode against normalisation)
        if self.backend is not None and self.backend not in BACKENDS:
            raise ConfigError(f"backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")

    def augment_spec(self, mode: str = "train", layout: str = "NCHW") -> AugmentSpec:
        """The loader's recipe for ``mode`` ("train", "val", "test10"): lighting in training only."""
        return AugmentSpec(mode=mode, crop=self.crop, lighting=self.lighting if mode == "train" else 0,
                           normalize=self.normalize, layout=layout, crop_mode=self.crop_mode)

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})

    def with_(self, **changes) -> "TrainConfig":
        return replace(self, **changes)


def default(name: str):
    """The default of TrainConfig field ``name`` (None for a derived one: see the docstring)."""
    field = next(f for f in fields(TrainConfig) if f.name == name)
    return None if field.default is MISSING else field.default


# Starting values that options given explicitly override. "paper" is the defaults themselves.
PRESETS = {
    "paper": {},
    # About a minute on two CPU cores (with 128-px shards): AlexNet's single column on 112-px
    # windows, batch 16, cosine schedule over 8 epochs. Enough for the generated 4-class set to
    # be learnt; says nothing about ImageNet accuracy.
    "demo": {"arch": "alexnet-owt", "crop": 112, "epochs": 8, "batch_size": 16, "lr": 0.01, "schedule": "cosine",
             "warmup_epochs": 1.0, "workers": 2, "log_every": 5},
}
