"""The errors imgprep raises on purpose, and the one place that reports them.

Every such error derives from ``ImgprepError`` and carries one sentence for the user. Each
command is wrapped in ``report_errors``: without ``IMGPREP_DEBUG`` an ImgprepError is that one
line (exit 1); with ``IMGPREP_DEBUG=1`` it keeps its traceback, and so does an error that
happened in another process (a training rank), whose traceback travels with it as
``remote_traceback``. Any other exception is a bug and always shows its traceback.
"""

from __future__ import annotations

import functools
import os
import sys

DEBUG_ENV = "IMGPREP_DEBUG"


class ImgprepError(Exception):
    """Base class: a problem the user can fix (bad arguments, bad input, bad output folder).

    ``remote_traceback``: the traceback text of the process the error happened in, when that
    is not this one."""

    remote_traceback: str | None = None


class PrepError(ImgprepError):
    """A problem of the offline stage (imgprep shard, pca-stats, the shard reader)."""


class SourceError(PrepError):
    """The source folder is missing, empty or laid out in a way we do not understand."""


class OutputError(PrepError):
    """The output folder cannot be written, or holds something we must not overwrite."""


class ShardFormatError(PrepError):
    """A shard folder or file is not ours, or is a version we cannot read."""


class BadImage(Exception):
    """One source file cannot become a training image; the message is its reject reason."""


_CONTROLS = {code: f"\\x{code:02x}" for code in (*range(0x20), *range(0x7F, 0xA0))}
_CONTROLS.update({ord("\t"): "\\t", ord("\n"): "\\n", ord("\r"): "\\r"})


def escaped(text) -> str:
    """``text`` with each control character (C0, DEL, C1) written as a backslash escape, for
    printing names that come from files: a file named with an escape sequence must not recolour
    or retitle the terminal, move its cursor, or forge a line of our output."""
    return str(text).translate(_CONTROLS)


def debugging() -> bool:
    return bool(os.environ.get(DEBUG_ENV))


def quiet_cleanup_echoes() -> None:
    """After a write has failed (a full disk), h5py's objects still try to flush when they are
    garbage-collected; Cython prints each such failure twice, through ``sys.excepthook`` and as
    "Exception ignored ...", with tracebacks, after our one-line error. They repeat the error
    already reported: with IMGPREP_DEBUG=1 they are printed, otherwise not. Anything else is."""
    if debugging() or getattr(sys.excepthook, "quiets_h5py", False):
        return
    default_excepthook, default_unraisablehook = sys.excepthook, sys.unraisablehook

    def excepthook(kind, value, tb):
        if not _h5py_cleanup_failure(value, tb):
            default_excepthook(kind, value, tb)

    def unraisablehook(unraisable):
        if not _h5py_cleanup_failure(unraisable.exc_value, unraisable.exc_traceback):
            default_unraisablehook(unraisable)

    excepthook.quiets_h5py = True
    sys.excepthook, sys.unraisablehook = excepthook, unraisablehook


def _h5py_cleanup_failure(error, tb) -> bool:
    """An OSError raised while h5py deallocated an object (h5py/_objects.pyx)."""
    if not isinstance(error, OSError):
        return False
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and tb.tb_frame.f_code.co_filename.endswith("_objects.pyx")


def report_errors(command):
    """Our own errors become one line (exit 1), Ctrl-C exits 130; anything else keeps its
    traceback. With IMGPREP_DEBUG=1 our errors keep theirs too, a remote one's printed first."""
    import click

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        quiet_cleanup_echoes()  # forked workers inherit it
        try:
            return command(*args, **kwargs)
        except ImgprepError as error:
            if debugging():
                if error.remote_traceback:
                    print(error.remote_traceback, file=sys.stderr, end="")
                raise
            raise click.ClickException(f"{escaped(error)}  ({DEBUG_ENV}=1 shows the traceback)") from None
        except click.ClickException as error:  # ours too (a path in it may come from a file)
            error.message = escaped(error.message)
            raise
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            raise SystemExit(130) from None

    return wrapper
