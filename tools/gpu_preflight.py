"""Before the GPU check spends its minutes: is the GPU stack here at all? (tools/gpu_check.sh)

    python -m tools.gpu_preflight              # on the GPU machine: exit 1, one line why, if not
    python -m tools.gpu_preflight --dry-run    # here: CUDA not required, pinning skipped

A missing DALI would silently turn every DALI row into a torch row, and a missing simplejpeg
breaks the collection of the whole test folder (zero GPU tests run): each is a wasted shot, so
the check stops at once. It also prints where the ``nvidia`` namespace packages come from (the
carried wheels), the size of /dev/shm (DALI's workers hand batches over through it) and whether
page-locking a host buffer works (else every host-to-device copy is synchronous).
"""

from __future__ import annotations

import platform
import subprocess

import click


def missing(dry_run: bool) -> str | None:
    """The first piece of the GPU stack that is not importable, as one sentence; None if all are."""
    try:
        import torch
    except ImportError as error:
        return f"torch is not importable ({error})"
    if not dry_run and not torch.cuda.is_available():
        return f"CUDA: torch {torch.__version__} (built for CUDA {torch.version.cuda}) sees no GPU"
    try:
        import nvidia.dali  # noqa: F401
    except ImportError as error:
        return f"DALI: nvidia.dali is not importable ({error}); carry it in (../shared/device/README.md)"
    try:
        import simplejpeg  # noqa: F401
    except ImportError as error:
        return f"simplejpeg is not importable ({error}); the test folder cannot be collected without it"
    return None


def pinned_registration() -> str:
    """Whether cudaHostRegister page-locks a plain host buffer, as the torch backend's ring does."""
    import torch

    buffer = torch.empty(1 << 20, dtype=torch.uint8)
    cudart = torch.cuda.cudart()
    code = int(cudart.cudaHostRegister(buffer.data_ptr(), buffer.nbytes, 0))
    if code != 0:
        return f"failed (cudaError {code}): the torch backend's copies will be synchronous"
    cudart.cudaHostUnregister(buffer.data_ptr())
    return "works"


# The carried wheels and the versions that ran here (tools/gpu_check.sh's header says why).
EXPECTED = {"nvidia-dali-cuda130": "2.4.0", "nvidia-nvimgcodec-cu13": "0.9.0.20", "nvidia-libnvcomp-cu13": "5.3.0.16",
            "nvidia-nvjpeg": "13.3.2.43", "nvidia-nvjpeg2k-cu13": "0.11.0.51", "nvidia-nvtiff-cu13": "0.8.0.82"}


def carried_versions() -> str:
    """Each carried wheel's installed version, marked where it is not the one that ran here
    (a different nvJPEG can change decode speed: the numbers would not compare)."""
    from importlib.metadata import PackageNotFoundError, version

    found = []
    for name, expected in EXPECTED.items():
        try:
            got = version(name)
        except PackageNotFoundError:
            got = "not installed"
        found.append(f"{name} {got}" + ("" if got == expected else f" (expected {expected})"))
    return ", ".join(found)


def versions() -> str:
    import torch
    from nvidia import dali

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return (f"python {platform.python_version()} | torch {torch.__version__} | CUDA {torch.version.cuda} | "
            f"GPU {gpu} | DALI {dali.__version__}")


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--dry-run", is_flag=True, help="On the CPU: CUDA is not required and pinning is not tried.")
def main(dry_run):
    """Stop at once, saying why, when CUDA, DALI or simplejpeg is missing; else print the stack."""
    why = missing(dry_run)
    if why:
        raise click.ClickException(f"preflight: {why}")
    import nvidia

    click.echo(versions())
    click.echo(f"wheels: {carried_versions()}")
    click.echo(f"nvidia.__path__: {list(nvidia.__path__)}")
    shm = subprocess.run(["df", "-h", "/dev/shm"], capture_output=True, text=True)
    click.echo(shm.stdout.rstrip() or f"df -h /dev/shm: {shm.stderr.strip()}")
    click.echo("pinned registration: " + ("skipped (dry run, no GPU)" if dry_run else pinned_registration()))


if __name__ == "__main__":
    main()
