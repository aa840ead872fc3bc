"""Errors of the online stage; each message is one sentence for the user."""

from prep.errors import ImgprepError


class AugmentError(ImgprepError):
    """A loader cannot be built as asked (backend, device, batch size, statistics)."""
