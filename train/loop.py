"""One training run, top to bottom; every process of a data-parallel run executes ``run``.

    train run                                  # AlexNet, the paper's recipe, ./shards
    train run --gpus 2 --epochs 90 --out runs/alexnet
    torchrun --nnodes 2 --nproc-per-node 8 ... -m train run ...

Each epoch: train on this rank's part of the permutation (``augment.Loader``), evaluate this
rank's part of the validation split, sum the counts over ranks, update the learning rate,
and on rank 0 save last.pt (and best.pt when validation top-1 improves), atomically, then
tell the run log (train/runlog.py: the epoch line, metrics.jsonl, curves.png, the loggers).

Stopping from outside: SIGTERM or SIGUSR1 (what SLURM and Kubernetes send before a kill) asks
for a stop. The ranks agree on it at the next check (every ``log_every`` steps, and at the end
of each epoch), rank 0 saves last.pt with the loader's position in the epoch, and the command
exits with PREEMPTED_EXIT; ``train run --resume OUT`` continues at that very step and ends
with the weights an uninterrupted run would have. ``checkpoint_minutes`` saves such a
mid-epoch checkpoint on a clock too, so a ``kill -9`` loses at most that much work. Ctrl-C
stops at once, keeping the last checkpoint. Loaders (and their worker processes) are closed on
every way out.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from augment import Loader
from augment.colour import colour_stats
from augment.sampler import per_rank_batch
from prep.errors import ImgprepError, escaped
from prep.shards import manifest_sha256
from train import dist
from train.checkpoint import (BEST, LAST, load_checkpoint, provenance, restore_rng_states, rng_states,
                              save_checkpoint)
from train.config import TrainConfig, open_run_shards
from train.models import build_model
from train.outputs import RunUpload, local_folder, shown
from train.runlog import RunLog
from train.schedule import Schedule
from train.supervise import StopSignals

PREEMPTED_EXIT = 75  # sysexits' EX_TEMPFAIL: stopped on request, checkpoint saved, resume to continue


class TrainingError(ImgprepError):
    """The run cannot go on (diverged, or cannot resume); the message says why."""


def worker(config: TrainConfig, resume: bool) -> dict:
    """Entry point of each process. Errors propagate (the launcher reports them); the process
    group is left to the process's exit then, so that peers see a failure, not a clean leave."""
    context = dist.setup(config.device)
    with StopSignals() as stop:
        result = run(config, resume, context, stop)
    dist.teardown()
    return result


def make_loaders(config: TrainConfig, context: dist.Context, loaders: contextlib.ExitStack, eval_mode: str = "val",
                 train: bool = True):
    """(train loader or None, validation loader or None) for this rank, each closed by ``loaders``.
    The shard folder is opened, and its colour statistics read, once for both."""
    per_rank = per_rank_batch(config.batch_size, context.world_size)
    layout = "NHWC" if config.channels_last else "NCHW"  # NHWC permuted to NCHW is channels-last memory
    shard_set = open_run_shards(config)
    colour = colour_stats(shard_set.root, config.augment_spec("train" if train else eval_mode))
    common = dict(backend=config.backend, device=context.device.type, rank=context.rank,
                  world_size=context.world_size, seed=config.seed, workers=config.workers, colour=colour)
    train_loader = None
    if train:
        train_loader = loaders.enter_context(
            Loader(shard_set, "train", per_rank, config.augment_spec("train", layout), max_res=config.largest_res(),
                   **common))
    val = None
    if "val" in shard_set.splits and len(shard_set.split("val")):
        # No larger than this rank's share of the split: a batch's buffers are allocated whole,
        # and --batch-size 100000 on nine images must not cost gigabytes.
        share = -(-len(shard_set.split("val")) // context.world_size)
        val = loaders.enter_context(Loader(shard_set, "val", min(per_rank, share), config.augment_spec(eval_mode, layout),
                                           **common))
    return train_loader, val


def autocast(config: TrainConfig, device: torch.device):
    if device.type != "cuda" or config.amp == "off":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16 if config.amp == "bf16" else torch.float16)


def to_model_input(images: torch.Tensor, config: TrainConfig) -> torch.Tensor:
    return images.permute(0, 3, 1, 2) if config.channels_last else images  # NHWC -> NCHW view


def make_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.SGD:
    """SGD with momentum; with no_bias_decay, 1-d parameters (biases, norm scales) skip decay."""
    decay = [p for p in model.parameters() if p.requires_grad and (p.ndim > 1 or not config.no_bias_decay)]
    rest = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1 and config.no_bias_decay]
    groups = [{"params": decay, "weight_decay": config.weight_decay}]
    if rest:
        groups.append({"params": rest, "weight_decay": 0.0})
    return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum)


