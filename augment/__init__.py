"""Online stage: crop, flip, PCA lighting and normalisation of shard images, on GPU or CPU.

    from augment import AugmentSpec, Loader

``Loader`` is imported on first use (it brings torch), so that the command lines and
``augment.spec`` stay quick to import.
"""

__all__ = ["AugmentSpec", "Loader"]


def __getattr__(name: str):
    if name == "Loader":
        from augment.loader import Loader

        return Loader
    if name == "AugmentSpec":
        from augment.spec import AugmentSpec

        return AugmentSpec
    raise AttributeError(f"module 'augment' has no attribute {name!r}")
