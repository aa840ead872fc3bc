"""Online stage: crop, flip, PCA lighting and normalisation of shard images, on GPU or CPU.

    from augment import AugmentSpec, Loader
"""

from augment.loader import Loader
from augment.spec import AugmentSpec

__all__ = ["AugmentSpec", "Loader"]
