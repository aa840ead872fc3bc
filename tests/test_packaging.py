"""The packages import from this repository, and the command lines start without heavy imports."""

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.timeout(120)  # the entry points run as processes


@pytest.mark.parametrize("name", ["prep", "augment", "train", "tools"])
def test_package_comes_from_this_repository(name):
    # "train" and "tools" are common names: another installed package must not shadow ours.
    module = importlib.import_module(name)
    assert Path(module.__file__).resolve().parent == REPO / name


def test_help_imports_nothing_heavy():
    code = ("import sys, prep.cli, train.cli; "
            "print(sorted(m for m in ('torch', 'h5py', 'numpy', 'PIL', 'simplejpeg') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_console_entry_points_run():
    result = subprocess.run([sys.executable, "-m", "prep.cli", "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.startswith("imgprep ")
