"""What a run tells people, in one place: rank 0's ``RunLog``.

Every ``log_every`` steps, ``step`` puts the loss, learning rate and images/s on the progress bar
and sends them to each logger. After each epoch, ``epoch`` prints the epoch line, appends the
metrics.jsonl record, redraws curves.png and sends the epoch's figures to each logger. Checkpoints
are the Saver's business (train/loop.py); this file writes no state a resume needs.

Loggers (``train run --log NAME``, several allowed) are ``Logger``s: ``scalars(step, values)``
and ``close(failed)``. Each gets the config and the run's provenance once, when it opens. The x
axis is the optimizer step over the whole run; scalar names:

    train/loss  train/lr  train/images_per_s  train/res     every log_every steps (res: when it changes)
    epoch/train_loss  epoch/lr  epoch/res  epoch/seconds  epoch    after each epoch
    val/top1  val/top5  val/loss                                   after each epoch with a val split

To add a logger: a class with those two methods, a name in ``LOGGERS``, its package in
pyproject's extras, and a branch in ``open_logger``.
"""

from __future__ import annotations

import importlib.util
import json
import secrets
from pathlib import Path
from typing import Protocol

from prep.atomic import atomic_path, no_space
from prep.errors import ImgprepError
from train.metrics import append_metrics, plot_curves, read_metrics, rewrite_metrics

LOGGERS = {"tensorboard": "tensorboard", "wandb": "wandb"}  # --log name -> the package it needs
EPOCH_SCALARS = {"train_loss": "epoch/train_loss", "lr": "epoch/lr", "res": "epoch/res", "seconds": "epoch/seconds",
                 "epoch": "epoch", "val_top1": "val/top1", "val_top5": "val/top5", "val_loss": "val/loss"}


class LoggerError(ImgprepError):
    """A logger cannot be used (its package is missing, its service refused the run)."""


def check_loggers(names) -> None:
    """One line for the first logger whose package is not installed; nothing is imported."""
    for name in names:
        if name not in LOGGERS:
            raise LoggerError(f"--log takes {', '.join(LOGGERS)}; got {name!r}")
        if importlib.util.find_spec(LOGGERS[name]) is None:
            raise LoggerError(f"--log {name} needs the {LOGGERS[name]} package: pip install 'imgprep[{name}]'")


class Logger(Protocol):
    def scalars(self, step: int, values: dict[str, float]) -> None: ...

    def close(self, failed: bool) -> None: ...


class TensorBoardLogger:
    """Event files in RUN/tensorboard. A resume purges the events past its checkpoint's step
    (written after the last save by the run that was stopped), so each step has one value."""

    def __init__(self, run: Path, header: dict, resumed_step: int | None):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: events at that step and beyond are hidden; the checkpoint's own step stays.
        purge = None if resumed_step is None else resumed_step + 1
        self.writer = SummaryWriter(str(run / "tensorboard"), purge_step=purge)
        if resumed_step is None:
            self.writer.add_text("run", "```\n" + json.dumps(header, indent=1, default=str) + "\n```", 0)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()  # a reader (or a kill) sees each step's values

    def close(self, failed: bool) -> None:
        self.writer.close()


class WandbLogger:
    """A Weights & Biases run, its files under RUN/wandb (``WANDB_MODE=offline`` keeps them there
    for ``wandb sync``). The run id is kept in RUN/wandb-run-id, so that ``--resume`` continues
    the same W&B run; steps at or below the last one W&B has are not logged again."""

    def __init__(self, run: Path, header: dict, resumed_step: int | None):
        import wandb

        id_file = run / "wandb-run-id"
        run_id = id_file.read_text().strip() if resumed_step is not None and id_file.is_file() else None
        run_id = run_id or secrets.token_hex(4)  # W&B's ids are short lowercase alphanumerics
        try:
            self.run = wandb.init(dir=str(run), id=run_id, resume="allow", name=run.name, config=header["config"],
                                  settings=wandb.Settings(console="off", quiet=True,
                                                                        x_disable_stats=True))
        except Exception as error:  # wandb's own errors have no common base: UsageError, CommError, ...
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise LoggerError(f"--log wandb: {reason} (log in with 'wandb login', or set WANDB_MODE=offline)") from None
        self.run.summary["provenance"] = header["provenance"]
        with atomic_path(id_file) as tmp:
            Path(tmp).write_text(run_id + "\n")
        self.after = resumed_step if resumed_step is not None else -1

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if step > self.after:
            self.run.log(values, step=step)

    def close(self, failed: bool) -> None:
        self.run.finish(exit_code=1 if failed else 0)


