"""``train run --log tensorboard --log wandb``: what each logger holds, read back with its own
reader (TensorBoard's event accumulator; for W&B, its offline run file parsed here from the
record format it documents), against metrics.jsonl; a resume continues both; a missing
package is one line."""

import json
import struct
from pathlib import Path

import pytest

from test_train import ENV, FAST, TINY, invoke, train

pytestmark = pytest.mark.timeout(600)
EPOCH_TAGS = {"train_loss": "epoch/train_loss", "lr": "epoch/lr", "val_top1": "val/top1", "val_top5": "val/top5",
              "val_loss": "val/loss"}


def tensorboard_scalars(folder: Path) -> dict:
    """{tag: [(step, value), ...]} over every event file of ``folder``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: [(s.step, s.value) for s in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def wandb_records(path: Path):
    """The protobuf records of a W&B run file: a 7-byte header (":W&B", magic 0xBEE1, version),
    then LevelDB's log format: 32 KiB blocks of chunks, each a 7-byte header (crc32c, length,
    type: 1 whole, 2 first, 3 middle, 4 last), a block's tail under 7 bytes being padding."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    position, pieces = 7, b""
    while position + 7 <= len(data):
        left = 32768 - position % 32768
        _, length, kind = struct.unpack("<IHB", data[position:position + 7]) if left >= 7 else (0, 0, 0)
        if kind == 0:  # padding to the end of the block
            position += left
            continue
        chunk = data[position + 7:position + 7 + length]
        position += 7 + length
        pieces = chunk if kind in (1, 2) else pieces + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pieces)
            yield record


def wandb_history(run: Path) -> tuple[list[dict], list[str], dict]:
    """(history rows, run ids, config) over every offline W&B run of ``run``."""
    rows, ids, config = [], [], {}
    for path in sorted(run.glob("wandb/offline-run-*/run-*.wandb")):
        for record in wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)  # "a/b": nested
                             for item in record.history.item})
            elif kind == "run":  # the run's start, its config with it
                ids.append(record.run.run_id)
                config.update({item.key: json.loads(item.value_json) for item in record.run.config.update})
    return rows, ids, config


@pytest.mark.slow
def test_tensorboard_and_wandb_hold_the_metrics_and_a_resume_continues_them(stats_shards, tmp_path, monkeypatch):
    pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed")
    pytest.importorskip("wandb", reason="the wandb extra is not installed")
    monkeypatch.setitem(ENV, "WANDB_MODE", "offline")  # no account, no network
    out = tmp_path / "run"
    train("run", stats_shards, *TINY, "--epochs", "1", *FAST, "--out", out, "--log", "tensorboard", "--log", "wandb")
    train("run", "--resume", out, *TINY, "--device", "cpu", "--epochs", "2", "--log", "tensorboard", "--log", "wandb")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [0, 1]

    scalars = tensorboard_scalars(out / "tensorboard")
    for key, tag in EPOCH_TAGS.items():  # float32 in the event files
        assert [step for step, _ in scalars[tag]] == [r["step"] for r in records], tag
        assert [value for _, value in scalars[tag]] == pytest.approx([r[key] for r in records], rel=1e-6), tag
    assert [step for step, _ in scalars["train/loss"]] == [7, 14]  # each epoch's last step (7 of 8 images)
    assert scalars["train/res"] == [(7, 224.0), (14, 224.0)]  # the first step logged by each process

    rows, ids, config = wandb_history(out)
    assert len(set(ids)) == 1 and len(ids) == 2  # the resume continued the same W&B run
    assert (out / "wandb-run-id").read_text().strip() == ids[0]
    epoch_rows = [row for row in rows if "epoch/train_loss" in row]
    assert [row["_step"] for row in epoch_rows] == [r["step"] for r in records]
    for key, tag in EPOCH_TAGS.items():  # JSON: exact
        assert [row[tag] for row in epoch_rows] == [r[key] for r in records], tag
    assert config["arch"] == "tiny_models:tiny" and config["epochs"] == 2  # the resume's config last


def test_a_logger_whose_package_is_missing_is_one_line(stats_shards, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    result = invoke("run", stats_shards, *TINY, *FAST, "--out", tmp_path / "run", "--log", "wandb")
    assert result.exit_code == 1
    [line] = result.output.strip().splitlines()
    assert line.startswith("Error: --log wandb needs the wandb package: pip install 'imgprep[wandb]'")
    assert not (tmp_path / "run" / "last.pt").exists()  # refused before training started
