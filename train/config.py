"""What a training run is: ``TrainConfig``, one frozen dataclass, and its named presets.

The defaults are the paper's recipe (Krizhevsky et al. 2012, with the cuda-convnet code it
used where the text is silent), each written once, here:

- AlexNet with two columns; SGD, momentum 0.9, weight decay 5e-4 on the weights but not the
  biases (cuda-convnet's weight-decay term applies to weights only), batch 128, lr 0.01
  divided by 10 when validation top-1 stops improving, 90 epochs;
- random 224 windows of the 256 images, mirrors, PCA lighting of std 0.1;
- inputs: the paper subtracts the mean image, which its N(0, 0.01) initialisation expects. So
  ``normalize`` left unset becomes "mean-image" for AlexNet with the paper's crops (no
  val_resize, no resolution ramp) and "channel" (per-channel mean and std) otherwise;
- ``out`` left unset becomes runs/<arch>.

Resolution (FFCV's progressive resizing): with ``min_res`` and ``max_res`` set, the training side
of epoch e is

    res(e) = min_res                                        e <= ramp_start
           = max_res                                        e >= ramp_end
           = 32 * round(lerp(min_res, max_res, (e - ramp_start) / (ramp_end - ramp_start)) / 32)

and ``crop`` (with ``val_resize``) is the evaluation side. The "cyclic" schedule is FFCV's
triangle: lr * 1e-4 at the start, lr at ``lr_peak_epoch``, 0 at the end, linear per step.

``train run`` builds one from its options (its --help takes the defaults from here); a
checkpoint stores it as a plain dict, so a resumed run is the same run.
"""

from __future__ import annotations

import math
from dataclasses import MISSING, asdict, dataclass, fields, replace

from augment.spec import BACKENDS, CROP_MODES, NORMALIZE, AugmentSpec
from prep import DEFAULT_SHARDS
from prep.errors import ImgprepError
from train.runlog import LOGGERS

SCHEDULES = ("plateau", "step", "cosine", "cyclic")
AMP = ("bf16", "fp16", "off")
DEVICES = ("cuda", "cpu")
FLOAT32_MAX = 3.4028234663852886e38  # numpy.finfo(numpy.float32).max


class ConfigError(ImgprepError, ValueError):
    """An option, or a combination of options, that cannot work."""


# The TrainConfig fields that the loader's AugmentSpec takes under the same names.
RECIPE = ("crop", "lighting", "normalize", "crop_mode", "val_resize")


