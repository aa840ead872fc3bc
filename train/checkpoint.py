"""Checkpoints: everything a run needs to continue exactly, written atomically, read safely.

A checkpoint holds the unwrapped, uncompiled model (plain state_dict keys, no ``module.`` or
``_orig_mod.`` prefix), the optimizer, the learning-rate schedule, the gradient scaler, epoch
and step, every rank's RNG states, the loader position, the config, and what produced it
(git revision, library versions, GPU). It is read with ``weights_only=True``: no pickled code.
"""

from __future__ import annotations

import os
import pickle
import platform
import shutil
import subprocess
import zipfile
from pathlib import Path

import torch

from prep.atomic import atomic_path, no_space
from prep.errors import ImgprepError
from prep.shards import MANIFEST, manifest_sha256

LAST, BEST = "last.pt", "best.pt"


def save_checkpoint(path, state: dict) -> None:
    """Atomically (a kill leaves the previous file whole); a full disk is one line."""
    try:
        with atomic_path(path) as tmp:
            torch.save(state, tmp)
    except (OSError, RuntimeError) as error:  # torch reports a failed write as a bare RuntimeError
        folder = Path(path).parent
        if no_space(error) or shutil.disk_usage(folder).free < tensor_bytes(state):
            raise CheckpointError(f"no space left on {folder} to save {Path(path).name}; the previous checkpoint "
                                  "is kept: free space, then train run --resume") from None
        raise


def tensor_bytes(value) -> int:
    """Bytes of the tensors in a (nested) state: about what its checkpoint takes on disk."""
    if isinstance(value, torch.Tensor):
        return value.nbytes
    if isinstance(value, dict):
        return sum(tensor_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(tensor_bytes(v) for v in value)
    return 0


NEEDED = {"model": dict, "config": dict, "classes": list, "epoch": int, "world_size": int}  # what every reader uses
RESUMED = {"optimizer": dict, "schedule": dict, "scaler": dict, "step": int, "best_top1": (int, float), "rng": list,
           "loader": dict}  # and what a resume uses besides


class CheckpointError(ImgprepError):
    """A checkpoint is missing, damaged, or not one of ours."""


def load_checkpoint(path) -> dict:
    """The checkpoint at ``path``, read with weights_only=True (tensors and plain values only:
    a file that holds anything else is refused, never run). Each way it can be unusable is one
    sentence naming the file."""
    path = Path(path)
    return _checked(path, _read(path), {**NEEDED, **RESUMED})


def load_for_eval(path) -> dict:
    """A train checkpoint, or published weights: a plain state_dict of tensors (torchvision's
    model files are such), returned as {"model": state_dict} with nothing else."""
    path = Path(path)
    state = _read(path)
    if isinstance(state, dict) and state and all(isinstance(v, torch.Tensor) for v in state.values()):
        return {"model": state}
    return _checked(path, state)


def check_same_shards(state: dict, root, path, otherwise: str) -> None:
    """Refuse, with one line ending in ``otherwise``, to continue or evaluate the checkpoint at
    ``path`` on ROOT when ROOT's manifest.json is not the one its run read (re-sharded with
    another seed, another folder at that path): its labels or its epochs would silently differ.
    Checkpoints from before this was recorded, and a folder without a manifest (which opening
    it reports), pass."""
    recorded = state.get("shards_sha256")
    if not isinstance(recorded, str) or not (Path(root) / MANIFEST).is_file():
        return
    if manifest_sha256(root) != recorded:
        raise CheckpointError(f"{root} holds other shards than {path} was trained on (its manifest.json has "
                              f"changed since: re-sharded, or another folder at that path); {otherwise}")


def _checked(path: Path, state, fields: dict = NEEDED) -> dict:
    """``state`` if it has each of ``fields`` with its type; else one line saying which."""
    missing = [key for key in NEEDED if not isinstance(state, dict) or key not in state]
    if missing:
        raise CheckpointError(f"{path} is not a train checkpoint: it lacks {', '.join(missing)}")
    wrong = [f"{key} ({type(state.get(key)).__name__})" for key, kind in fields.items()
             if not isinstance(state.get(key), kind) or isinstance(state.get(key), bool)]
    if not wrong and not (state["world_size"] >= 1 and state["epoch"] >= -1):
        wrong = [f"world_size {state['world_size']}, epoch {state['epoch']}"]
    if wrong:
        raise CheckpointError(f"{path} is damaged or not ours: wrongly typed or out of range: {', '.join(wrong)}")
    return state


def _read(path: Path):
    """torch.load(weights_only=True) of ``path``, each failure one CheckpointError."""
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (its save was cut short?)")
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive; its end is read first
        raise CheckpointError(f"checkpoint {path} is damaged (truncated or corrupt): it is not a complete "
                              "torch.save archive")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # torch's own message suggests weights_only=False, which would run the file's code.
        raise CheckpointError(f"checkpoint {path} holds objects other than tensors and plain values; refusing "
                              "to load it (loading such objects can run code)") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise CheckpointError(f"checkpoint {path} is damaged (truncated or corrupt): {reason}") from None
    return state


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
