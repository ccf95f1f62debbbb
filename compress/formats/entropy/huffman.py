"""Length-limited canonical Huffman codes over a byte alphabet, and their decode tables.

A code is stored as one byte per symbol: its length in bits (0 = the symbol does not occur).
Canonical codes follow from the lengths alone (shorter codes first, ties by symbol value), so the
table on disk is just ``alphabet`` bytes. Lengths are limited to ``max_length`` bits so that one
peek of ``max_length`` bits and one lookup in a ``2**max_length`` table decode any symbol.
"""

from __future__ import annotations

import heapq

import numpy as np

from compress.errors import FormatError

__all__ = [
    "MAX_TABLE_BITS",
    "canonical_codes",
    "check_lengths",
    "code_lengths",
    "decode_table",
    "pair_code_table",
    "pair_table",
]

MAX_TABLE_BITS = 16  # decode tables beyond 64 Ki entries stop fitting any cache


def _huffman_lengths(counts: np.ndarray) -> np.ndarray:
    """Unlimited Huffman code lengths (int64) of the symbols with nonzero count."""
    lengths = np.zeros(len(counts), dtype=np.int64)
    present = np.flatnonzero(counts)
    if len(present) == 1:
        lengths[present[0]] = 1
    if len(present) <= 1:
        return lengths
    m = len(present)
    parent = np.zeros(2 * m - 1, dtype=np.int64)
    # heap of (weight, node); leaves are nodes 0..m-1 in symbol order, so ties break by symbol
    heap = [(int(counts[s]), i) for i, s in enumerate(present.tolist())]
    heapq.heapify(heap)
    node = m
    while len(heap) > 1:
        w1, a = heapq.heappop(heap)
        w2, b = heapq.heappop(heap)
        parent[a] = parent[b] = node
        heapq.heappush(heap, (w1 + w2, node))
        node += 1
    depth = np.zeros(2 * m - 1, dtype=np.int64)
    for k in range(2 * m - 3, -1, -1):  # parents come after their children
        depth[k] = depth[parent[k]] + 1
    lengths[present] = depth[:m]
    return lengths


def code_lengths(counts: np.ndarray, max_length: int) -> np.ndarray:
    """Huffman code lengths (uint8, one per symbol) with no code longer than ``max_length``.

    Over-long codes are folded back into the tree the way JPEG does it (ITU T.81 K.3: two leaves
    at the deepest level become one a level up plus two under a shallower leaf), then the lengths
    go to the symbols by frequency, most frequent shortest. On weight statistics this costs well
    under 0.1% against unlimited Huffman.
    """
    counts = np.asarray(counts, dtype=np.int64)
    if not 1 <= max_length <= MAX_TABLE_BITS:
        raise ValueError(f"max_length must be in 1..{MAX_TABLE_BITS}, got {max_length}")
    present = np.flatnonzero(counts)
    if len(present) > 1 << max_length:
        raise ValueError(f"{len(present)} symbols do not fit codes of {max_length} bits")
    lengths = _huffman_lengths(counts)
    deepest = int(lengths.max(initial=0))
    if deepest <= max_length:
        return lengths.astype(np.uint8)
    per_length = np.bincount(lengths[present], minlength=deepest + 1).tolist()
    for level in range(deepest, max_length, -1):
        while per_length[level] > 0:
            shallower = level - 2
            while per_length[shallower] == 0:
                shallower -= 1
            per_length[level] -= 2
            per_length[level - 1] += 1
            per_length[shallower + 1] += 2
            per_length[shallower] -= 1
    by_frequency = present[np.lexsort((present, -counts[present]))]
    sizes = np.repeat(np.arange(max_length + 1), per_length[: max_length + 1])
    out = np.zeros(len(counts), dtype=np.uint8)
    out[by_frequency] = sizes
    return out


def check_lengths(lengths: np.ndarray, alphabet: int, max_length: int, where: str) -> None:
    """Refuse a stored table that cannot be a prefix code of this alphabet."""
    if lengths.dtype != np.uint8 or lengths.ndim != 1 or len(lengths) != alphabet:
        raise FormatError(
            f"{where}: code table has shape {tuple(lengths.shape)} and dtype {lengths.dtype}, "
            f"expected ({alphabet},) uint8",
            hint="the export is corrupted or was written by another version; re-export it",
        )
    if int(lengths.max(initial=0)) > max_length:
        raise FormatError(
            f"{where}: code length {int(lengths.max())} exceeds the limit {max_length}",
            hint="the export is corrupted; re-export it",
        )
    used = lengths[lengths > 0].astype(np.int64)
    if int(np.sum(np.left_shift(1, max_length - used))) > 1 << max_length:
        raise FormatError(
            f"{where}: code table violates Kraft's inequality (not a prefix code)",
            hint="the export is corrupted; re-export it",
        )


