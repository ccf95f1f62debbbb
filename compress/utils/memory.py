"""Handing freed heap memory back to the operating system between layers.

glibc keeps freed small and medium blocks in its arenas, so a process that frees a layer's
temporaries still shows them in its resident set; in a layer-by-layer run the next layer's
allocations do not always fit the holes, and the resident set creeps up. ``malloc_trim(0)``
returns the free pages. On other C libraries this is a no-op.

glibc also raises its mmap threshold each time a mapped block is freed (up to 32 MB), so after
the first large tensors, blocks of a few MB to 32 MB (a layer's weights, activations, codes)
come from the heap and fragment it. :func:`map_large_blocks` pins the threshold instead, so
such blocks are mapped and go back to the OS the moment they are freed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import logging
from collections.abc import Callable

__all__ = ["map_large_blocks", "release_free_memory"]

log = logging.getLogger(__name__)


_M_MMAP_THRESHOLD = -3  # mallopt parameter number in glibc's malloc.h


@functools.cache
def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c"))
    except (OSError, TypeError):
        return None


@functools.cache
def map_large_blocks(threshold: int = 4 * 1024 * 1024) -> bool:
    """Serve allocations of ``threshold`` bytes and more with their own mappings (glibc
    ``mallopt(M_MMAP_THRESHOLD)``), for the rest of the process; False where unavailable."""
    mallopt = getattr(_libc(), "mallopt", None)
    if mallopt is None:
        log.debug("mallopt is not available: large blocks may fragment the heap")
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, threshold))


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    trim = getattr(_libc(), "malloc_trim", None)
    if trim is None:
        log.debug("malloc_trim is not available: freed heap memory stays with the process")
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


def release_free_memory(*, collect: bool = True) -> None:
    """Collect garbage (unless ``collect`` is false: nothing cyclic was dropped), then return
    free heap pages to the OS (glibc ``malloc_trim``)."""
    if collect:
        gc.collect()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
