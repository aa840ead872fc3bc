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
TINY = ["--arch", "tiny_models:tiny"]  # a run over an import-path network names it again to resume or evaluate
pytestmark = pytest.mark.timeout(600)  # runs start processes: a hang must fail, not block


def train(*args, check=True):
    result = subprocess.run([sys.executable, "-m", "train", *map(str, args)], capture_output=True, text=True, env=ENV,
                            timeout=300)
    if check:
        assert result.returncode == 0, result.stdout + result.stderr
    return result


def weights(run: Path) -> dict:
    return torch.load(run / "last.pt", weights_only=True)["model"]


def invoke(*args):
    from train.cli import main

    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_weights(stats_shards, tmp_path):
    args = ["run", stats_shards, "--arch", "tiny_models:tiny_dropout", "--epochs", "3", *FAST]
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
    assert len((out / "metrics.jsonl").read_text().splitlines()) < 3  # really interrupted
    result = train("run", "--resume", out, "--arch", "tiny_models:tiny_dropout", "--device", "cpu")
    assert "resuming after epoch" in result.stdout
    whole, resumed = weights(tmp_path / "whole"), weights(out)
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
    epochs = [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [0, 1, 2]


@pytest.mark.slow
def test_eval_counts_every_val_image_once_with_two_processes(stats_shards, tmp_path):
    out = tmp_path / "run"
    train("run", stats_shards, "--arch", "tiny_models:tiny", "--epochs", "1", *FAST, "--out", out)
    for extra in ([], ["--ten-crop"]):
        result = train("eval", out / "best.pt", *TINY, "--nproc", "2", "--device", "cpu", "--backend", "torch",
                       "--workers", "0", "--batch-size", "6", *extra)
        assert "over 16 images" in result.stdout, result.stdout
        assert ("10 crops" in result.stdout) == bool(extra)


@pytest.mark.slow
def test_random_resized_crops_and_eval_with_a_batch_larger_than_the_training_split(stats_shards, tmp_path):
    out = tmp_path / "run"
    # Random-resized crops make the default normalisation per-channel, even for the paper's AlexNet.
    train("run", stats_shards, "--arch", "tiny_models:tiny", "--epochs", "1", *FAST, "--crop-mode", "random-resized",
          "--out", out)
    assert torch.load(out / "last.pt", weights_only=True)["config"]["normalize"] == "channel"
    result = train("eval", out / "last.pt", *TINY, "--device", "cpu", "--backend", "torch", "--workers", "0")
    assert "over 16 images" in result.stdout  # --batch-size 128 > the 60 training images: eval needs none


@pytest.mark.slow
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


@pytest.mark.slow
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
    (["run", "{shards}", "--device", "cpu", "--batch-size", "1000"], "batch size 1000 is larger than the 60 images of split 'train'"),
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


@pytest.mark.slow
def test_existing_run_and_resume_changes_are_refused(stats_shards, tmp_path):
    out = tmp_path / "run"
    train("run", stats_shards, "--arch", "tiny_models:tiny", "--epochs", "1", *FAST, "--out", out)
    result = invoke("run", stats_shards, "--arch", "tiny_models:tiny", *FAST, "--out", out)
    assert result.exit_code == 1 and f"already holds a run: continue it with --resume {out}" in result.output
    result = invoke("run", "--resume", out, *TINY, "--device", "cpu", "--lr", "0.5")
    assert result.exit_code == 1 and "only --epochs, --workers, --backend, --checkpoint-minutes, --cache, --log may change (not lr)" in result.output


# ----------------------------------------------------------------------------- the recipe, stated once

def test_the_defaults_are_the_papers_recipe():
    from train.config import TrainConfig

    config = TrainConfig()
    # Krizhevsky et al. 2012, section 5: batch 128, momentum 0.9, weight decay 0.0005, lr 0.01
    # divided by 10 when validation error stops improving, about 90 epochs; section 4.1: 224
    # windows of the 256 images, mirrors, PCA lighting of std 0.1; the mean image subtracted.
    assert (config.arch, config.batch_size, config.momentum, config.weight_decay, config.lr) == \
        ("alexnet", 128, 0.9, 5e-4, 0.01)
    assert (config.schedule, config.epochs, config.crop, config.crop_mode, config.lighting) == \
        ("plateau", 90, 224, "paper", 0.1)
    assert config.normalize == "mean-image" and config.no_bias_decay and config.out == "runs/alexnet"
    # the derived rule: other networks and crops get per-channel normalisation
    assert TrainConfig(arch="alexnet-owt").normalize == "channel"
    assert TrainConfig(crop_mode="random-resized").normalize == "channel"
    assert TrainConfig(arch="pkg.nets:net").out == "runs/pkg-nets-net"
    spec = TrainConfig().augment_spec("val")
    assert (spec.mode, spec.lighting, spec.normalize, spec.crop) == ("val", 0, "mean-image", 224)


@pytest.mark.parametrize("no_bias_decay", [True, False])
def test_biases_skip_weight_decay_as_in_cuda_convnet(no_bias_decay):
    from train.config import TrainConfig
    from train.loop import make_optimizer
    from train.models import build_model

    model = build_model("alexnet", 10)
    groups = make_optimizer(model, TrainConfig(no_bias_decay=no_bias_decay)).param_groups
    decayed = {id(p) for g in groups if g["weight_decay"] == 5e-4 for p in g["params"]}
    biases = [p for name, p in model.named_parameters() if name.endswith(".bias")]
    weights_ = [p for name, p in model.named_parameters() if name.endswith(".weight")]
    assert len(biases) == 8 and all(id(p) in decayed for p in weights_)
    assert all((id(p) in decayed) != no_bias_decay for p in biases)


def test_help_shows_the_configs_defaults():
    text = " ".join(invoke("run", "--help").output.split())  # unwrapped
    assert "[default: 0.0005]" in text and "[default: plateau]" in text and "[default: 90]" in text


@pytest.mark.slow
def test_published_weights_evaluate_like_the_checkpoint_they_came_from(stats_shards, tmp_path):
    # A run trained with torchvision's normalisation; its bare state_dict is what a published
    # weights file is. Both evaluate to the same numbers.
    out = tmp_path / "run"
    train("run", stats_shards, "--arch", "tiny_models:tiny", "--epochs", 1, *FAST, "--normalize", "torchvision",
          "--out", out)
    bare = tmp_path / "weights.pth"
    torch.save(torch.load(out / "last.pt", weights_only=True)["model"], bare)
    common = ["--device", "cpu", "--workers", "2", "--batch-size", "8"]  # the default loader: DALI, workers
    from_run = train("eval", out / "last.pt", *TINY, *common).stdout.split(": val ")[1]
    from_weights = train("eval", bare, "--arch", "tiny_models:tiny", "--shards", stats_shards, *common)
    assert from_weights.stdout.split(": val ")[1] == from_run
    without_arch = train("eval", bare, "--shards", stats_shards, *common, check=False)
    assert without_arch.returncode == 1 and "name the network with --arch" in without_arch.stderr
    wrong = train("eval", bare, "--arch", "alexnet-owt", "--shards", stats_shards, *common, check=False)
    assert wrong.returncode == 1 and "do not fit --arch alexnet-owt with 4 classes" in wrong.stderr
