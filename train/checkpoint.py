"""Checkpoints: everything a run needs to continue exactly, written atomically, read safely.

A checkpoint holds the unwrapped, uncompiled model (plain state_dict keys, no ``module.`` or
``_orig_mod.`` prefix), the optimizer, the learning-rate schedule, the gradient scaler, epoch
and step, every rank's RNG states, the loader position, the config, and what produced it
(git revision, library versions, GPU). It is read with ``weights_only=True``: no pickled code.
"""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

import torch

from prep.atomic import atomic_path
from prep.errors import PrepError

LAST, BEST = "last.pt", "best.pt"


def save_checkpoint(path, state: dict) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise PrepError(f"no checkpoint at {path}")
    return torch.load(path, map_location="cpu", weights_only=True)


def rng_states() -> dict:
    """This process's random states: torch CPU and CUDA (dropout, initialisation), Python's."""
    import random

    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
            "python": random.getstate()}


def restore_rng_states(states: dict) -> None:
    import random

    torch.set_rng_state(states["torch"])
    if states["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])
    random.setstate(tuple(s if not isinstance(s, list) else tuple(s) for s in states["python"]))


def provenance() -> dict:
    """What made a result: git revision, library versions, the GPU."""
    try:
        revision = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                                  cwd=Path(__file__).resolve().parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        revision = None
    versions = {"python": platform.python_version(), "torch": str(torch.__version__)}  # plain str: weights_only
    try:
        from nvidia import dali

        versions["dali"] = str(dali.__version__)
    except ImportError:
        pass
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {"git": revision, "versions": versions, "gpu": gpu, "host": platform.node(), "pid": os.getpid()}
