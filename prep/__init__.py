"""Offline stage: raw images -> resized HDF5 shards with a manifest (``imgprep``).

The reader other stages use is ``prep.shards.open_shards``.
"""

import os
from pathlib import Path

__version__ = "0.1.0"

DEFAULT_SHARDS = "shards"  # the shard folder every command uses when none is named ...
SHARDS_ENV = "IMGPREP_SHARDS"  # ... unless this environment variable names one
# How shards store pixels (each a class in prep.encodings), and the policy whose images keep their
# aspect ratio (format version 2). Here, not there, so that the command lines import no numpy.
ENCODINGS = ("raw", "jpeg")
KEEP_ASPECT = "keep"


def shards_folder(given=None):
    """The shard folder a command works on: ``given``, else $IMGPREP_SHARDS, else ./shards; a
    Path, or a URL string (``s3://bucket/prefix``) as given."""
    if not given:
        refuse_an_empty_shards_variable()
        given = os.environ.get(SHARDS_ENV, DEFAULT_SHARDS)
    if isinstance(given, str) and "://" in given:
        from prep.remote import as_url

        return as_url(given) or Path(given)
    return Path(given)


def refuse_an_empty_shards_variable() -> None:
    """$IMGPREP_SHARDS set to nothing is a mistake (a variable that expanded to nothing), not
    the current folder."""
    if SHARDS_ENV in os.environ and not os.environ[SHARDS_ENV].strip():
        from prep.errors import PrepError

        raise PrepError(f"${SHARDS_ENV} is set but empty: name a folder in it, or unset it")