def open_logger(name: str, run: Path, header: dict, resumed_step: int | None) -> Logger:
    if name == "tensorboard":
        return TensorBoardLogger(run, header, resumed_step)
    return WandbLogger(run, header, resumed_step)


class RunLog:
    """Rank 0's account of the run (on other ranks every method does nothing). A context manager:
    the loggers are closed on every way out, a failed run marked as one."""

    def __init__(self, config, run: Path, main: bool, provenance: dict | None):
        self.config, self.main, self.provenance = config, main, provenance
        self.run = run  # the local run folder (train/outputs.py)
        self.loggers: list[Logger] = []
        self.bar = None
        self.logged_res = None

    def open(self, resumed_step: int | None = None, finished_epoch: int = -1, finished_metrics: dict | None = None):
        """Opens the loggers; on a resume, metrics.jsonl is cut back to the checkpoint's epochs
        first (it may hold one the checkpoint does not: a kill between the two writes)."""
        if not self.main:
            return self
        if resumed_step is not None:
            kept = [r for r in read_metrics(self.run) if r["epoch"] < finished_epoch]
            rewrite_metrics(self.run, kept + ([finished_metrics] if finished_metrics else []))
        check_loggers(self.config.log)
        header = {"config": self.config.as_dict(), "provenance": self.provenance}
        for name in self.config.log:
            self.loggers.append(open_logger(name, self.run, header, resumed_step))
        return self

    def __enter__(self) -> "RunLog":
        return self

    def __exit__(self, kind, error, traceback) -> None:
        self.close_bar()
        for logger in self.loggers:
            logger.close(failed=kind is not None and not issubclass(kind, SystemExit))
        self.loggers = []

    def start_epoch(self, epoch: int, steps: int, position: int) -> None:
        """The epoch's progress bar (on a terminal only: logs get the epoch lines)."""
        from tqdm import tqdm

        self.close_bar()
        self.bar = tqdm(total=steps, initial=position, desc=f"epoch {epoch + 1}/{self.config.epochs}", unit="step",
                        disable=None if self.main else True, dynamic_ncols=True, leave=False)

    def advance(self) -> None:
        self.bar.update(1)

    def close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def step(self, step: int, loss: float, lr: float, images_per_s: float, res: int) -> None:
        if not self.main:
            return
        self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", img_s=f"{images_per_s:,.0f}")
        values = {"train/loss": loss, "train/lr": lr, "train/images_per_s": images_per_s}
        if res != self.logged_res:
            values["train/res"], self.logged_res = res, res
        self.send(step, values)

    def epoch(self, metrics: dict) -> None:
        """The epoch line, metrics.jsonl, curves.png and the loggers (after the checkpoint)."""
        if not self.main:
            return
        self.close_bar()
        try:
            append_metrics(self.run, metrics)
            plot_curves(self.run)
        except OSError as error:
            if no_space(error):
                raise LoggerError(f"no space left on {self.run} for metrics.jsonl and curves.png; last.pt is "
                                  "saved: free space, then train run --resume") from None
            raise
        self.send(metrics["step"], {tag: metrics[key] for key, tag in EPOCH_SCALARS.items() if key in metrics})
        print(epoch_line(metrics, self.config), flush=True)

    def send(self, step: int, values: dict) -> None:
        for logger in self.loggers:
            logger.scalars(step, values)


def epoch_line(metrics: dict, config) -> str:
    line = f"epoch {metrics['epoch'] + 1}/{config.epochs}  train loss {metrics['train_loss']:.4f}"
    if "val_top1" in metrics:
        line += f"  val top-1 {100 * metrics['val_top1']:.2f}%  top-5 {100 * metrics['val_top5']:.2f}%"
    return line + f"  lr {metrics['lr']:.2e}  res {metrics.get('res', config.crop)}  {metrics['seconds']:.0f} s"
