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
    "pair_table",
]

MAX_TABLE_BITS = 16  # decode tables beyond 64 Ki entries stop fitting any cache


def _huffman_lengths(counts: np.ndarray) -> np.ndarray:
    """Unlimited Huffman code lengths of the symbols with nonzero count."""
    lengths = np.zeros(len(counts), dtype=np.int64)
    present = np.flatnonzero(counts)
    if len(present) == 1:
        lengths[present[0]] = 1
        return lengths
    # heap of (weight, tiebreak, symbols under this node)
    heap: list[tuple[int, int, list[int]]] = [(int(counts[s]), int(s), [int(s)]) for s in present]
    heapq.heapify(heap)
    tiebreak = len(counts)
    while len(heap) > 1:
        w1, _, s1 = heapq.heappop(heap)
        w2, _, s2 = heapq.heappop(heap)
        for s in s1:
            lengths[s] += 1
        for s in s2:
            lengths[s] += 1
        heapq.heappush(heap, (w1 + w2, tiebreak, s1 + s2))
        tiebreak += 1
    return lengths


def code_lengths(counts: np.ndarray, max_length: int) -> np.ndarray:
    """Huffman code lengths (uint8, one per symbol) with no code longer than ``max_length``.

    Over-long codes are clamped, then the rarest symbols still under the limit are lengthened
    until Kraft's inequality holds, and spare code space is handed back to the most frequent
    symbols. On weight statistics this costs well under 0.1% against unlimited Huffman.
    """
    counts = np.asarray(counts, dtype=np.int64)
    if not 1 <= max_length <= MAX_TABLE_BITS:
        raise ValueError(f"max_length must be in 1..{MAX_TABLE_BITS}, got {max_length}")
    present = np.flatnonzero(counts)
    if len(present) == 0:
        return np.zeros(len(counts), dtype=np.uint8)
    if len(present) > 1 << max_length:
        raise ValueError(f"{len(present)} symbols do not fit codes of {max_length} bits")
    lengths = np.minimum(_huffman_lengths(counts), max_length)
    budget = 1 << max_length
    kraft = int(sum(1 << (max_length - int(lengths[s])) for s in present))
    # rarest first, so lengthening costs the fewest bits
    by_rarity = sorted(present.tolist(), key=lambda s: (counts[s], -s))
    while kraft > budget:
        candidates = [s for s in by_rarity if lengths[s] < max_length]
        # lengthen the rarest symbol whose code is the longest one still below the limit
        longest = max(int(lengths[s]) for s in candidates)
        s = next(s for s in candidates if lengths[s] == longest)
        kraft -= 1 << (max_length - longest - 1)
        lengths[s] += 1
    for s in reversed(by_rarity):  # most frequent first: shorten while code space is left
        while lengths[s] > 1 and kraft + (1 << (max_length - int(lengths[s]))) <= budget:
            kraft += 1 << (max_length - int(lengths[s]))
            lengths[s] -= 1
    return lengths.astype(np.uint8)


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


def canonical_codes(lengths: np.ndarray) -> np.ndarray:
    """The canonical code value of each symbol (uint32), MSB-first, from its length."""
    codes = np.zeros(len(lengths), dtype=np.uint32)
    order = sorted((int(n), s) for s, n in enumerate(lengths.tolist()) if n > 0)
    code = 0
    previous = order[0][0] if order else 0
    for length, symbol in order:
        code <<= length - previous
        codes[symbol] = code
        code += 1
        previous = length
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
