"""``train run`` and ``train eval`` on the CPU: outputs, data parallelism with gloo, exact
resume, evaluation counts, divergence, and the error cases."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

TESTS = Path(__file__).resolve().parent
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
FAST = ["--device", "cpu", "--backend", "torch", "--workers", "0", "--batch-size", "8"]


def train(*args, check=True):
    result = subprocess.run([sys.executable, "-m", "train", *map(str, args)], capture_output=True, text=True, env=ENV,
                            timeout=600)
    if check:
        assert result.returncode == 0, result.stdout + result.stderr
    return result


def weights(run: Path) -> dict:
    return torch.load(run / "last.pt", weights_only=True)["model"]


def invoke(*args):
    from train.cli import main

    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_run_writes_checkpoints_metrics_and_curves(stats_shards, tmp_path):
    out = tmp_path / "run"
    result = train("run", stats_shards, "--arch", "tiny_models:tiny", "--epochs", "2", *FAST, "--out", out)
    assert "train run: tiny_models:tiny" in result.stdout and "config: shards=" in result.stdout
    assert "epoch 1/2  train loss" in result.stdout and "epoch 2/2" in result.stdout and "val top-1" in result.stdout
    for name in ("last.pt", "best.pt", "metrics.jsonl", "curves.png"):
        assert (out / name).is_file(), name
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [0, 1] and records[1]["val_count"] == 16
    state = torch.load(out / "last.pt", weights_only=True)
    assert state["epoch"] == 1 and state["step"] == 2 * (60 // 8)
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in state["model"])
    assert state["config"]["arch"] == "tiny_models:tiny" and state["world_size"] == 1
    assert state["provenance"]["versions"]["torch"] == torch.__version__
    assert len(state["rng"]) == 1 and state["classes"][0]["wnid"] == "n01440764"


def test_one_process_and_two_gloo_processes_train_the_same_weights(stats_shards, tmp_path):
    # The same global batches (the sampler cuts each global batch across ranks) and DDP's
    # gradient average give the same SGD steps; the tiny model has no dropout.
    for nproc in (1, 2):
        train("run", stats_shards, "--arch", "tiny_models:tiny", "--epochs", "2", *FAST, "--nproc", nproc,
              "--out", tmp_path / f"n{nproc}")
    one, two = weights(tmp_path / "n1"), weights(tmp_path / "n2")
    assert one.keys() == two.keys()
    for key in one:
        torch.testing.assert_close(one[key], two[key], rtol=1e-5, atol=1e-6)


def test_killed_run_resumes_to_the_same_weights(stats_shards, tmp_path):
    args = ["run", stats_shards, "--arch", "tiny_models:tiny_dropout", "--epochs", "4", *FAST]
    train(*args, "--out", tmp_path / "whole")
    out = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, "-m", "train", *map(str, args), "--out", str(out)], env=ENV,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while not ((out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").read_text().strip()):
        assert process.poll() is None and time.time() < deadline
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert len((out / "metrics.jsonl").read_text().splitlines()) < 4  # really interrupted
    result = train("run", "--resume", out, "--device", "cpu")
    assert "resuming after epoch" in result.stdout
    whole, resumed = weights(tmp_path / "whole"), weights(out)
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
    epochs = [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [0, 1, 2, 3]


def test_eval_counts_every_val_image_once_with_two_processes(stats_shards, tmp_path):
    out = tmp_path / "run"
    train("run", stats_shards, "--arch", "tiny_models:tiny", "--epochs", "1", *FAST, "--out", out)
    for extra in ([], ["--ten-crop"]):
        result = train("eval", out / "best.pt", "--nproc", "2", "--device", "cpu", "--backend", "torch",
                       "--workers", "0", "--batch-size", "6", *extra)
        assert "over 16 images" in result.stdout, result.stdout
        assert ("10 crops" in result.stdout) == bool(extra)


def test_random_resized_crops_and_eval_with_a_batch_larger_than_the_training_split(stats_shards, tmp_path):
    out = tmp_path / "run"
    # Random-resized crops make the default normalisation per-channel, even for the paper's AlexNet.
    train("run", stats_shards, "--arch", "tiny_models:tiny", "--epochs", "1", *FAST, "--crop-mode", "random-resized",
          "--out", out)
    assert torch.load(out / "last.pt", weights_only=True)["config"]["normalize"] == "channel"
    result = train("eval", out / "last.pt", "--device", "cpu", "--backend", "torch", "--workers", "0")
    assert "over 16 images" in result.stdout  # --batch-size 128 > the 60 training images: eval needs none


def test_a_run_without_validation_keeps_its_lowest_loss_as_best(tmp_path):
    from helpers import run_cli as imgprep
    from prep.stats import compute_stats
    from tools.fake_imagenet import make_fake_imagenet

    src = make_fake_imagenet(tmp_path / "src", classes=2, train_per_class=12, val_per_class=0, awkward=False,
                             large_fraction=0)
    assert imgprep(["shard", str(src), "--out", str(tmp_path / "shards"), "--quiet"]).exit_code == 0
    compute_stats(tmp_path / "shards", progress=False)
    result = train("run", tmp_path / "shards", "--arch", "tiny_models:tiny", "--epochs", "1", *FAST,
                   "--schedule", "cosine", "--out", tmp_path / "run")
    assert "val top-1" not in result.stdout and (tmp_path / "run" / "best.pt").is_file()


def test_diverging_loss_stops_with_one_line_and_keeps_the_last_good_checkpoint(stats_shards, tmp_path):
    out = tmp_path / "run"
    # The model turns its output into NaN from its 9th training step: the second epoch.
    result = train("run", stats_shards, "--arch", "tiny_models:tiny_nan_after_8", "--epochs", "3", *FAST,
                   "--out", out, check=False)
    assert result.returncode == 1
    assert "loss is nan at epoch 2" in result.stderr and "last good checkpoint" in result.stderr
    assert "Traceback" not in result.stderr
    assert torch.load(out / "last.pt", weights_only=True)["epoch"] == 0
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1


@pytest.mark.parametrize("args,message", [
    (["run", "/no/such/shards", "--device", "cpu"], "does not exist"),
    (["run", "{shards}", "--device", "cpu", "--nproc", "3", "--batch-size", "8"], "does not divide over 3 processes"),
    (["run", "{shards}", "--device", "cpu", "--arch", "nope"], "unknown --arch 'nope': use alexnet, alexnet-owt"),
    (["run", "{shards}", "--gpus", "64"], "--gpus 64, but this machine has"),
    (["run", "{shards}", "--device", "cpu", "--batch-size", "1000"], "larger than the 60 training images"),
    (["run", "{shards}", "--device", "cpu", "--batch-size", "8", "--lighting", "-1"], "lighting must not be negative"),
    (["run", "{shards}", "--device", "cpu", "--batch-size", "8", "--crop-mode", "random-resized", "--normalize",
      "mean-image"], "use --normalize channel"),
])
def test_errors_are_one_line(stats_shards, args, message):
    result = invoke(*[a.format(shards=stats_shards) for a in args])
    assert result.exit_code != 0 and message in result.output, result.output
    assert "Traceback" not in result.output


def test_statistics_errors_name_the_command(fresh_copy, stats_shards, tmp_path):
    result = invoke("run", fresh_copy, "--device", "cpu", "--batch-size", "8", "--out", tmp_path / "a")
    assert result.exit_code == 1 and f"run 'imgprep pca-stats {fresh_copy}'" in result.output
    stale = tmp_path / "stale"
    import shutil

    shutil.copytree(stats_shards, stale)
    manifest = json.loads((stale / "manifest.json").read_text())
    manifest["rejected"] += 1
    (stale / "manifest.json").write_text(json.dumps(manifest))
    result = invoke("run", stale, "--device", "cpu", "--batch-size", "8", "--out", tmp_path / "b")
    assert result.exit_code == 1 and "was computed from other shards" in result.output


def test_existing_run_and_resume_changes_are_refused(stats_shards, tmp_path):
    out = tmp_path / "run"
    train("run", stats_shards, "--arch", "tiny_models:tiny", "--epochs", "1", *FAST, "--out", out)
    result = invoke("run", stats_shards, "--arch", "tiny_models:tiny", *FAST, "--out", out)
    assert result.exit_code == 1 and f"already holds a run: continue it with --resume {out}" in result.output
    result = invoke("run", "--resume", out, "--device", "cpu", "--lr", "0.5")
    assert result.exit_code == 1 and "only --epochs, --workers, --backend, --checkpoint-minutes may change (not lr)" in result.output
