"""What every benchmark shares: the machine line, the table output, endless loader epochs."""

from __future__ import annotations

import platform
from pathlib import Path

import click


def machine() -> str:
    """CPU model, cores and the library versions the numbers depend on."""
    import simplejpeg
    import torch
    from PIL import Image

    from prep.pool import usable_cores

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = usable_cores()
    return (f"{cpu}, {cores} cores, Python {platform.python_version()}, Pillow {Image.__version__}, "
            f"simplejpeg {simplejpeg.__version__}, torch {torch.__version__}")


def report(table: str, markdown: Path | None) -> None:
    """Print the machine and the table; also write both to ``markdown`` when given."""
    click.echo(f"{machine()}\n\n{table}")
    if markdown:
        markdown.parent.mkdir(parents=True, exist_ok=True)
        markdown.write_text(f"machine: {machine()}\n\n{table}\n")


def endless(loader, device: str | None = None, res: int | None = None):
    """Batches of ``loader`` epoch after epoch (calling set_epoch when it has one, at side
    ``res`` when given)."""
    epoch = 0
    while True:
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch, **({"res": res} if res else {}))
        for images, labels in loader:
            yield (images.to(device) if device else images), labels
        epoch += 1
