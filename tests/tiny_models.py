"""Small CNNs for the trainer's tests, reached as --arch tiny_models:<factory>."""

import os

import torch
from torch import nn


class Tiny(nn.Module):
    def __init__(self, num_classes: int, dropout: float = 0.0, nan_after: int | None = None):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, kernel_size=5, stride=4)
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(8 * 4 * 4, num_classes)
        self.nan_after = nan_after
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        x = self.dropout(torch.flatten(self.pool(torch.relu(self.conv(x))), 1))
        logits = self.fc(x)
        if self.training:
            self.calls += 1
            if self.nan_after is not None and self.calls > self.nan_after:
                logits = logits * float("nan")
        return logits


def tiny(num_classes):
    return Tiny(num_classes)


def tiny_dropout(num_classes):
    return Tiny(num_classes, dropout=0.3)


def tiny_nan_after_8(num_classes):
    return Tiny(num_classes, nan_after=8)


class FailsOnRank1(Tiny):
    """Raises on its 4th training step in the process of rank 1 (a data error, or a bug)."""

    def __init__(self, num_classes: int, error):
        super().__init__(num_classes)
        self.error = error

    def forward(self, x):
        logits = super().forward(x)
        if self.training and os.environ.get("RANK") == "1" and self.calls > 3:
            raise self.error
        return logits


def tiny_data_error_on_rank_1(num_classes):
    from prep.errors import ShardFormatError

    return FailsOnRank1(num_classes, ShardFormatError("shard train/train-00001.h5 cannot be read (injected)"))


def tiny_bug_on_rank_1(num_classes):
    return FailsOnRank1(num_classes, RuntimeError("an injected bug"))


def tiny_nan_after_2(num_classes):
    return Tiny(num_classes, nan_after=2)
