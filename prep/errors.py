"""Errors the prep stage raises on purpose.

Each carries one sentence meant for the user; ``prep.cli`` prints it without a traceback.
"""


class PrepError(Exception):
    """Base class: a problem the user can fix (bad arguments, bad input, bad output folder)."""


class SourceError(PrepError):
    """The source folder is missing, empty or laid out in a way we do not understand."""


class OutputError(PrepError):
    """The output folder cannot be written, or holds something we must not overwrite."""


class ShardFormatError(PrepError):
    """A shard folder or file is not ours, or is a version we cannot read."""


class BadImage(Exception):
    """One source file cannot become a training image; the message is its reject reason."""
