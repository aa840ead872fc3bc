"""``train``: train and evaluate CNNs on imgprep shards.

    train run                                   # AlexNet, the paper's recipe, ./shards, all local GPUs (or the CPU)
    train run /fast/in256 --gpus 2 --epochs 90 --batch-size 128 --out runs/alexnet
    train run --arch mypkg.nets:resnet18 --lr 0.1 --schedule cosine --crop-mode random-resized
    train run --resume runs/alexnet             # continues exactly where it stopped
    train eval runs/alexnet/best.pt --ten-crop  # the paper's 10-crop top-1/top-5 on val
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29400 -m train run ...

Set IMGPREP_DEBUG=1 to see the traceback behind a one-line error.
"""

from __future__ import annotations

import os
from pathlib import Path

import click

from prep import shards_folder
from prep.errors import escaped, report_errors
from prep.options import SEED, ByteSize, FolderOrFile
from train.config import (AMP, BACKENDS, CROP_MODES, DEVICES, NORMALIZE, PRESETS, SCHEDULES, default, open_run_shards,
                          preset_values)
from train.runlog import LOGGERS

# TrainConfig fields a resumed run may change: how long, how it reads its data (cache: another
# node's folder), where it logs.
RESUMABLE_CHANGES = ("epochs", "workers", "backend", "checkpoint_minutes", "cache", "log")


def processes_options(command):
    """--device, --gpus, --nproc: where the processes run and how many."""
    command = click.option("--nproc", type=click.IntRange(min=1), default=None,
                           help="Processes with --device cpu (gloo).  [default: 1]")(command)
    command = click.option("--gpus", type=click.IntRange(min=1), default=None,
                           help="Local GPUs, one process each (NCCL).  [default: all]")(command)
    return click.option("--device", type=click.Choice(DEVICES), default=None,
                        help="Where the processes compute.  [default: cuda when a GPU is present, else cpu]")(command)


def resolve_processes(device, gpus, nproc) -> tuple[str, int]:
    """(device, number of local processes), checked against the machine."""
    import torch

    available = torch.cuda.device_count()
    if gpus and gpus > available:
        raise click.ClickException(f"--gpus {gpus}, but this machine has {available} GPU(s)"
                                   + ("" if available else " (on the CPU: --device cpu --nproc N)"))
    device = device or ("cuda" if available or gpus else "cpu")
    if device == "cuda":
        if not available:
            raise click.ClickException("--device cuda, but torch sees no CUDA GPU (use --device cpu)")
        if nproc:
            raise click.ClickException("--nproc is for --device cpu; on GPUs use --gpus")
        return device, gpus or available
    if gpus:
        raise click.ClickException("--gpus needs --device cuda; on the CPU use --nproc")
    return device, nproc or 1


def world_size(processes: int) -> int:
    """Processes over all nodes: WORLD_SIZE under torchrun, else the local count."""
    from train import dist

    return int(os.environ.get("WORLD_SIZE", processes)) if dist.under_launcher() else processes


def launch(entrypoint, args: tuple, processes: int) -> dict:
    """In this process (one process, or already under torchrun), else N local processes. Errors
    of any process arrive here as exceptions (``supervise.RankError`` from the others)."""
    from train import dist, supervise

    if dist.under_launcher() or processes == 1:
        return entrypoint(*args)
    return supervise.launch(entrypoint, args, processes)


def run_folder_lock(out: str):
    """One writer per run folder: the process that will be rank 0 holds its lock."""
    import contextlib

    from prep.atomic import locked_folder
    from train import dist

    if dist.under_launcher() and int(os.environ.get("RANK", 0)) != 0:
        return contextlib.nullcontext()
    return locked_folder(out, "train run")


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
def main():
    """Train CNNs on imgprep shards: AlexNet as in the paper first, any CNN by import path."""


def shown(name: str, text: str = "") -> str:
    """Help text ending in TrainConfig's default for field ``name`` (or ``text`` for a derived one)."""
    value = default(name)
    return f"  [default: {text or ('on' if value is True else 'off' if value is False else value)}]"


