"""``train eval``: a checkpoint (a run's, or published weights) on the whole validation split,
by one process per device, with the run's own config or torchvision's conventions."""

from __future__ import annotations

import contextlib
import signal

from prep import shards_folder
from prep.lifeline import sigterm_as_interrupt
from train import dist
from train.checkpoint import check_same_shards, load_for_eval
from train.config import TrainConfig, open_run_shards
from train.loop import TrainingError, evaluate, load_weights, make_loaders
from train.models import arch_from_checkpoint, build_model
from train.supervise import early_stop


def evaluate_checkpoint(path, shards: str | None, ten_crop: bool, batch_size: int, device: str, workers: int,
                        backend: str | None, arch: str | None = None, normalize: str | None = None) -> dict:
    """Each process of ``train eval``: the checkpoint's model on the whole validation split.
    An evaluation has nothing to save: SIGTERM and SIGUSR1 end it as Ctrl-C does."""
    with sigterm_as_interrupt(signal.SIGTERM, signal.SIGUSR1):
        if early_stop():
            raise KeyboardInterrupt
        return evaluate_on_val(path, shards, ten_crop, batch_size, device, workers, backend, arch, normalize)


def evaluate_on_val(path, shards, ten_crop: bool, batch_size: int, device: str, workers: int, backend,
                    arch: str | None = None, normalize: str | None = None) -> dict:
    """A train checkpoint evaluates with its own run's config (``normalize`` may override it).
    Published weights (a plain state_dict, as torchvision's files) need ``arch``; they are taken
    to be over the shards' classes in index order (ImageNet-1k's sorted wnids for torchvision's)
    and to expect torchvision's input normalisation unless ``normalize`` says otherwise."""
    context = dist.setup(device)
    state = load_for_eval(path)
    run = dict(batch_size=batch_size, device=device, workers=workers, backend=backend, channels_last=False,
               compile=False)
    if "config" in state:
        config = TrainConfig.from_dict(state["config"], path).with_(shards=shards or state["config"]["shards"], **run)
        config = config.with_(arch=arch_from_checkpoint(config.arch, arch, path))
        if not shards:  # the run's own shards: they must still be the ones it read
            check_same_shards(state, open_run_shards(config).root, path,
                              "name them with --shards to evaluate on them anyway")
        config = config.with_(normalize=normalize) if normalize else config
    elif arch is None:
        raise TrainingError(f"{path} holds weights only, without the run that made them: name the network with "
                            "--arch (e.g. --arch alexnet-owt for torchvision's alexnet weights)")
    else:
        config = TrainConfig(arch=arch, shards=str(shards_folder(shards)), normalize=normalize or "torchvision",
                             lighting=0, **run)
    with contextlib.ExitStack() as loaders:
        _, val = make_loaders(config, context, loaders, eval_mode="test10" if ten_crop else "val", train=False)
        if val is None:
            raise TrainingError(f"{config.shards} has no val split to evaluate on")
        classes = val.shard_set.classes
        if "classes" in state:
            check_same_classes(state["classes"], classes, path, config.shards)
        model = build_model(config.arch, len(classes)).to(context.device)
        load_weights(model, state["model"], path, config.arch, len(classes))
        result = evaluate(model, val, config, context)
    dist.teardown()
    return result


def check_same_classes(trained: list, shards: list, checkpoint, root) -> None:
    """A model's outputs mean the classes it was trained on, in that order: refuse other shards."""
    mine, theirs = [c["wnid"] for c in trained], [c["wnid"] for c in shards]
    if mine == theirs:
        return
    if len(mine) != len(theirs):
        detail = f"{len(mine)} classes against {len(theirs)}"
    else:
        first = next(i for i, (a, b) in enumerate(zip(mine, theirs)) if a != b)
        detail = f"class {first} is {mine[first]} in the checkpoint and {theirs[first]} in the shards"
    raise TrainingError(f"{checkpoint} was trained on other classes than {root} holds ({detail}); "
                        "evaluate it on shards of the same class list")
