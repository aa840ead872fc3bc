"""What tests share besides fixtures: running the CLI and commands, an independent image
reference, and checks that no process outlives a test."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import time

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image


def run_cli(args):
    from prep.cli import main

    return CliRunner().invoke(main, args, catch_exceptions=False)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def pil_reference(data: bytes, size: int = 256, policy: str = "crop") -> np.ndarray:
    """Independent reference: Pillow full decode, antialiased Lanczos resize, central crop."""
    image = Image.open(io.BytesIO(data)).convert("RGB")
    width, height = image.size
    if policy == "squash":
        return np.asarray(image.resize((size, size), Image.LANCZOS))
    if width >= height:
        new_w, new_h = round(width * size / height), size
    else:
        new_w, new_h = size, round(height * size / width)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return np.asarray(image.resize((new_w, new_h), Image.LANCZOS).crop((left, top, left + size, top + size)))


# ----------------------------------------------------------------------------- processes

def living_members(group: int) -> list[str]:
    """'pid command' of the processes still running in process group ``group`` (zombies, which
    only wait for a parent to collect their exit status, do not count)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                command = f.read().replace(b"\0", b" ").decode(errors="replace")[:120]
        except OSError:
            continue
        state, pgrp = fields[0], int(fields[2])
        if pgrp == group and state != "Z":
            found.append(f"{entry} {command}")
    return found


def assert_group_ends(group: int, seconds: float = 10) -> None:
    """Every process of ``group`` is gone within ``seconds``."""
    deadline = time.time() + seconds
    while living_members(group) and time.time() < deadline:
        time.sleep(0.2)
    assert not living_members(group), living_members(group)


def run_command(args, env=None, timeout: float = 300):
    """Run a command in its own process group; returns (CompletedProcess, group id). A hang
    kills the whole group and fails the test."""
    process = subprocess.Popen([str(a) for a in args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=env, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(f"{' '.join(map(str, args))} did not end within {timeout} s:\n{stdout}\n{stderr}")
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr), process.pid
