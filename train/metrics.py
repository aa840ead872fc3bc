"""Per-epoch metrics: one JSON line each in metrics.jsonl, and a PNG of the curves."""

from __future__ import annotations

import json
from pathlib import Path

from prep.atomic import atomic_path


def append_metrics(run: Path, record: dict) -> None:
    with open(Path(run) / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def rewrite_metrics(run: Path, records: list[dict]) -> None:
    with atomic_path(Path(run) / "metrics.jsonl") as tmp:
        Path(tmp).write_text("".join(json.dumps(r) + "\n" for r in records))


def read_metrics(run: Path) -> list[dict]:
    path = Path(run) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


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
