"""Per-epoch metrics: one JSON line each in metrics.jsonl, and a PNG of the curves."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from prep.atomic import atomic_path
from prep.errors import ImgprepError


def append_metrics(run: Path, record: dict) -> None:
    """One line, in one write to a file opened for appending: a kill cannot interleave it with
    another; a full disk can still cut it short, which ``read_metrics`` then drops."""
    fd = os.open(Path(run) / "metrics.jsonl", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (json.dumps(record) + "\n").encode("utf-8"))
    finally:
        os.close(fd)


def rewrite_metrics(run: Path, records: list[dict]) -> None:
    with atomic_path(Path(run) / "metrics.jsonl") as tmp:
        Path(tmp).write_text("".join(json.dumps(r) + "\n" for r in records))


def read_metrics(run: Path) -> list[dict]:
    """The records of RUN/metrics.jsonl. A last line cut short (a kill -9 or a full disk while it
    was appended) is dropped, saying so: the checkpoint, not this file, is the run's state, and
    a resume rewrites the file from it. Damage anywhere else is one line naming the file."""
    path = Path(run) / "metrics.jsonl"
    if not path.is_file():
        return []
    text = path.read_text(encoding="utf-8", errors="replace")
    lines = text.split("\n")
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError("not an object")
        except ValueError as error:
            if number == len(lines):  # no newline after it: the line was being written
                print(f"note: the last line of {path} was cut short (the run was stopped while writing it); "
                      "dropped", file=sys.stderr)
                break
            raise ImgprepError(f"{path} is damaged at line {number} ({error}); the checkpoints are not: "
                               "move the file away and resume") from None
        records.append(record)
    return records


def plot_curves(run: Path) -> Path:
    """curves.png: training loss, validation top-1/top-5 and learning rate against epoch."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no display needed

    records = read_metrics(run)
    epochs = [r["epoch"] + 1 for r in records]
    figure = Figure(figsize=(12, 3.6), layout="constrained")
    loss, accuracy, lr = figure.subplots(1, 3)
    loss.plot(epochs, [r["train_loss"] for r in records], marker="o", label="train")
    if any("val_loss" in r for r in records):
        loss.plot(epochs, [r.get("val_loss") for r in records], marker="o", label="val")
    loss.set(title="loss", xlabel="epoch")
    loss.legend()  # "train" is always there
    for key, name in (("val_top1", "top-1"), ("val_top5", "top-5")):
        if any(key in r for r in records):
            accuracy.plot(epochs, [100 * r[key] if key in r else None for r in records], marker="o", label=name)
    accuracy.set(title="validation accuracy (%)", xlabel="epoch", ylim=(0, 100))
    if accuracy.lines:
        accuracy.legend()
    lr.plot(epochs, [r["lr"] for r in records], marker="o")
    lr.set(title="learning rate", xlabel="epoch", yscale="log")
    path = Path(run) / "curves.png"
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=90)
    return path
