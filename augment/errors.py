"""Errors of the online stage; each message is one sentence for the user."""

from prep.errors import PrepError


class AugmentError(PrepError):
    """A loader cannot be built as asked (backend, device, batch size, statistics)."""