@main.command()
@click.argument("shards", required=False, type=FolderOrFile(file_okay=False, urls=True))
@click.option("--preset", type=click.Choice(list(PRESETS)), default="alexnet", show_default=True,
              help="Starting values; options given explicitly override them. alexnet (or paper): the defaults "
                   "below. " + " ".join(f"{name}: " + ", ".join(f"{k}={v}" for k, v in PRESETS[name].items()) + "."
                                        for name in ("demo", "resnet50", "resnet18"))
                   + " The ResNet presets are FFCV's published ImageNet configs; their --res-ramp follows "
                     "--epochs as FFCV's tables do (16 epochs: 11:13, 88 epochs: 65:76).")
@click.option("--out", type=FolderOrFile(file_okay=False, urls=True),
              help="Run folder, or its URL (s3://bucket/runs/x: the run writes to a staging folder under --cache and "
                   "uploads each file after each save)." + shown("out", "runs/<arch>"))
@click.option("--resume", type=FolderOrFile(file_okay=False, path_type=Path, urls=True),
              help="Continue the run in this folder (or at this URL) from its last.pt (its config; --epochs may "
                   "grow).")
@click.option("--arch", help="alexnet, alexnet-owt, resnet18, resnet50, a torchvision name, or package.module:factory "
                             "(imports that module and runs its code; --resume needs it again)." + shown("arch"))
@click.option("--epochs", type=int, help="Passes over the training split." + shown("epochs"))
@click.option("--batch-size", type=int, help="Images per step over all processes." + shown("batch_size"))
@click.option("--lr", type=float, help="Initial learning rate." + shown("lr"))
@click.option("--momentum", type=float, help="SGD momentum." + shown("momentum"))
@click.option("--weight-decay", type=float, help="L2 weight decay." + shown("weight_decay"))
@click.option("--no-bias-decay/--bias-decay", default=None,
              help="Exempt biases and other 1-d parameters from weight decay, as cuda-convnet (the paper's code) "
                   "did, or decay them too." + shown("no_bias_decay", "--no-bias-decay"))
@click.option("--label-smoothing", type=float, help="Cross-entropy label smoothing." + shown("label_smoothing"))
@click.option("--schedule", type=click.Choice(SCHEDULES),
              help="plateau: lr/10 when val top-1 stalls for --patience epochs, at most 3 times (the paper); "
                   "step: lr/10 every --step-epochs; cosine: to 0 at the last epoch (growing --epochs on "
                   "--resume stretches it); cyclic: FFCV's triangle, up to lr at --lr-peak-epoch and down to 0 "
                   "at the end." + shown("schedule"))
@click.option("--lr-peak-epoch", type=float, help="cyclic: the epoch at which the rate peaks." + shown("lr_peak_epoch"))
@click.option("--patience", type=int, help="plateau: epochs without improvement before lr/10." + shown("patience"))
@click.option("--step-epochs", type=int, help="step: epochs between divisions by 10." + shown("step_epochs"))
@click.option("--warmup-epochs", type=float, help="step, cosine: linear warm-up epochs." + shown("warmup_epochs"))
@click.option("--crop-mode", type=click.Choice(CROP_MODES),
              help="paper: random window of the 256 image; random-resized: RandomResizedCrop." + shown("crop_mode"))
@click.option("--crop", type=int, help="Input side in pixels (with --res: the evaluation side)." + shown("crop"))
@click.option("--val-resize", type=int,
              help="Evaluation: resize the shorter side to this, then take the central --crop.  [default: no resize]")
@click.option("--res", "res", type=str, metavar="MIN:MAX",
              help="Progressive resizing: the training side goes from MIN to MAX over --res-ramp, in multiples of "
                   "32 (FFCV's rule).  [default: --crop throughout]")
@click.option("--res-ramp", type=str, metavar="START:END",
              help="--res: epochs (0-based) of the last MIN and the first MAX side.  [default: 0:0]")
@click.option("--zero-init-residual", is_flag=True, default=None,
              help="ResNets: start the last norm layer of every block at zero.")