def _code_starts(lengths: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """(symbols in canonical order, where each one's codes start in a ``width``-bit table)."""
    used = np.flatnonzero(lengths)
    order = used[np.lexsort((used, lengths[used]))]  # shorter codes first, ties by symbol
    span = np.left_shift(np.int64(1), width - lengths[order].astype(np.int64))
    starts = np.cumsum(span) - span
    return order, starts


def canonical_codes(lengths: np.ndarray) -> np.ndarray:
    """The canonical code value of each symbol (uint32), MSB-first, from its length."""
    codes = np.zeros(len(lengths), dtype=np.uint32)
    width = int(lengths.max(initial=0))
    order, starts = _code_starts(lengths, width)
    codes[order] = starts >> (width - lengths[order].astype(np.int64))
    return codes


def decode_table(lengths: np.ndarray, table_bits: int) -> np.ndarray:
    """Lookup table of ``2**table_bits`` uint16: ``symbol | length << 8`` (0 = no such code).

    Index it with the next ``table_bits`` bits of the stream (MSB first).
    """
    table = np.zeros(1 << table_bits, dtype=np.uint16)
    codes = canonical_codes(lengths)
    for symbol, length in enumerate(lengths.tolist()):
        if length == 0:
            continue
        first = int(codes[symbol]) << (table_bits - length)
        table[first : first + (1 << (table_bits - length))] = symbol | (length << 8)
    return table


def pair_table(lengths: np.ndarray, table_bits: int) -> np.ndarray:
    """Lookup table of ``2**table_bits`` uint32 entries that decode up to two symbols at once.

    Entry bits: 0-7 first symbol, 8-15 second symbol, 16-20 bits consumed by the entry, 21-25
    bits of the first symbol alone, 26-27 how many symbols (1 or 2), 31 = not a code. A non-code
    entry still consumes ``table_bits`` so that a decoder on a corrupt stream keeps moving.
    With ~2.7-bit exponent codes most 12-bit windows hold two codes, halving the lookups.
    """
    single = decode_table(lengths, table_bits).astype(np.int64)
    mask = (1 << table_bits) - 1
    index = np.arange(1 << table_bits, dtype=np.int64)
    first_len = single >> 8
    second = single[(index << first_len) & mask]
    second_len = second >> 8
    two = (first_len > 0) & (second_len > 0) & (first_len + second_len <= table_bits)
    entry = (
        (single & 0xFF)
        | (np.where(two, second & 0xFF, 0) << 8)
        | (np.where(two, first_len + second_len, first_len) << 16)
        | (first_len << 21)
        | (np.where(two, 2, 1) << 26)
    )
    invalid = (table_bits << 16) | (table_bits << 21) | (1 << 26) | (1 << 31)
    entry = np.where(first_len == 0, invalid, entry)
    return entry.astype(np.uint32)


PAIR_INVALID = 1 << 31


def pair_code_table(symbols: np.ndarray, lengths: np.ndarray, max_length: int) -> np.ndarray:
    """Decode table of a code over exponent pairs: ``2**max_length`` uint32 entries.

    Pair ``i * A + j`` (``A = len(symbols)``) stands for the bytes ``symbols[i], symbols[j]``.
    Entry bits: 0-7 first byte, 8-15 second byte, 16-20 code length; a window that starts no
    code reads ``PAIR_INVALID | max_length << 16`` (it still consumes bits, so a decoder on a
    corrupt stream keeps moving and ends).
    """
    alphabet = len(symbols)
    table = np.full(1 << max_length, PAIR_INVALID | (max_length << 16), dtype=np.uint32)
    order, starts = _code_starts(lengths, max_length)
    size = lengths[order].astype(np.int64)
    value = (
        symbols[order // alphabet].astype(np.int64)
        | (symbols[order % alphabet].astype(np.int64) << 8)
        | (size << 16)
    )
    end = int(starts[-1] + (1 << (max_length - int(size[-1])))) if len(order) else 0
    table[:end] = np.repeat(value, np.left_shift(1, max_length - size)).astype(np.uint32)
    return table
