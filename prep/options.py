"""Command-line types that imgprep and train share."""

from __future__ import annotations

import click


class FolderOrFile(click.Path):
    """click.Path that refuses an empty value: ``--out ''`` (a variable that expanded to nothing)
    would otherwise be the current folder, and a command would write, or read, there."""

    def convert(self, value, param, ctx):
        if isinstance(value, str) and not value.strip():
            self.fail("is empty: name a folder or file (an empty path would be the current folder)", param, ctx)
        return super().convert(value, param, ctx)


SEED = click.IntRange(min=0)  # numpy's and torch's seeds are non-negative