@click.option("--lighting", type=float, help="Std of the PCA-lighting alpha, 0 for none." + shown("lighting"))
@click.option("--normalize", type=click.Choice(NORMALIZE),
              help="channel: (x - mean) / std of stats.json; mean-image: the paper's mean-image subtraction; "
                   "torchvision: torchvision's ImageNet mean and std; none: 0-255 values."
                   + shown("normalize", "mean-image for --arch alexnet with paper crops, channel otherwise"))
@click.option("--backend", type=click.Choice(BACKENDS), help="Loader backend.  [default: dali if installed]")
@click.option("--workers", type=int, help="Loader workers per process." + shown("workers"))
@processes_options
@click.option("--amp", type=click.Choice(AMP), help="Autocast on GPU." + shown("amp"))
@click.option("--channels-last", is_flag=True, default=None, help="NHWC memory format.")
@click.option("--compile", "compile_", is_flag=True, default=None, help="torch.compile the model.")
@click.option("--seed", type=SEED, help="Seed of order, augmentation, initialisation, dropout." + shown("seed"))
@click.option("--checkpoint-minutes", type=float,
              help="Also save last.pt mid-epoch this often, so a kill -9 loses at most that much (0: off)."
                   + shown("checkpoint_minutes"))
@click.option("--cache", type=FolderOrFile(file_okay=False),
              help="SHARDS at a URL (s3://bucket/prefix): the local folder its shard files are downloaded to, "
                   "shared by the ranks of a node; --out at a URL: its staging folder is under it too.  "
                   "[default: ~/.cache/imgprep]")
@click.option("--cache-limit", type=ByteSize(),
              help="SHARDS at a URL: the most the cache may hold (500MB, 100GB, 1TiB). When the shards do not fit, "
                   "each epoch reads them in shard-window order, a quarter of the cache at a time.  [default: all]")
@click.option("--log", "log", type=click.Choice(list(LOGGERS)), multiple=True,
              help="Also log to TensorBoard (event files in OUT/tensorboard) or Weights & Biases (files in OUT/wandb; "
                   "WANDB_MODE=offline keeps them there); for both, give it twice. Needs pip install 'imgprep[NAME]'.  "
                   "[default: metrics.jsonl and curves.png only]")
@click.option("--accept-changed-shards", is_flag=True,
              help="--resume although the shards' manifest.json is not the one the run started with (it will not "
                   "end with the weights of an uninterrupted run).")
@report_errors
def run(shards, preset, out, resume, device, gpus, nproc, compile_, accept_changed_shards, **options):
    """Train a CNN on SHARDS (default $IMGPREP_SHARDS, else ./shards).

    Each epoch writes OUT/last.pt (and best.pt when val top-1 improves), a line of
    OUT/metrics.jsonl and OUT/curves.png. Global batch = per-process batch x processes.

    \b
    SIGTERM or SIGUSR1 (what SLURM and Kubernetes send before a kill) stops every process at
    the next check (every 10 steps), saves last.pt mid-epoch and exits with code 75;
    --resume OUT then ends with the weights of an uninterrupted run. Ctrl-C stops at once
    (exit 130), keeping the last checkpoint.
    """
    from train.checkpoint import LAST, check_same_shards, load_checkpoint
    from train.config import TrainConfig
    from train.outputs import fetch_run, local_folder, shown

    # A run at a URL is resumed from its staging folder, refreshed from the bucket first.
    resumed = (fetch_run(resume, options.get("cache")) if isinstance(resume, str) else resume) if resume else None
    state = load_checkpoint(resumed / LAST) if resume else None  # read once: it may weigh hundreds of MB
    if resume and not (gpus or nproc):  # as many processes as the run had, unless told otherwise
        nproc, gpus = resumed_processes(state, device)
    device, processes = resolve_processes(device, gpus, nproc)
    given = {k: v for k, v in options.items() if v is not None and v != ()}  # () : --log not given
    given.update(pair_option(given.pop("res", None), "--res", ("min_res", "max_res")))
    given.update(pair_option(given.pop("res_ramp", None), "--res-ramp", ("ramp_start", "ramp_end")))
    if compile_ is not None:
        given["compile"] = compile_
    if resume:
        config = resumed_config(resume, state, given, shards, out).with_(device=device)
        if not accept_changed_shards:
            check_same_shards(state, open_run_shards(config).root, shown(resume, LAST), "--accept-changed-shards resumes "
                              "on them anyway, but not to the weights an uninterrupted run would have")
    else:
        values = {**preset_values(preset, given), "device": device}
        # The backend this run uses, written down: a resume must not switch it silently (the two
        # agree to float rounding only, and --resume promises the very same weights).
        from augment.loader import dali_available

        values.setdefault("backend", "dali" if dali_available() else "torch")
        # Absolute: a resume from another working folder must read the same shards.
        folder = shards_folder(shards)  # a URL stays as it is
        config = TrainConfig(**values, shards=folder if isinstance(folder, str) else str(folder.absolute()), out=out)
    from train.loop import PREEMPTED_EXIT, worker

    with run_folder_lock(local_folder(config.out, config.cache)):
        check_run(config, world_size(processes), resume is not None)
        result = launch(worker, (config, resume is not None), processes)
    if result.get("preempted"):
        click.echo(escaped(f"stopped by {result['preempted']} {result['where']}; saved {result['checkpoint']}: continue "
                           f"with 'train run --resume {config.out}{resume_arch(config.arch)}'"), err=True)
        raise SystemExit(PREEMPTED_EXIT)


