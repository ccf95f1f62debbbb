"""C++ encoder and decoder of chunked Huffman streams, built on first use.

Every read of the stream is bounds-checked (bytes past the end read as zero) and every write is
bounded by the chunk's symbol count, so a corrupt stream can only produce wrong symbols or an
error status, never an out-of-bounds access. The Python side turns a status into a
:class:`~compress.errors.FormatError`.

Threads are plain ``std::thread`` helpers that take groups of chunks from an atomic counter; the
caller waits only for helpers that actually joined in (see ``parallel_for``). OpenMP workers (the
runtime is shared with torch) spin-wait between parallel regions, and a parallel region waits for
every worker to be scheduled: on a busy 2-core machine that made two threads slower than one.
"""

from __future__ import annotations

from functools import cache
from importlib import resources
from types import ModuleType

from compress.utils.native import load_native

__all__ = ["native_module"]


_FUNCTIONS = [
    "chunk_bits",
    "encode",
    "decode",
    "decode_bf16",
    "decode_bf16_pairs",
    "exponent_pairs",
    "histogram",
    "pair_decode_tables",
    "split_bf16",
]


SOURCE = "entropy_codec.cpp"
"""The C++ translation unit, shipped as package data beside this module."""


@cache
def _source() -> str:
    return resources.files(__package__).joinpath(SOURCE).read_text(encoding="utf-8")


def native_module() -> ModuleType | None:
    """The compiled codec, or None (logged once) where no compiler is available."""
    return load_native("entropy_codec", _source(), _FUNCTIONS)
