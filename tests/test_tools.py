"""The benchmark tools still run (tiny sizes; no timing is asserted here)."""

import os

from click.testing import CliRunner


def test_bench_stats_runs(tmp_path):
    from tools.bench_stats import main

    result = CliRunner().invoke(main, ["--images", "40", "--shard-size", "16", "--workers", "1",
                                       "--markdown", str(tmp_path / "t.md")])
    assert result.exit_code == 0, result.output
    assert "imgprep pca-stats, 1 worker" in (tmp_path / "t.md").read_text()


def test_bench_train_runs(tmp_path, monkeypatch):
    from tools.bench_train import main

    monkeypatch.syspath_prepend(os.path.dirname(__file__))  # tiny_models
    result = CliRunner().invoke(main, ["--arch", "tiny_models:tiny", "--batch-size", "4", "--steps", "2",
                                       "--workers", "1", "--backend", "torch", "--markdown", str(tmp_path / "t.md")])
    assert result.exit_code == 0, result.output
    assert "shards -> Loader (torch) -> step" in (tmp_path / "t.md").read_text()
