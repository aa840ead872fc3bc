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


def shards_folder(given=None) -> Path:
    """The shard folder a command works on: ``given``, else $IMGPREP_SHARDS, else ./shards."""
    return Path(given) if given else Path(os.environ.get(SHARDS_ENV, DEFAULT_SHARDS))
