"""One training run, top to bottom; every process of a data-parallel run executes ``run``.

    train run                                  # AlexNet, the paper's recipe, ./shards
    train run --gpus 2 --epochs 90 --out runs/alexnet
    torchrun --nnodes 2 --nproc-per-node 8 ... -m train run ...

Each epoch: train on this rank's part of the permutation (``augment.Loader``), evaluate this
rank's part of the validation split, sum the counts over ranks, update the learning rate,
and on rank 0 log a line, append metrics.jsonl, redraw curves.png and save last.pt (and
best.pt when validation top-1 improves), atomically.
"""

from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from augment import AugmentSpec, Loader
from prep.errors import PrepError
from prep.shards import open_shards
from train import dist
from train.checkpoint import BEST, LAST, load_checkpoint, provenance, restore_rng_states, rng_states, save_checkpoint
from train.config import TrainConfig
from train.metrics import append_metrics, plot_curves, read_metrics, rewrite_metrics
from train.models import build_model
from train.schedule import Schedule


class TrainingError(PrepError):
    """The run cannot go on (diverged, or cannot resume); the message says why."""


def worker(config: TrainConfig, resume: bool) -> dict:
    """Entry point of each process; known errors come back as {"error": message}."""
    context = dist.setup(config.device)
    try:
        return run(config, resume, context)
    except PrepError as error:  # "fix the input": one line; anything else keeps its traceback
        return {"error": str(error)}
    finally:
        dist.teardown()


def make_loaders(config: TrainConfig, context: dist.Context, eval_mode: str = "val", train: bool = True):
    """(train loader or None, validation loader or None) for this rank."""
    if config.batch_size % context.world_size:
        raise TrainingError(f"--batch-size {config.batch_size} does not divide over {context.world_size} processes")
    per_rank = config.batch_size // context.world_size
    layout = "NHWC" if config.channels_last else "NCHW"  # NHWC permuted to NCHW is channels-last memory
    common = dict(backend=config.backend, device=context.device.type, rank=context.rank,
                  world_size=context.world_size, seed=config.seed, workers=config.workers)
    train_spec = AugmentSpec(mode="train", crop=config.crop, lighting=config.lighting, normalize=config.normalize,
                             layout=layout, crop_mode=config.crop_mode)
    train = Loader(config.shards, "train", per_rank, train_spec, **common) if train else None
    val = None
    shard_set = open_shards(config.shards)
    if "val" in shard_set.splits and len(shard_set.split("val")):
        val_spec = AugmentSpec(mode=eval_mode, crop=config.crop, lighting=0, normalize=config.normalize, layout=layout)
        val = Loader(config.shards, "val", per_rank, val_spec, **common)
    return train, val


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


def run(config: TrainConfig, resume: bool, context: dist.Context) -> dict:
    out = Path(config.out)
    train_loader, val_loader = make_loaders(config, context)
    classes = open_shards(config.shards).classes
    torch.manual_seed(config.seed)  # the same initial weights on every rank
    model = build_model(config.arch, len(classes)).to(context.device)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(model, config)
    schedule = Schedule(optimizer, config, len(train_loader))
    scaler = torch.amp.GradScaler("cuda", enabled=context.device.type == "cuda" and config.amp == "fp16")
    torch.manual_seed(config.seed * 1_000_003 + context.rank + 1)  # dropout: each rank its own stream
    start_epoch, step, best = 0, 0, float("-inf")
    if resume:
        state = load_checkpoint(out / LAST)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        scaler.load_state_dict(state["scaler"])
        start_epoch, step, best = state["epoch"] + 1, state["step"], state["best_top1"]
        if state["world_size"] != context.world_size:
            raise TrainingError(f"{out} was trained with {state['world_size']} processes; resume it with as many "
                                f"(this run has {context.world_size})")
        restore_rng_states(state["rng"][context.rank])
        if context.main:  # metrics.jsonl may hold epochs the checkpoint does not (a kill in between)
            rewrite_metrics(out, [r for r in read_metrics(out) if r["epoch"] < state["epoch"]] + [state["metrics"]])
    net = model
    if context.world_size > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[context.local_rank] if context.device.type == "cuda" else None)
    if config.compile:
        net = torch.compile(net)
        evaluator = torch.compile(model)
    else:
        evaluator = model  # evaluation bypasses DDP: ranks may run different numbers of batches
    origin = provenance() if context.main else None
    if context.main:
        print_summary(config, context, model, train_loader, val_loader, start_epoch)
    result = {}
    for epoch in range(start_epoch, config.epochs):
        started = time.perf_counter()
        train_loader.set_epoch(epoch)
        train_loss, step = train_epoch(net, train_loader, optimizer, schedule, scaler, config, context, epoch, step)
        metrics = {"epoch": epoch, "step": step, "train_loss": train_loss, "lr": schedule.lr}
        if val_loader is not None:
            val_loader.set_epoch(epoch)
            metrics.update({f"val_{k}": v for k, v in evaluate(evaluator, val_loader, config, context).items()})
        schedule.after_epoch(metrics.get("val_top1"))
        metrics["seconds"] = time.perf_counter() - started
        score = metrics.get("val_top1", -metrics["train_loss"])  # without a val split: the lowest train loss
        improved, best = score > best, max(best, score)
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
                 "scaler": scaler.state_dict(), "epoch": epoch, "step": step, "best_top1": best,
                 "rng": dist.gather_objects(rng_states(), context), "loader": train_loader.state_dict(),
                 "config": config.as_dict(), "world_size": context.world_size, "classes": classes,
                 "metrics": metrics, "provenance": origin}
        if context.main:
            save_checkpoint(out / LAST, state)
            if improved:
                save_checkpoint(out / BEST, state)
            append_metrics(out, metrics)
            plot_curves(out)
            print(epoch_line(metrics, config), flush=True)
        result = metrics
    return result


