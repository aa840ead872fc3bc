"""What a training run is: ``TrainConfig``, one frozen dataclass, and its named presets.

The defaults are the paper's recipe. ``train run`` builds one from its options; a checkpoint
stores it as a plain dict, so a resumed run is the same run.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace

from prep.errors import ImgprepError

SCHEDULES = ("plateau", "step", "cosine")
CROP_MODES = ("paper", "random-resized")
AMP = ("bf16", "fp16", "off")


class ConfigError(ImgprepError, ValueError):
    """An option, or a combination of options, that cannot work."""


@dataclass(frozen=True)
class TrainConfig:
    shards: str = "shards"  # shard folder made by `imgprep shard` and `imgprep pca-stats`
    out: str = "runs/alexnet"  # run folder: last.pt, best.pt, metrics.jsonl, curves.png
    arch: str = "alexnet"  # a train.models.MODELS name, package.module:factory, or a torchvision name
    epochs: int = 90  # passes over the training split
    batch_size: int = 128  # images per step over all processes (each takes batch_size / world)
    lr: float = 0.01  # learning rate of SGD at the start (after warm-up)
    momentum: float = 0.9  # SGD momentum
    weight_decay: float = 5e-4  # L2 penalty, applied by SGD
    no_bias_decay: bool = False  # exempt biases and 1-d parameters from weight decay
    label_smoothing: float = 0.0  # cross-entropy label smoothing (0: the paper)
    schedule: str = "plateau"  # plateau: lr / 10 when val top-1 stalls (paper); step; cosine
    patience: int = 5  # plateau: epochs without a better val top-1 before lr / 10 (at most 3 times)
    step_epochs: int = 30  # step: lr / 10 every this many epochs
    warmup_epochs: float = 0.0  # step, cosine: linear warm-up from 0 over this many epochs
    crop_mode: str = "paper"  # paper: random 224 window of 256; random-resized: RandomResizedCrop
    crop: int = 224  # input side in pixels
    lighting: float = 0.1  # std of the PCA-lighting alpha (0: off)
    normalize: str = "channel"  # channel | mean-image (the paper: subtract the mean image)
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
        for name, value, allowed in (("schedule", self.schedule, SCHEDULES), ("crop_mode", self.crop_mode, CROP_MODES),
                                     ("amp", self.amp, AMP), ("device", self.device, ("cuda", "cpu")),
                                     ("normalize", self.normalize, ("channel", "mean-image", "none"))):
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
        if self.crop_mode == "random-resized" and self.normalize == "mean-image":
            raise ConfigError("--crop-mode random-resized resizes its windows, so the mean image cannot be cut to "
                              "match: use --normalize channel")

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})

    def with_(self, **changes) -> "TrainConfig":
        return replace(self, **changes)


def paper() -> dict:
    """Krizhevsky et al.: the defaults, stated."""
    return {}


def demo() -> dict:
    """About a minute on two CPU cores (with 128-px shards): AlexNet's single column on
    112-px windows, batch 16, cosine schedule over 8 epochs. Enough for the generated
    4-class set to be learnt; says nothing about ImageNet accuracy."""
    return {"arch": "alexnet-owt", "crop": 112, "epochs": 8, "batch_size": 16, "lr": 0.01, "schedule": "cosine",
            "warmup_epochs": 1.0, "workers": 2, "log_every": 5}


PRESETS = {"paper": paper, "demo": demo}