@dataclass(frozen=True)
class TrainConfig:
    shards: str = DEFAULT_SHARDS  # shard folder made by `imgprep shard` and `imgprep pca-stats`, or its URL
    cache: str | None = None  # shards at a URL: the local cache folder (None: ~/.cache/imgprep)
    cache_limit: int | None = None  # shards at a URL: bytes the cache may hold (None: all of them)
    out: str | None = None  # run folder: last.pt, best.pt, metrics.jsonl, curves.png (None: runs/<arch>)
    arch: str = "alexnet"  # a train.models.MODELS name, package.module:factory, or a torchvision name
    epochs: int = 90  # passes over the training split
    batch_size: int = 128  # images per step over all processes (each takes batch_size / world)
    lr: float = 0.01  # learning rate of SGD at the start (after warm-up)
    momentum: float = 0.9  # SGD momentum
    weight_decay: float = 5e-4  # L2 penalty, applied by SGD
    no_bias_decay: bool = True  # exempt biases and 1-d parameters from weight decay (cuda-convnet)
    label_smoothing: float = 0.0  # cross-entropy label smoothing (0: the paper)
    schedule: str = "plateau"  # plateau: lr / 10 when val top-1 stalls (paper); step; cosine; cyclic (FFCV)
    lr_peak_epoch: float = 2.0  # cyclic: the epoch at which the rate peaks
    patience: int = 5  # plateau: epochs without a better val top-1 before lr / 10 (at most 3 times)
    step_epochs: int = 30  # step: lr / 10 every this many epochs
    warmup_epochs: float = 0.0  # step, cosine: linear warm-up from 0 over this many epochs
    crop_mode: str = "paper"  # paper: random 224 window of 256; random-resized: RandomResizedCrop
    crop: int = 224  # input side in pixels (with min_res/max_res: the evaluation side only)
    val_resize: int | None = None  # evaluation: shorter side resized to this, then the central crop
    min_res: int | None = None  # training side before the ramp (None: crop, no ramp)
    max_res: int | None = None  # training side after the ramp
    ramp_start: int = 0  # last epoch (0-based) at min_res
    ramp_end: int = 0  # first epoch at max_res
    zero_init_residual: bool = False  # ResNets: the last norm of each block starts at 0
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
    log: tuple = ()  # loggers besides metrics.jsonl and curves.png: train.runlog.LOGGERS names
    checkpoint_minutes: float = 0.0  # also save last.pt mid-epoch this often (0: only after each epoch)

    def __post_init__(self):
        if self.normalize is None:
            paper_input = (self.arch == "alexnet" and self.crop_mode == "paper" and self.val_resize is None
                           and self.min_res is None)
            object.__setattr__(self, "normalize", "mean-image" if paper_input else "channel")
        object.__setattr__(self, "log", tuple(dict.fromkeys(self.log)))  # a checkpoint's list; each once
        unknown = [name for name in self.log if name not in LOGGERS]
        if unknown:
            raise ConfigError(f"log takes {', '.join(LOGGERS)}, got {', '.join(map(repr, unknown))}")
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
        for name in ("lr", "weight_decay"):  # SGD multiplies float32 weights by them
            if getattr(self, name) > FLOAT32_MAX:
                raise ConfigError(f"{name} {getattr(self, name):g} is beyond float32's range (the weights' type)")
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError(f"label smoothing must be in [0, 1), got {self.label_smoothing}")
        self.check_resolution()
        for name in ("lighting", "workers", "warmup_epochs", "checkpoint_minutes", "lr_peak_epoch"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must not be negative, got {getattr(self, name)}")
        for mode in ("train", "val"):  # the augmentation's own checks (crop mode against normalisation)
            self.augment_spec(mode)
        if self.backend is not None and self.backend not in BACKENDS:
            raise ConfigError(f"backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")

    def check_resolution(self) -> None:
        if (self.min_res is None) != (self.max_res is None):
            raise ConfigError("give both ends of the resolution ramp (--res MIN:MAX), or neither")
        if self.min_res is not None and not 1 <= self.min_res <= self.max_res:
            raise ConfigError(f"--res MIN:MAX needs 1 <= MIN <= MAX, got {self.min_res}:{self.max_res}")
        if not 0 <= self.ramp_start <= self.ramp_end:
            raise ConfigError(f"--res-ramp START:END needs 0 <= START <= END, got {self.ramp_start}:{self.ramp_end}")

    def res_at(self, epoch: int) -> int:
        """The training side of ``epoch`` (the module docstring's rule; ``crop`` without a ramp)."""
        if self.min_res is None:
            return self.crop
        if epoch <= self.ramp_start:
            return self.min_res
        if epoch >= self.ramp_end:
            return self.max_res
        fraction = (epoch - self.ramp_start) / (self.ramp_end - self.ramp_start)
        return 32 * round((self.min_res + fraction * (self.max_res - self.min_res)) / 32)

    def largest_res(self) -> int:
        return self.crop if self.max_res is None else self.max_res

    def augment_spec(self, mode: str = "train", layout: str = "NCHW") -> AugmentSpec:
        """The loader's recipe for ``mode`` ("train", "val", "test10"): the RECIPE fields (the
        spec keeps those of its mode; training sides come per epoch from ``res_at``)."""
        return AugmentSpec(mode=mode, layout=layout, **{name: getattr(self, name) for name in RECIPE})

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict, source="the checkpoint") -> "TrainConfig":
        """The config ``source`` (a checkpoint) recorded; a value of the wrong type is one line."""
        known = {f.name for f in fields(cls)}
        try:
            return cls(**{k: v for k, v in values.items() if k in known})
        except (TypeError, ValueError) as error:  # "'<' not supported between 'str' and 'int'"
            raise ConfigError(f"the config recorded in {source} is damaged: {error}") from None

    def with_(self, **changes) -> "TrainConfig":
        return replace(self, **changes)