@dataclass
class Trainee:
    """Everything a checkpoint holds the state of."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    schedule: Schedule
    scaler: torch.amp.GradScaler
    train_loader: Loader
    classes: list
    origin: dict | None
    step: int = 0  # optimizer steps so far, over the whole run
    best: float = float("-inf")  # best val top-1 (or -train loss without a val split)
    finished_epoch: int = -1  # last complete epoch
    finished_metrics: dict | None = None  # its metrics line
    shards_sha256: str | None = None  # of the shards' manifest.json when the run (or its resume) opened them

    def state(self, config: TrainConfig, context, partial: dict | None = None) -> dict:
        """The checkpoint; a collective (every rank's RNG state), so every rank calls it."""
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "schedule": self.schedule.state_dict(), "scaler": self.scaler.state_dict(),
                "epoch": self.finished_epoch, "step": self.step, "best_top1": self.best,
                "rng": dist.gather_objects(rng_states(), context), "loader": self.train_loader.state_dict(),
                "config": config.as_dict(), "world_size": context.world_size, "classes": self.classes,
                "metrics": self.finished_metrics, "partial": partial, "provenance": self.origin,
                "shards_sha256": self.shards_sha256}


def run(config: TrainConfig, resume: bool, context: dist.Context, stop: StopSignals | None = None) -> dict:
    out = local_folder(config.out, config.cache)
    stop = stop or StopSignals()
    with contextlib.ExitStack() as loaders:
        train_loader, val_loader = make_loaders(config, context, loaders)
        shards_sha256 = manifest_sha256(train_loader.shard_set.root)  # resume compares (train.cli.check_same_shards)
        classes = train_loader.shard_set.classes
        torch.manual_seed(config.seed)  # the same initial weights on every rank
        model = build_model(config.arch, len(classes), config.zero_init_residual).to(context.device)
        if config.channels_last:
            model = model.to(memory_format=torch.channels_last)
        if context.device.type == "cuda":
            # Shapes are fixed within an epoch (full batches, one res): cuDNN may time its
            # algorithms once per shape and keep the fastest.
            torch.backends.cudnn.benchmark = True
        optimizer = make_optimizer(model, config)
        trainee = Trainee(model, optimizer, Schedule(optimizer, config, len(train_loader)),
                          torch.amp.GradScaler("cuda", enabled=context.device.type == "cuda" and config.amp == "fp16"),
                          train_loader, classes, provenance() if context.main else None, shards_sha256=shards_sha256)
        torch.manual_seed(config.seed * 1_000_003 + context.rank + 1)  # dropout: each rank its own stream
        partial = restore(trainee, out, context) if resume else None
        runlog = loaders.enter_context(RunLog(config, out, context.main, trainee.origin))
        runlog.open(trainee.step if resume else None, trainee.finished_epoch, trainee.finished_metrics)
        net = model
        if context.world_size > 1:
            net = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[context.local_rank] if context.device.type == "cuda" else None)
        if config.compile:
            net = torch.compile(net)
            evaluator = torch.compile(model)
        else:
            evaluator = model  # evaluation bypasses DDP: ranks may run different numbers of batches
        start_epoch = partial["epoch"] if partial else trainee.finished_epoch + 1
        if context.main:
            print_summary(config, context, model, train_loader, val_loader, start_epoch, partial)
        saver = Saver(trainee, config, context, out, runlog)
        result = trainee.finished_metrics or {}
        for epoch in range(start_epoch, config.epochs):
            started = time.perf_counter()
            if partial and partial["epoch"] == epoch:  # resuming mid-epoch: the loader's place, the loss so far
                train_loader.load_state_dict({**partial, "res": config.res_at(epoch)})
                carried = (partial["loss"][context.rank], partial["count"])
            else:
                train_loader.set_epoch(epoch, res=config.res_at(epoch))
                carried = (0.0, 0)
            train_loss, stopped = train_epoch(net, trainee, config, context, epoch, carried, stop, saver)
            if stopped:
                return saver.preempted(stop, mid_epoch=True)
            metrics = {"epoch": epoch, "step": trainee.step, "train_loss": train_loss, "lr": trainee.schedule.lr,
                       "res": train_loader.res}
            if val_loader is not None:
                val_loader.set_epoch(epoch)
                metrics.update({f"val_{k}": v for k, v in evaluate(evaluator, val_loader, config, context).items()})
            trainee.schedule.after_epoch(metrics.get("val_top1"))
            metrics["seconds"] = time.perf_counter() - started
            score = metrics.get("val_top1", -metrics["train_loss"])  # without a val split: the lowest train loss
            improved, trainee.best = score > trainee.best, max(trainee.best, score)
            trainee.finished_epoch, trainee.finished_metrics = epoch, metrics
            saver.save_epoch(improved)
            runlog.epoch(metrics)
            saver.publish()
            result = metrics
            if dist.sum_all([stop.received is not None], context)[0] and epoch + 1 < config.epochs:
                return saver.preempted(stop, mid_epoch=False)
        return result


