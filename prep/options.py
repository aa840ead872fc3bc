"""Command-line types that imgprep and train share."""

from __future__ import annotations

import click


class FolderOrFile(click.Path):
    """click.Path that refuses an empty value: ``--out ''`` (a variable that expanded to nothing)
    would otherwise be the current folder, and a command would write, or read, there. With
    ``urls=True`` a URL (``s3://bucket/prefix``) is taken as it is, a string."""

    def __init__(self, *args, urls: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.urls = urls

    def convert(self, value, param, ctx):
        if isinstance(value, str) and not value.strip():
            self.fail("is empty: name a folder or file (an empty path would be the current folder)", param, ctx)
        if self.urls and isinstance(value, str) and "://" in value:
            from prep.remote import as_url

            if url := as_url(value):
                return url
        return super().convert(value, param, ctx)


UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
         "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


class ByteSize(click.ParamType):
    """A number of bytes: 123456, 500MB, 100GB, 1.5TiB (decimal and binary units)."""

    name = "SIZE"

    def convert(self, value, param, ctx):
        if isinstance(value, int):
            return value
        import re

        match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?)\s*([A-Za-z]*)\s*", str(value))
        unit = match[2].upper() if match else None
        if not match or unit not in UNITS or float(match[1]) * UNITS[unit] < 1:
            self.fail(f"{value!r} is not a size: write e.g. 500MB, 100GB or 1TiB", param, ctx)
        return int(float(match[1]) * UNITS[unit])


SEED = click.IntRange(min=0)  # numpy's and torch's seeds are non-negative
