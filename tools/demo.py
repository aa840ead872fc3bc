"""The whole pipeline on a small generated ImageNet, on the CPU (``make demo``).

    python -m tools.demo                 # everything under ./demo, a few minutes on 2 cores
    python -m tools.demo --quick         # 6 epochs instead of 8, about 90 s
    python -m tools.demo --out /tmp/d    # elsewhere

Each step runs the real command a user would type, printed before it runs: generate a dataset
whose four classes look different (so learning is possible, and a broken label mapping or
augmentation would show as chance accuracy), shard it, measure its colour statistics, draw the
augmentation, train AlexNet's single-column variant on the CPU, evaluate with the paper's
ten crops. Rerunning it replaces the previous demo run.
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import click

SHOWN = {"prep.cli": "imgprep", "train": "train"}


def step(*args: str, capture: bool = False) -> str:
    """Run ``python -m <module> args``, shown as the command a user would type."""
    module, rest = args[0], [str(a) for a in args[1:]]
    click.secho(f"\n$ {SHOWN.get(module, f'python -m {module}')} {shlex.join(rest)}", bold=True)
    result = subprocess.run([sys.executable, "-m", module, *rest], check=True, text=True,
                            stdout=subprocess.PIPE if capture else None)
    if capture:
        click.echo(result.stdout, nl=False)
    return result.stdout or ""


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("demo"), show_default=True,
              help="Folder for everything the demo makes.")
@click.option("--quick", is_flag=True, help="6 epochs instead of 8: about a minute and a half on 2 cores.")
def main(out, quick):
    """Generate a small ImageNet, shard it, measure it, preview it, train on it, evaluate."""
    started = time.perf_counter()
    epochs = 6 if quick else 8
    src, shards, run = out / "src", out / "shards", out / "run"
    if not (src / "train").is_dir():
        step("tools.fake_imagenet", src, "--classes", 4, "--train-per-class", 60, "--val-per-class", 15)
    step("prep.cli", "shard", src, "--out", shards, "--size", 128, "--shard-size", 64)
    step("prep.cli", "pca-stats", shards)
    step("prep.cli", "preview", shards, "--out", out / "preview.png", "--images", 4, "--versions", 4)
    if run.exists():
        click.echo(f"\n(replacing the previous demo run in {run})")
        shutil.rmtree(run)
    step("train", "run", shards, "--preset", "demo", "--epochs", epochs, "--device", "cpu", "--out", run)
    output = step("train", "eval", run / "best.pt", "--ten-crop", "--device", "cpu", "--batch-size", 20,
                  "--workers", 2, capture=True)
    top1 = float(output.split("val top-1 ")[1].split("%")[0])
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    click.secho(f"\ndemo done in {time.perf_counter() - started:.0f} s; ten-crop val top-1 {top1:.1f}% "
                f"(chance: 25%; last epoch's centre crop {100 * last['val_top1']:.1f}%)", bold=True)
    for name, path in (("source images", src), ("shards", shards), ("colour statistics", shards / "stats.json"),
                       ("augmentation preview", out / "preview.png"), ("training curves", run / "curves.png"),
                       ("metrics", run / "metrics.jsonl"), ("checkpoint", run / "best.pt")):
        click.echo(f"  {name:22} {path}")
    if top1 <= 40:
        raise SystemExit("the demo model did not learn: its accuracy is near chance")


if __name__ == "__main__":
    main()