def load_weights(model: torch.nn.Module, weights: dict, path, arch: str, classes: int) -> None:
    """``model.load_state_dict(weights)``; weights of another network are one line."""
    try:
        model.load_state_dict(weights)
    except RuntimeError as error:  # missing or unexpected keys, other shapes
        lines = str(error).splitlines()
        reason = lines[1].strip() if len(lines) > 1 else lines[0]
        raise TrainingError(f"the weights in {path} do not fit --arch {arch} with {classes} classes: {reason}") from None


def restore(trainee: Trainee, out: Path, context) -> dict | None:
    """Load last.pt into ``trainee``; returns its mid-epoch part (None after a whole epoch)."""
    state = load_checkpoint(out / LAST)
    if state["world_size"] != context.world_size:
        raise TrainingError(f"{out} was trained with {state['world_size']} processes; resume it with as many "
                            f"(this run has {context.world_size})")
    load_weights(trainee.model, state["model"], out / LAST, state["config"].get("arch", "?"), len(trainee.classes))
    trainee.optimizer.load_state_dict(state["optimizer"])
    trainee.schedule.load_state_dict(state["schedule"])
    trainee.scaler.load_state_dict(state["scaler"])
    trainee.finished_epoch, trainee.step, trainee.best = state["epoch"], state["step"], state["best_top1"]
    trainee.finished_metrics = state["metrics"]
    restore_rng_states(state["rng"][context.rank])
    partial = state.get("partial")
    return {**partial, "seed": trainee.train_loader.seed, "world_size": context.world_size} if partial else None


class Saver:
    """Rank 0 writes; every rank takes part (the checkpoint gathers every rank's RNG state).
    Also keeps the clock of --checkpoint-minutes, holds the run log for the steps, and uploads
    the run folder's files after each save when OUT is a URL."""

    def __init__(self, trainee: Trainee, config: TrainConfig, context, out: Path, runlog: RunLog):
        self.trainee, self.config, self.context, self.out, self.runlog = trainee, config, context, out, runlog
        self.upload = RunUpload(config.out, out)
        self.last_save = time.monotonic()

    def due(self) -> bool:
        """Rank 0's clock says a mid-epoch checkpoint is due (only rank 0's vote counts)."""
        minutes = self.config.checkpoint_minutes
        return bool(minutes) and self.context.main and time.monotonic() - self.last_save >= 60 * minutes

    def save_epoch(self, improved: bool) -> None:
        state = self.trainee.state(self.config, self.context)
        if self.context.main:
            save_checkpoint(self.out / LAST, state)
            if improved:
                save_checkpoint(self.out / BEST, state)
        self.last_save = time.monotonic()

    def save_mid_epoch(self, epoch: int, loss: float, count: int) -> None:
        """last.pt at this step: the loader's place in the epoch and every rank's loss sum so far."""
        position = self.trainee.train_loader.state_dict()["position"]
        partial = {"epoch": epoch, "position": position, "count": count,
                   "loss": dist.gather_objects(loss, self.context)}
        state = self.trainee.state(self.config, self.context, partial)
        if self.context.main:
            save_checkpoint(self.out / LAST, state)
        self.publish()
        self.last_save = time.monotonic()

    def publish(self) -> None:
        if self.context.main:
            self.upload.publish()

    def preempted(self, stop: StopSignals, mid_epoch: bool) -> dict:
        loader = self.trainee.train_loader
        where = (f"in epoch {loader.epoch + 1} at step {loader.position} of {len(loader)}" if mid_epoch
                 else f"after epoch {self.trainee.finished_epoch + 1}")
        return {"preempted": stop.received or "a stop signal on another rank", "where": where,
                "step": self.trainee.step, "checkpoint": shown(self.config.out, LAST)}