def train_epoch(net, loader, optimizer, schedule, scaler, config, context, epoch, step):
    """One pass over this rank's training samples; returns (mean loss over all ranks, step)."""
    from tqdm import tqdm

    net.train()
    total, count = torch.zeros((), device=context.device), 0
    bar = tqdm(total=len(loader), desc=f"epoch {epoch + 1}/{config.epochs}", unit="step",
               disable=None if context.main else True,  # None: only on a terminal; logs get the epoch lines
               dynamic_ncols=True, leave=False)
    window_start, window_images = time.perf_counter(), 0
    for images, labels in loader:
        schedule.before_step(step)
        loss = train_step(net, images, labels, optimizer, scaler, config, context.device)
        total += loss.detach().float()
        count += 1
        step += 1
        window_images += len(labels) * context.world_size
        if count % config.log_every == 0 or count == len(loader):
            current = check_finite(loss, config, context, epoch, step)
            rate = window_images / (time.perf_counter() - window_start)
            bar.set_postfix(loss=f"{current:.4f}", lr=f"{schedule.lr:.2e}", img_s=f"{rate:,.0f}")
            window_start, window_images = time.perf_counter(), 0
        bar.update(1)
    bar.close()
    loss_sum, steps = dist.sum_all([float(total), count], context)
    return loss_sum / max(steps, 1), step


def train_step(net, images, labels, optimizer, scaler, config: TrainConfig, device) -> torch.Tensor:
    """Forward, cross-entropy, backward, SGD update; returns the loss (a device tensor)."""
    with autocast(config, device):
        loss = F.cross_entropy(net(to_model_input(images, config)), labels, label_smoothing=config.label_smoothing)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return loss


def check_finite(loss: torch.Tensor, config: TrainConfig, context, epoch: int, step: int) -> float:
    """The loss as a float; stops every rank together when any rank's loss is NaN or infinite."""
    value = float(loss.detach())
    (bad,) = dist.sum_all([0.0 if math.isfinite(value) else 1.0], context)
    if bad:
        raise TrainingError(f"loss is {value} at epoch {epoch + 1}, step {step}: stopped; the last good checkpoint "
                            f"is {Path(config.out) / LAST} (lower --lr, or check the data with imgprep preview)")
    return value


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


def epoch_line(metrics: dict, config: TrainConfig) -> str:
    line = f"epoch {metrics['epoch'] + 1}/{config.epochs}  train loss {metrics['train_loss']:.4f}"
    if "val_top1" in metrics:
        line += f"  val top-1 {100 * metrics['val_top1']:.2f}%  top-5 {100 * metrics['val_top5']:.2f}%"
    return line + f"  lr {metrics['lr']:.2e}  {metrics['seconds']:.0f} s"


def print_summary(config, context, model, train_loader, val_loader, start_epoch) -> None:
    parameters = sum(p.numel() for p in model.parameters())
    gpu = f" ({torch.cuda.get_device_name()})" if context.device.type == "cuda" else ""
    print(f"train run: {config.arch}, {parameters:,} parameters, {context.world_size} x {context.device.type}{gpu}, "
          f"backend {train_loader.backend}, amp {config.amp if context.device.type == 'cuda' else 'off'}")
    print("config: " + " ".join(f"{k}={v}" for k, v in config.as_dict().items()))
    print(f"data: {len(train_loader.reader):,} train images, {len(train_loader)} steps of {config.batch_size} "
          f"per epoch; {len(val_loader.reader) if val_loader else 0:,} val images; "
          + (f"resuming after epoch {start_epoch}" if start_epoch else "from scratch"), flush=True)


def evaluate_checkpoint(path, shards: str | None, ten_crop: bool, batch_size: int, device: str, workers: int,
                        backend: str | None) -> dict:
    """Each process of ``train eval``: the checkpoint's model on the whole validation split."""
    context = dist.setup(device)
    try:
        state = load_checkpoint(path)
        config = TrainConfig.from_dict(state["config"]).with_(
            shards=shards or state["config"]["shards"], batch_size=batch_size, device=device, workers=workers,
            backend=backend, channels_last=False, compile=False)
        _, val = make_loaders(config, context, eval_mode="test10" if ten_crop else "val", train=False)
        if val is None:
            return {"error": f"{config.shards} has no val split to evaluate on"}
        model = build_model(config.arch, len(state["classes"])).to(context.device)
        model.load_state_dict(state["model"])
        return evaluate(model, val, config, context)
    except PrepError as error:
        return {"error": str(error)}
    finally:
        dist.teardown()
