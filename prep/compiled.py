"""numba's ``njit`` for the project's compiled loops, kept on disk where a cache can be written.

``njit(cache=True)`` refuses to define a function at all (RuntimeError, "no locator available")
when neither the package's ``__pycache__`` nor the user's cache folder is writable: a read-only
install in a container with ``HOME=/``. There the loop is compiled in each process instead (a
second or two once), rather than the import failing.
"""

from numba import njit


def compiled(function):
    """``function`` compiled with numba (no bounds checks, the GIL released), cached on disk
    where it can be."""
    try:
        return njit(nogil=True, cache=True, boundscheck=False)(function)
    except RuntimeError:  # no writable cache folder: compile in each process
        return njit(nogil=True, boundscheck=False)(function)
