"""The learning rate over a run, as a small object with a state_dict.

    plateau (the paper): lr0 until validation top-1 has not improved for `patience` epochs,
                         then lr / 10; at most three times (lr0 -> lr0 / 1000)
    step:    lr0 * 0.1 ** floor(epoch / step_epochs)
    cosine:  lr0 * (1 + cos(pi * t)) / 2, t the fraction of the run after warm-up
    warm-up (step, cosine): the rate above times min(1, (step + 1) / warm-up steps)
    cyclic (FFCV):  piecewise linear in t = step / steps per epoch through (0, 1e-4 lr0),
                    (lr_peak_epoch, lr0) and (epochs, 0)

step and cosine are set before every optimizer step; plateau changes only between epochs.
"""

from __future__ import annotations

import math

from train.config import TrainConfig

MAX_REDUCTIONS = 3


def cyclic_rate(epoch: float, lr: float, peak: float, epochs: int) -> float:
    if epoch <= peak:
        return lr * (1e-4 + (1 - 1e-4) * epoch / peak) if peak > 0 else lr
    return lr * max(0.0, (epochs - epoch) / (epochs - peak)) if epochs > peak else 0.0


class Schedule:
    def __init__(self, optimizer, config: TrainConfig, steps_per_epoch: int):
        self.optimizer, self.config, self.steps_per_epoch = optimizer, config, steps_per_epoch
        self.lr = config.lr
        self.best = -1.0  # plateau: best validation top-1 so far
        self.stalled = 0  # plateau: epochs since it improved
        self.reductions = 0  # plateau: times divided by 10
        self._apply()

    def rate(self, step: int) -> float:
        """Learning rate of optimizer step ``step`` (0-based, counted over the whole run)."""
        config = self.config
        if config.schedule == "plateau":
            return self.lr
        epoch = step / self.steps_per_epoch
        if config.schedule == "cyclic":
            return cyclic_rate(epoch, config.lr, config.lr_peak_epoch, config.epochs)
        warmup = config.warmup_epochs * self.steps_per_epoch
        factor = min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
        if config.schedule == "step":
            return config.lr * factor * 0.1 ** math.floor(epoch / config.step_epochs)
        progress = max(0.0, step - warmup) / max(1.0, config.epochs * self.steps_per_epoch - warmup)
        return config.lr * factor * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    def before_step(self, step: int) -> None:
        if self.config.schedule != "plateau":
            self.lr = self.rate(step)
            self._apply()

    def after_epoch(self, top1: float | None) -> None:
        """Plateau bookkeeping with this epoch's validation top-1 (None: no validation split)."""
        if self.config.schedule != "plateau" or top1 is None:
            return
        if top1 > self.best:
            self.best, self.stalled = top1, 0
            return
        self.stalled += 1
        if self.stalled >= self.config.patience and self.reductions < MAX_REDUCTIONS:
            self.lr, self.stalled, self.reductions = self.lr / 10, 0, self.reductions + 1
            self._apply()

    def _apply(self) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr

    def state_dict(self) -> dict:
        return {"lr": self.lr, "best": self.best, "stalled": self.stalled, "reductions": self.reductions}

    def load_state_dict(self, state: dict) -> None:
        self.lr, self.best, self.stalled, self.reductions = state["lr"], state["best"], state["stalled"], state["reductions"]
        self._apply()
