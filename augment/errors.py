"""Errors of the online stage; each message is one sentence for the user.

A worker process that meets one of our errors (a damaged shard, say) cannot raise it in this
process: DALI and torch's DataLoader pass it on wrapped in the worker's traceback. So the worker
also leaves the sentence in a file beside its stream's table (``worker_errors_reported``), and
the Loader, when its stream fails, raises that sentence as it was (``raise_worker_error``).
"""

from __future__ import annotations

import contextlib
import json
import os

from prep.errors import ImgprepError


class AugmentError(ImgprepError):
    """A loader cannot be built as asked (backend, device, batch size, statistics)."""


class WorkerError(ImgprepError):
    """One of our errors, raised in a loader worker process; the message is the worker's own."""


def _error_file(table) -> str:
    return table.path + ".error"


@contextlib.contextmanager
def worker_errors_reported(table):
    """In a loader worker: our errors leave their sentence for the Loader, then go on up."""
    try:
        yield
    except ImgprepError as error:
        from prep.atomic import atomic_write_text

        with contextlib.suppress(OSError):
            atomic_write_text(_error_file(table), json.dumps({"message": str(error)}))
        raise


def raise_worker_error(table) -> None:
    """Raise the sentence a worker left (a WorkerError), if one did; else return."""
    try:
        with open(_error_file(table), encoding="utf-8") as f:
            message = json.load(f)["message"]
    except (OSError, ValueError, KeyError):
        return
    raise WorkerError(message)


def forget_worker_errors(table) -> None:
    with contextlib.suppress(OSError):
        os.unlink(_error_file(table))
