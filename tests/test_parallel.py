"""The path users get: several processes, the default loader (DALI, worker processes), and
every way a run ends. Each command runs in its own process group with a timeout; after it,
no process of that group may be left running."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch

from augment.loader import dali_available
from helpers import assert_group_ends, living_members, run_command

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not dali_available(), reason="the default backend needs DALI"),
              pytest.mark.timeout(600)]

TESTS = Path(__file__).resolve().parent
README = TESTS.parent / "README.md"
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
# The defaults users get: no --backend (DALI), worker processes.
DEFAULT_PATH = ["--device", "cpu", "--workers", "2", "--batch-size", "8"]


def train(*args, timeout=300, env=ENV):
    result, group = run_command([sys.executable, "-m", "train", *args], env=env, timeout=timeout)
    assert_group_ends(group)
    return result


def weights(run: Path) -> dict:
    return torch.load(run / "last.pt", weights_only=True)["model"]


def same_weights(a: dict, b: dict, exact: bool = True) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if exact:
            assert torch.equal(a[key], b[key]), key
        else:
            torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)


def two_process_run(stats_shards, out: Path, epochs: int) -> None:
    result = train("run", stats_shards, "--arch", "tiny_models:tiny", "--epochs", epochs, "--nproc", 2,
                   *DEFAULT_PATH, "--out", out)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 x cpu, backend dali" in result.stdout and f"epoch {epochs}/{epochs}" in result.stdout
    assert len((out / "metrics.jsonl").read_text().splitlines()) == epochs


def test_two_processes_with_dali_workers_train_and_end(stats_shards, tmp_path):
    two_process_run(stats_shards, tmp_path / "run", epochs=2)


def test_two_processes_evaluate_ten_crops_with_dali_workers(stats_shards, tmp_path):
    # Trained for one epoch by two processes: a run that ends after its first epoch ends too.
    out = tmp_path / "run"
    two_process_run(stats_shards, out, epochs=1)
    result = train("eval", out / "best.pt", "--arch", "tiny_models:tiny", "--ten-crop", "--nproc", 2, "--device", "cpu", "--workers", 2,
                   "--batch-size", 6)
    assert result.returncode == 0, result.stderr
    assert "over 16 images (10 crops)" in result.stdout


@pytest.mark.parametrize("debug", [False, True], ids=["one line", "IMGPREP_DEBUG"])
def test_a_data_error_on_one_rank_ends_every_process_with_one_line(stats_shards, tmp_path, debug):
    result = train("run", stats_shards, "--arch", "tiny_models:tiny_data_error_on_rank_1", "--epochs", 2,
                   "--nproc", 2, *DEFAULT_PATH, "--out", tmp_path / "run",
                   env={**ENV, "IMGPREP_DEBUG": "1"} if debug else ENV)
    assert result.returncode == 1
    if not debug:
        assert result.stderr.strip().splitlines() == [
            "Error: rank 1: shard train/train-00001.h5 cannot be read (injected)  (IMGPREP_DEBUG=1 shows the traceback)"]
    else:  # the rank's own traceback, where the error was raised, then the launcher's
        rank_part = result.stderr.split("rank 1:\n", 1)[1]
        assert "in forward" in rank_part.split("Traceback", 2)[1]
        assert "ShardFormatError: shard train/train-00001.h5 cannot be read (injected)" in rank_part
        assert "RankError: rank 1: shard train/train-00001.h5 cannot be read" in result.stderr


def test_a_bug_on_one_rank_shows_its_traceback_once(stats_shards, tmp_path):
    result = train("run", stats_shards, "--arch", "tiny_models:tiny_bug_on_rank_1", "--epochs", 2,
                   "--nproc", 2, *DEFAULT_PATH, "--out", tmp_path / "run")
    assert result.returncode == 1
    assert result.stderr.count("Traceback") == 1 and "RuntimeError: an injected bug" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("Error: rank 1 failed with the error above")


def start_in_group(args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "train", *map(str, args)], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def wait_for_epochs(out: Path, process: subprocess.Popen, epochs: int, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    metrics = out / "metrics.jsonl"
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= epochs):
        assert process.poll() is None, process.communicate()
        if time.time() > deadline:  # say where it stands, then end it: a hang must not outlive the test
            members = "\n".join(living_members(process.pid))
            os.killpg(process.pid, signal.SIGKILL)
            stdout, stderr = process.communicate()
            pytest.fail(f"no epoch within {timeout} s; processes:\n{members}\nstdout:\n{stdout}\nstderr:\n{stderr}")
        time.sleep(0.05)


def preemptible_run(stats_shards) -> list:
    # Batch 2: 30 steps an epoch, checked every 10, so the stop lands inside an epoch: the second,
    # a ramp epoch (training sides 128, 192, 224), so the resumed part must keep its side.
    return ["run", stats_shards, "--arch", "tiny_models:tiny_dropout", "--epochs", 3, "--nproc", 2,
            "--device", "cpu", "--workers", 2, "--batch-size", 2, "--res", "128:224", "--res-ramp", "0:2"]


@pytest.fixture(scope="module")
def unstopped_run(stats_shards, tmp_path_factory) -> Path:
    """The run the preempted ones must end equal to, made once for every stop signal."""
    out = tmp_path_factory.mktemp("unstopped") / "run"
    assert train(*preemptible_run(stats_shards), "--out", out).returncode == 0
    return out


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGUSR1])
def test_preempted_run_saves_mid_epoch_and_resumes_to_the_same_weights(stats_shards, unstopped_run, tmp_path, stop):
    args = preemptible_run(stats_shards)
    out = tmp_path / "stopped"
    process = start_in_group([*args, "--out", out])
    wait_for_epochs(out, process, 1)
    time.sleep(0.3)  # into epoch 2
    os.killpg(process.pid, stop)  # as a scheduler does: every process of the job
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 75, stderr
    assert f"stopped by {stop.name}" in stderr and f"continue with 'train run --resume {out} --arch tiny_models:tiny_dropout'" in stderr
    assert_group_ends(process.pid)
    if stop == signal.SIGUSR1:
        return  # from here on the two signals take one path: the SIGTERM case resumes (half this test's time)
    state = torch.load(out / "last.pt", weights_only=True)
    assert state["partial"] is None or 0 < state["partial"]["position"] < 30
    # The process count comes from the checkpoint; the network, an import path, from the user.
    result = train("run", "--resume", out, "--arch", "tiny_models:tiny_dropout", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert "resuming" in result.stdout
    same_weights(weights(unstopped_run), weights(out))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(row["epoch"], row["res"]) for row in rows] == [(0, 128), (1, 192), (2, 224)]


def test_ctrl_c_ends_every_process(stats_shards, tmp_path):
    out = tmp_path / "run"
    process = start_in_group(["run", stats_shards, "--arch", "tiny_models:tiny", "--epochs", 50, "--nproc", 2,
                              *DEFAULT_PATH, "--out", out])
    wait_for_epochs(out, process, 1)
    os.killpg(process.pid, signal.SIGINT)  # what a terminal does on Ctrl-C
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130 and stderr.strip().splitlines()[-1] == "interrupted", stderr
    assert_group_ends(process.pid)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def readme_torchrun() -> list[str]:
    """The launcher part of README's multi-node command: everything before ``train run``."""
    block = re.search(r"```bash\n(# the same command on every node.*?)```", README.read_text(), flags=re.S).group(1)
    command = " ".join(line.strip().rstrip("\\") for line in block.splitlines() if not line.startswith("#"))
    launcher, _ = command.split(" -m train run ")
    return launcher.split()