def train_epoch(net, trainee: Trainee, config, context, epoch: int, carried: tuple, stop: StopSignals,
                saver: Saver) -> tuple[float, bool]:
    """This rank's training samples of ``epoch`` (from the loader's position on); returns (mean
    loss over all ranks, stopped mid-epoch?). ``carried``: (loss sum, steps) of this rank
    before the loader's position, when resuming mid-epoch."""
    loader, runlog = trainee.train_loader, saver.runlog
    net.train()
    total, count = torch.tensor(carried[0], device=context.device), carried[1]
    runlog.start_epoch(epoch, len(loader), loader.position)
    window_start, window_images = time.perf_counter(), 0
    for images, labels in loader:
        trainee.schedule.before_step(trainee.step)
        loss = train_step(net, images, labels, trainee.optimizer, trainee.scaler, config, context.device)
        total += loss.detach().float()
        count += 1
        trainee.step += 1
        window_images += len(labels) * context.world_size
        if count % config.log_every == 0 or loader.position == len(loader):
            current, stopping, saving = check_step(loss, config, context, epoch, trainee.step, stop, saver)
            rate = window_images / (time.perf_counter() - window_start)
            runlog.step(trainee.step, current, trainee.schedule.lr, rate, loader.res)
            window_start, window_images = time.perf_counter(), 0
            # On the epoch's last step the epoch is finished instead: run() stops after it.
            if (stopping or saving) and loader.position < len(loader):
                saver.save_mid_epoch(epoch, float(total), count)
                if stopping:
                    runlog.close_bar()
                    return float("nan"), True
        runlog.advance()
    runlog.close_bar()
    loss_sum, steps = dist.sum_all([float(total), count], context)
    return loss_sum / max(steps, 1), False


def train_step(net, images, labels, optimizer, scaler, config: TrainConfig, device) -> torch.Tensor:
    """Forward, cross-entropy, backward, SGD update; returns the loss (a device tensor)."""
    with autocast(config, device):
        loss = F.cross_entropy(net(to_model_input(images, config)), labels, label_smoothing=config.label_smoothing)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return loss


def check_step(loss: torch.Tensor, config: TrainConfig, context, epoch: int, step: int, stop: StopSignals,
               saver: Saver) -> tuple[float, bool, bool]:
    """(loss as a float, stop now?, save now?), agreed by every rank in one all-reduce. Stops
    every rank together when any rank's loss is NaN or infinite."""
    value = float(loss.detach())
    bad, stopping, saving = dist.sum_all([0.0 if math.isfinite(value) else 1.0, stop.received is not None,
                                          saver.due()], context)
    if bad:
        saved = (local_folder(config.out, config.cache) / LAST).is_file()
        kept = f"the last good checkpoint is {shown(config.out, LAST)}" if saved else "no checkpoint was saved before it"
        raise TrainingError(f"loss is {value} at epoch {epoch + 1}, step {step}: stopped; {kept} "
                            "(lower --lr, or check the data with imgprep preview)")
    return value, bool(stopping), bool(saving)


def evaluate(model, loader, config: TrainConfig, context) -> dict:
    """top-1, top-5 and loss over this rank's part of the split, summed over ranks. Ten-crop
    batches [B, 10, 3, H, W] average the softmax of the ten views, as the paper does."""
    model.eval()
    correct1 = correct5 = loss_sum = count = 0.0
    with torch.no_grad(), autocast(config, context.device):
        for images, labels in loader:
            views = images.shape[1] if images.dim() == 5 else 1
            flat = to_model_input(images.flatten(0, 1) if views > 1 else images, config)
            probabilities = model(flat).float().softmax(-1).view(len(labels), views, -1).mean(1)
            top = probabilities.topk(min(5, probabilities.shape[-1]), dim=-1).indices
            correct1 += float((top[:, 0] == labels).sum())
            correct5 += float((top == labels[:, None]).any(-1).sum())
            loss_sum += float(F.nll_loss(probabilities.clamp_min(1e-12).log(), labels, reduction="sum"))
            count += len(labels)
    correct1, correct5, loss_sum, count = dist.sum_all([correct1, correct5, loss_sum, count], context)
    return {"top1": correct1 / count, "top5": correct5 / count, "loss": loss_sum / count, "count": int(count)}


def print_summary(config, context, model, train_loader, val_loader, start_epoch, partial) -> None:
    parameters = sum(p.numel() for p in model.parameters())
    gpu = f" ({torch.cuda.get_device_name()})" if context.device.type == "cuda" else ""
    print(f"train run: {config.arch}, {parameters:,} parameters, {context.world_size} x {context.device.type}{gpu}, "
          f"backend {train_loader.backend}, amp {config.amp if context.device.type == 'cuda' else 'off'}")
    print(escaped("config: " + " ".join(f"{k}={v}" for k, v in config.as_dict().items())))  # a resume's comes from a file
    where = "from scratch"
    if partial:
        where = f"resuming in epoch {partial['epoch'] + 1} at step {partial['position']} of {len(train_loader)}"
    elif start_epoch:
        where = f"resuming after epoch {start_epoch}"
    print(f"data: {len(train_loader.reader):,} train images, {len(train_loader)} steps of {config.batch_size} "
          f"per epoch; {len(val_loader.reader) if val_loader else 0:,} val images; {where}", flush=True)