def resume_arch(arch: str) -> str:
    """What a resume command must add: a run whose network is an import path names it again."""
    return f" --arch {arch}" if ":" in arch else ""


def pair_option(text: str | None, option: str, names: tuple[str, str]) -> dict:
    """"A:B" -> {names[0]: A, names[1]: B}, two whole numbers; a one-line error otherwise."""
    if text is None:
        return {}
    first, colon, second = text.partition(":")
    if not (colon and first.strip().isdigit() and second.strip().isdigit()):
        raise click.BadParameter(f"expected two whole numbers as A:B, got {text!r}", param_hint=option)
    return {names[0]: int(first), names[1]: int(second)}


def resumed_processes(state: dict, device) -> tuple[int | None, int | None]:
    """(--nproc, --gpus) that give the world size the checkpointed run was trained with."""
    from train.dist import under_launcher

    if under_launcher():
        return None, None
    processes = int(state["world_size"])
    on_gpus = (device or state["config"]["device"]) == "cuda"
    return (None, processes) if on_gpus else (processes, None)


def resumed_config(folder, state: dict, given: dict, shards, out):
    """The checkpoint's config with ``given`` changes; FOLDER (a path or URL) stays OUT."""
    from train.checkpoint import LAST
    from train.config import TrainConfig, default
    from train.models import arch_from_checkpoint
    from train.outputs import shown

    given = dict(given)
    arch = arch_from_checkpoint(state["config"].get("arch", default("arch")), given.pop("arch", None),
                                shown(folder, LAST))
    if shards or out or set(given) - set(RESUMABLE_CHANGES):
        changed = sorted(set(given) - set(RESUMABLE_CHANGES)) + (["shards"] if shards else []) + (["out"] if out else [])
        allowed = ", ".join("--" + c.replace("_", "-") for c in RESUMABLE_CHANGES)
        raise click.ClickException(f"--resume continues the run as it was configured; only {allowed} may change "
                                   f"(not {', '.join(c.replace('_', '-') for c in changed)})")
    before = state["config"].get("backend")
    if given.get("backend") and before and given["backend"] != before:
        click.echo(f"note: this run used the {before} backend; with {given['backend']} it continues, but not "
                   "bit-exactly (the backends agree to float rounding)", err=True)
    return TrainConfig.from_dict({**state["config"], **given, "arch": arch, "out": str(folder)}, shown(folder, LAST))