def test_two_nodes_train_the_weights_of_one_process(stats_shards, tmp_path):
    # Two torchrun agents on this machine stand for two nodes: README's command, with HOST this
    # machine, one process a node, and our own training options after `-m train run`.
    options = ["--arch", "tiny_models:tiny", "--epochs", 2, *DEFAULT_PATH]
    assert train("run", stats_shards, *options, "--out", tmp_path / "one").returncode == 0
    launcher = " ".join(readme_torchrun())
    launcher = launcher.replace("HOST:29400", f"localhost:{free_port()}").replace("--nproc-per-node 8",
                                                                                  "--nproc-per-node 1")
    launcher = launcher.replace("--rdzv-id alexnet", f"--rdzv-id {uuid.uuid4().hex}").split()
    assert launcher[0] == "torchrun"
    command = [sys.executable, "-m", "torch.distributed.run", *launcher[1:], "-m", "train", "run", stats_shards,
               *map(str, options), "--out", tmp_path / "two"]
    nodes = [subprocess.Popen(command, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              start_new_session=True) for _ in range(2)]
    try:
        outputs = [node.communicate(timeout=300) for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                os.killpg(node.pid, signal.SIGKILL)
    for node, (stdout, stderr) in zip(nodes, outputs):
        assert node.returncode == 0, stdout + stderr
        assert_group_ends(node.pid)
    assert "2 x cpu, backend dali" in outputs[0][0] + outputs[1][0]
    same_weights(weights(tmp_path / "one"), weights(tmp_path / "two"), exact=False)
