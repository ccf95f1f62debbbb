"""Handing freed heap memory back to the operating system between layers.

glibc keeps freed small and medium blocks in its arenas, so a process that frees a layer's
temporaries still shows them in its resident set; in a layer-by-layer run the next layer's
allocations do not always fit the holes, and the resident set creeps up. ``malloc_trim(0)``
returns the free pages. On other C libraries this is a no-op.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import logging
from collections.abc import Callable

__all__ = ["release_free_memory"]

log = logging.getLogger(__name__)


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        trim = libc.malloc_trim
    except (OSError, AttributeError, TypeError):
        log.debug("malloc_trim is not available: freed heap memory stays with the process")
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


def release_free_memory() -> None:
    """Collect garbage, then return free heap pages to the OS (glibc ``malloc_trim``)."""
    gc.collect()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