def check_run(config, processes: int, resume: bool) -> None:
    """Everything that can be checked before processes start, each failure one clear line."""
    from augment.colour import colour_stats
    from augment.sampler import check_batch_fits, per_rank_batch
    from prep.atomic import TMP_MARK
    from train.checkpoint import LAST
    from train.models import check_arch, check_input_size
    from train.outputs import check_new_run, local_folder
    from train.runlog import check_loggers

    per_rank = per_rank_batch(config.batch_size, processes)
    check_arch(config.arch)
    check_loggers(config.log)
    shard_set = open_run_shards(config)
    for side in sorted({config.crop, config.res_at(0), config.largest_res()}):
        check_input_size(config.arch, len(shard_set.classes), side)
    if config.crop_mode == "paper" and shard_set.square and config.largest_res() > shard_set.size:
        asked = f"--res {config.min_res}:{config.max_res}" if config.min_res is not None else f"--crop {config.crop}"
        raise click.ClickException(f"{asked} asks for windows larger than the {shard_set.size} px images of "
                                   f"{config.shards}: a smaller one, or shards made with a larger --size")
    check_batch_fits(len(shard_set.split("train")), per_rank, processes, "train")
    colour_stats(shard_set.root, config.augment_spec("train"))
    if config.schedule == "plateau" and not ("val" in shard_set.splits and len(shard_set.split("val"))):
        what = "an empty val split" if "val" in shard_set.splits else "no val split"
        raise click.ClickException(f"{config.shards} has {what}, and --schedule plateau lowers the rate only when "
                                   "validation stalls; use --schedule step or cosine (or check the val labels)")
    local = local_folder(config.out, config.cache)
    if not resume:
        check_new_run(config.out)  # at a URL: reachable, and no run there yet
    if not resume and (local / LAST).exists():
        raise click.ClickException(f"{config.out} already holds a run: continue it with --resume {config.out}"
                                   f"{resume_arch(config.arch)}, "
                                   "or choose another --out")
    local.mkdir(parents=True, exist_ok=True)
    for leftover in local.rglob(f"*{TMP_MARK}*"):  # a save cut short by a kill; we hold the lock
        leftover.unlink()


@main.command("eval")
@click.argument("checkpoint", type=FolderOrFile(exists=True, dir_okay=False, path_type=Path, urls=True))
@click.option("--ten-crop", is_flag=True, help="Average the softmax of the paper's 10 crops (else the centre crop).")
@click.option("--shards", type=FolderOrFile(file_okay=False, urls=True),
              help="Shard folder.  [default: the run's own; for a weights-only file $IMGPREP_SHARDS, else ./shards]")
@click.option("--batch-size", default=128, show_default=True, help="Images per step over all processes.")
@click.option("--workers", default=4, show_default=True, help="Loader workers per process.")
@click.option("--backend", type=click.Choice(BACKENDS), help="Loader backend.  [default: dali if installed]")
@click.option("--arch", help="The network of a weights-only file (e.g. torchvision's alexnet weights: alexnet-owt); "
                             "for a checkpoint whose network is an import path, that path again (a checkpoint may "
                             "not choose code to import: you do).")
@click.option("--normalize", type=click.Choice(NORMALIZE),
              help="Input normalisation.  [default: the run's own; torchvision for a weights-only file]")
@processes_options
@report_errors
def evaluate(checkpoint, ten_crop, shards, batch_size, workers, backend, arch, normalize, device, gpus, nproc):
    """Top-1 and top-5 of CHECKPOINT over the whole validation split.

    CHECKPOINT is a train checkpoint (last.pt, best.pt; a file, or an object of a run at a URL,
    downloaded first), or published weights: a plain state_dict such as torchvision's model
    files, with --arch naming the network. Those are taken to be over the shards' classes in
    index order (ImageNet's sorted wnids, as torchvision's) and to expect torchvision's input
    normalisation."""
    from train.evaluation import evaluate_checkpoint
    from train.outputs import fetch_checkpoint

    from augment.sampler import per_rank_batch

    device, processes = resolve_processes(device, gpus, nproc)
    per_rank_batch(batch_size, world_size(processes))
    local = fetch_checkpoint(checkpoint) if isinstance(checkpoint, str) else checkpoint
    result = launch(evaluate_checkpoint, (str(local), shards, ten_crop, batch_size,
                                          device, workers, backend, arch, normalize), processes)
    views = "10 crops" if ten_crop else "centre crop"
    click.echo(f"{escaped(checkpoint)}: val top-1 {100 * result['top1']:.2f}%  top-5 {100 * result['top5']:.2f}%  "
               f"loss {result['loss']:.4f}  over {result['count']:,} images ({views})")


if __name__ == "__main__":
    main()
