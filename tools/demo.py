"""The pipeline end to end on a small generated ImageNet, on the CPU (``make demo``).

    python -m tools.demo                 # everything under ./demo
    python -m tools.demo --out /tmp/d    # elsewhere

Each step runs the real command a user would type, printed before it runs.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
import time
from pathlib import Path

import click


def step(*args: str) -> None:
    """Run ``python -m <module> args`` and show it as the command a user would type."""
    module, rest = args[0], args[1:]
    shown = {"prep.cli": "imgprep", "train.cli": "train"}.get(module, f"python -m {module}")
    click.secho(f"\n$ {shown} {shlex.join(rest)}", bold=True)
    subprocess.run([sys.executable, "-m", module, *rest], check=True)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("demo"),
              show_default=True, help="Folder for everything the demo makes.")
@click.option("--classes", default=4, show_default=True, help="Classes in the generated dataset.")
@click.option("--train-per-class", default=60, show_default=True, help="Training images per class.")
def main(out, classes, train_per_class):
    """Generate a small ImageNet, shard it, and show what the shards hold."""
    started = time.perf_counter()
    src, shards = out / "src", out / "shards"
    if not (src / "train").is_dir():
        step("tools.fake_imagenet", str(src), "--classes", str(classes),
             "--train-per-class", str(train_per_class), "--val-per-class", "15")
    step("prep.cli", "shard", str(src), "--out", str(shards), "--shard-size", "64")
    step("prep.cli", "info", str(shards))
    step("prep.cli", "verify", str(shards))
    click.secho(f"\ndone in {time.perf_counter() - started:.0f} s", bold=True)
    click.echo(f"  source images  {src}")
    click.echo(f"  shards         {shards}  (manifest.json, rejects.jsonl, train/, val/)")


if __name__ == "__main__":
    main()
