"""The benchmark tools still run (tiny sizes; no timing is asserted here)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.timeout(300)  # shard jobs and loader workers run


def test_bench_stats_runs(tmp_path):
    from tools.bench_stats import main

    result = CliRunner().invoke(main, ["--images", "40", "--shard-size", "16", "--workers", "1",
                                       "--markdown", str(tmp_path / "t.md")])
    assert result.exit_code == 0, result.output
    assert "imgprep pca-stats, 1 worker" in (tmp_path / "t.md").read_text()


@pytest.mark.slow
def test_bench_train_runs(tmp_path, monkeypatch):
    from tools.bench_train import main

    monkeypatch.syspath_prepend(os.path.dirname(__file__))  # tiny_models
    result = CliRunner().invoke(main, ["--arch", "tiny_models:tiny", "--batch-size", "4", "--steps", "2",
                                       "--workers", "1", "--backend", "torch", "--markdown", str(tmp_path / "t.md")])
    assert result.exit_code == 0, result.output
    assert "shards -> Loader (torch) -> step" in (tmp_path / "t.md").read_text()


def test_bench_feed_runs_and_ends_with_its_line(tmp_path):
    from tools.bench_feed import main

    result = CliRunner().invoke(main, ["--images", "64", "--batch-size", "16", "--samples", "64",
                                       "--markdown", str(tmp_path / "t.md")])
    assert result.exit_code == 0, result.output
    last = result.output.strip().splitlines()[-1]
    assert re.fullmatch(r"feed vs copy floor: dali (\d+\.\d\dx|n/a), torch \d+\.\d\dx", last), last


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_gpu_check_script_runs_its_steps_on_the_cpu(tmp_path):
    # The GPU machine's time goes to measuring: the script's logic is checked here first.
    result = subprocess.run(["bash", "tools/gpu_check.sh", str(tmp_path / "out"), "--dry-run"], cwd=ROOT,
                            capture_output=True, text=True, timeout=540, env={**os.environ, "PYTHON": sys.executable})
    assert result.returncode == 0, result.stdout + result.stderr
    log = (tmp_path / "out" / "gpu_check.log").read_text()
    for step in ("=== 1. versions", "=== 2. GPU-marked tests", "=== 3-4.", "=== 4b.", "=== 5.", "=== done"):
        assert step in log
    assert "train run: exit 0" in log and "processes of the run left after 3 s: 0" in log
    numbers = json.loads((tmp_path / "out" / "gpu_numbers.json").read_text())
    assert {"loader", "trainer", "device"} <= set(numbers) and len(numbers["trainer"]) == 12
