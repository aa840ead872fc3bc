"""Offline stage: raw images -> resized HDF5 shards with a manifest (``imgprep``).

The reader other stages use is ``prep.shards.open_shards``.
"""

__version__ = "0.1.0"