def default(name: str):
    """The default of TrainConfig field ``name`` (None for a derived one: see the docstring)."""
    field = next(f for f in fields(TrainConfig) if f.name == name)
    return None if field.default is MISSING else field.default


# Starting values that options given explicitly override. "alexnet" (also "paper") is the defaults.
# The ResNet presets are FFCV's published ImageNet configs (libffcv/ffcv-imagenet, rn50_configs and
# rn18_configs): their per-GPU batch times their GPU count is our global batch (rn50: 512 x 8;
# rn18: 1024 x 1); the resolution ramp follows --epochs (``ffcv_ramp``); they evaluate a central
# 224/256 of the shorter side resized to 256, which is our val_resize 292 + crop 256.
FFCV_RESNET = {"crop_mode": "random-resized", "lighting": 0.0, "normalize": "torchvision", "schedule": "cyclic",
               "lr_peak_epoch": 2.0, "momentum": 0.9, "label_smoothing": 0.1, "no_bias_decay": True, "epochs": 16,
               "min_res": 160, "max_res": 192, "crop": 256, "val_resize": 292, "channels_last": True}
PRESETS = {
    "alexnet": {},
    "paper": {},
    # About a minute on two CPU cores (with 128-px shards): AlexNet's single column on 112-px
    # windows, batch 16, cosine schedule over 8 epochs. Enough for the generated 4-class set to
    # be learnt; says nothing about ImageNet accuracy.
    "demo": {"arch": "alexnet-owt", "crop": 112, "epochs": 8, "batch_size": 16, "lr": 0.01, "schedule": "cosine",
             "warmup_epochs": 1.0, "workers": 2, "log_every": 5},
    "resnet50": {**FFCV_RESNET, "arch": "resnet50", "batch_size": 4096, "lr": 1.7, "weight_decay": 1e-4},
    "resnet18": {**FFCV_RESNET, "arch": "resnet18", "batch_size": 1024, "lr": 0.5, "weight_decay": 5e-5},
}

# FFCV's configs: epochs -> (ramp_start, ramp_end) of the 160 -> 192 ramp.
FFCV_RAMPS = {16: (11, 13), 24: (17, 20), 32: (23, 27), 40: (29, 34), 56: (41, 48), 88: (65, 76)}


def ffcv_ramp(epochs: int) -> tuple[int, int]:
    """FFCV's ramp for a run of ``epochs``: its table where it has one; in between (and beyond)
    the neighbouring entries' start and end as fractions of the run, interpolated."""
    if epochs in FFCV_RAMPS:
        return FFCV_RAMPS[epochs]
    known = sorted(FFCV_RAMPS)
    below = max([e for e in known if e < epochs], default=known[0])
    above = min([e for e in known if e > epochs], default=known[-1])
    weight = 0.0 if above == below else (epochs - below) / (above - below)

    def fraction(which: int) -> float:
        return (1 - weight) * FFCV_RAMPS[below][which] / below + weight * FFCV_RAMPS[above][which] / above

    start = min(epochs - 1, max(0, round(fraction(0) * epochs)))
    return start, max(start, min(epochs - 1, round(fraction(1) * epochs)))


def preset_values(preset: str, given: dict) -> dict:
    """The preset's starting values overridden by ``given``; a ResNet preset's ramp follows the
    run's epochs unless --res-ramp was given."""
    values = {**PRESETS[preset], **given}
    if preset in ("resnet50", "resnet18") and "ramp_start" not in given:
        values["ramp_start"], values["ramp_end"] = ffcv_ramp(values["epochs"])
    return values


def open_run_shards(config: TrainConfig):
    """The run's ShardSet: its folder, or its URL through the configured cache."""
    from prep.shards import open_shards

    return open_shards(config.shards, config.cache, config.cache_limit)
