"""`make demo` (quick form): the whole pipeline runs and the model learns well above chance."""

import subprocess
import sys

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def test_quick_demo_learns(tmp_path):
    result = subprocess.run([sys.executable, "-m", "tools.demo", "--quick", "--out", str(tmp_path / "demo")],
                            capture_output=True, text=True, timeout=840)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    top1 = float(result.stdout.split("ten-crop val top-1 ")[1].split("%")[0])
    assert top1 >= 75, result.stdout[-2000:]  # four classes: chance is 25%
    for artefact in ("shards/manifest.json", "shards/stats.json", "preview.png", "run/curves.png", "run/best.pt"):
        assert (tmp_path / "demo" / artefact).is_file(), artefact
