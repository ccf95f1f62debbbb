"""Chunked Huffman streams: BF16 weights (exponents coded in pairs) and integer codes, bit-exact.

Stored tensors of one coded tensor (``C`` = number of chunks):

===========  =============  =======  ===============================================================
name         shape          dtype    meaning
===========  =============  =======  ===============================================================
``symbols``  (A,)           uint8    BF16 (version 2): the ``A`` exponent values present, ascending
``lengths``  (S,)           uint8    Huffman code length of each symbol, 0 = absent (the table);
                                     BF16: ``S = A*A``, symbol ``i*A + j`` = the exponent pair
                                     ``symbols[i], symbols[j]``; codes: ``S = 2**bits``
``offsets``  (C + 1,)       int64    bit offset where chunk c starts (byte-aligned); ``[C]`` = end
``stream``   (B,)           uint8    the codes, MSB-first, chunk after chunk, each zero-padded
                                     to a byte
``raw``      (numel,)       uint8    BF16 only: sign bit (bit 7) and 7 mantissa bits per weight
===========  =============  =======  ===============================================================

Chunk ``c`` holds weights ``[c*chunk, min((c+1)*chunk, numel))``: every chunk's output count is
fixed by its index and its start bit is stored, so chunks decode independently (CPU threads, GPU
lanes) with no counting pass. For BF16, sign and mantissa are close to uniform and stay raw; the
exponent (entropy ~2.6 bits) is Huffman-coded (DFloat11, arXiv 2504.11651). For integer codes
(INT2-INT8 exports) the symbol is the whole code.

Why exponent pairs (codec version 2, measured on SmolLM2-135M, 134.5M weights in 211 tensors):
Huffman over single exponents spends whole bits per symbol and costs 2.650 bits/weight against an
order-0 entropy of 2.611; Huffman over pairs of consecutive exponents, limited to 16-bit codes,
costs 2.614 (2.616 at 14 bits, 2.629 at 12), and its tables (``A*A`` bytes per tensor, ``A`` ~18)
add 0.004 bits/weight. A product model built from the single-exponent table (no pair table
stored) costs 2.630: adjacent exponents are not independent. Pairs also decode as fast as the
version-1 two-symbol lookups: the C++ decoder's first-level table holds up to two pair codes (four
exponents) per entry, and the rare codes longer than its 12 bits are decoded canonically (first
code per length), so no 2**16-entry table is built per tensor. rANS would reach the entropy too
but needs a multiply and a renormalisation branch per exponent.
Version-1 exports (single exponents, ``symbols`` absent) still decode. A chunk with an odd count
ends with one padding exponent, never written out.
"""

from __future__ import annotations

import logging
import os
import zlib
from typing import Any, Literal

import numpy as np
import torch

from compress.errors import FormatError
from compress.formats.entropy.huffman import (
    canonical_codes,
    check_lengths,
    code_lengths,
    decode_table,
    pair_code_table,
    pair_table,
)
from compress.formats.entropy.native import native_module
from compress.formats.entropy.streams import CodedTensor, StreamSpec

__all__ = [
    "CODEC",
    "CodedTensor",
    "StreamSpec",
    "checksum",
    "decode",
    "encode_bf16",
    "encode_codes",
    "entropy_bits",
    "exponent_pairs",
]

log = logging.getLogger(__name__)

CODEC = "huffman-chunked"
CODEC_VERSION = 2
READABLE_VERSIONS = (1, 2)  # 1: BF16 exponents coded one at a time
DEFAULT_CHUNK = 16384
DEFAULT_TABLE_BITS = 12
DEFAULT_PAIR_BITS = 16
FAST_BITS = 12  # first-level table of the C++ pair decoder: 2**12 x 8 bytes, L1-sized

Backend = Literal["auto", "native", "torch", "triton"]
_ERRORS = {
    1: "a code that is not in the table",
    2: "a chunk that runs past its end offset",
    3: "a chunk that ends before its end offset",
    10: "offsets that do not start at 0",
    11: "offsets that decrease or are not byte-aligned",
    12: "offsets past the end of the stream",
}


def _threads(threads: int | None) -> int:
    return threads if threads else (torch.get_num_threads() or os.cpu_count() or 1)


def checksum(tensor: torch.Tensor) -> str:
    """CRC-32 of a tensor's bytes: catches a wrong decode cheaply (files carry SHA-256)."""
    data = tensor.detach().contiguous().view(torch.uint8).reshape(-1).numpy()
    return f"crc32:{zlib.crc32(data.data) & 0xFFFFFFFF:08x}"


def entropy_bits(symbols: torch.Tensor, alphabet: int = 256) -> float:
    """Empirical (order-0) entropy of the symbols times their count: the coding bound in bits."""
    counts = torch.bincount(symbols.reshape(-1).to(torch.int64), minlength=alphabet).double()
    total = counts.sum()
    p = counts[counts > 0] / total
    return float(-(p * p.log2()).sum() * total)


def split_bf16(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """BF16 tensor -> (exponent bytes, sign+mantissa bytes), both flat uint8."""
    bits = values.detach().contiguous().view(torch.int16).reshape(-1)
    native = native_module()
    exponents = torch.empty(bits.numel(), dtype=torch.uint8)
    raw = torch.empty(bits.numel(), dtype=torch.uint8)
    if native is not None:
        native.split_bf16(bits, exponents, raw, _threads(None))
        return exponents, raw
    wide = bits.to(torch.int32) & 0xFFFF
    exponents.copy_((wide >> 7) & 0xFF)
    raw.copy_(((wide >> 8) & 0x80) | (wide & 0x7F))
    return exponents, raw


def _histogram(symbols: torch.Tensor, alphabet: int) -> torch.Tensor:
    """int64 counts of uint8 or int32 symbols in ``[0, alphabet)``."""
    native = native_module()
    if native is not None:
        counts = native.histogram(symbols, alphabet)
    else:
        counts = torch.bincount(symbols.to(torch.int64), minlength=alphabet)
    if counts.numel() > alphabet or int(counts.sum()) != symbols.numel():
        raise ValueError(f"symbols exceed the alphabet of {alphabet}")
    return counts


def _encode(
    symbols: torch.Tensor, alphabet: int, chunk: int, table_bits: int, threads: int | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Flat symbols (uint8, or int32 pair indices) -> (lengths, offsets, stream, table_bits)."""
    if chunk <= 0:
        raise ValueError(f"chunk must be positive, got {chunk}")
    counts = _histogram(symbols, alphabet).numpy()
    # many distinct symbols (odd tensors: every exponent occurs) need longer codes
    table_bits = max(table_bits, (int(np.count_nonzero(counts)) - 1).bit_length())
    lengths_np = code_lengths(counts, table_bits)
    lengths = torch.from_numpy(lengths_np)
    codes = torch.from_numpy(canonical_codes(lengths_np).astype(np.int32))
    native = native_module()
    n = symbols.numel()
    n_chunks = -(-n // chunk)
    if native is not None:
        bits = native.chunk_bits(symbols, lengths, chunk, _threads(threads))
    else:
        per_symbol = lengths.to(torch.int64)[symbols.to(torch.int64)]
        padded = torch.nn.functional.pad(per_symbol, (0, n_chunks * chunk - n))
        bits = padded.view(n_chunks, chunk).sum(dim=1)
    # byte-aligned chunk starts: <= 7 bits of padding per chunk
    offsets = torch.zeros(n_chunks + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum((bits + 7) // 8 * 8, dim=0)
    stream = torch.zeros(int(offsets[-1]) // 8, dtype=torch.uint8)
    if native is not None:
        native.encode(symbols, lengths, codes, offsets, chunk, stream, _threads(threads))
    else:
        _encode_torch(symbols, lengths, codes, offsets, chunk, stream)
    return lengths, offsets, stream, table_bits


def _encode_torch(
    symbols: torch.Tensor,
    lengths: torch.Tensor,
    codes: torch.Tensor,
    offsets: torch.Tensor,
    chunk: int,
    stream: torch.Tensor,
) -> None:
    """Vectorised fallback encoder: every code lands in the (up to 3) bytes it spans."""
    n = symbols.numel()
    if n == 0:
        return
    idx = symbols.to(torch.int64)
    length = lengths.to(torch.int64)[idx]
    code = codes.to(torch.int64)[idx]
    chunk_of = torch.arange(n, dtype=torch.int64) // chunk
    ends = torch.cumsum(length, 0)
    starts_in_stream = ends - length
    chunk_first = starts_in_stream[torch.arange(0, n, chunk, dtype=torch.int64)]
    pos = offsets[:-1][chunk_of] + starts_in_stream - chunk_first[chunk_of]
    # code aligned so that its first bit is bit (pos % 8) of a 24-bit big-endian window
    window = code << (24 - length - (pos & 7))
    byte = pos >> 3
    acc = torch.zeros(stream.numel() + 3, dtype=torch.int64)
    for shift, k in ((16, 0), (8, 1), (0, 2)):
        part = (window >> shift) & 0xFF
        # distinct codes never share a bit, so adding their bytes is OR-ing them
        acc.index_add_(0, byte + k, part)
    stream.copy_(acc[: stream.numel()].to(torch.uint8))


def exponent_pairs(exponents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat exponent bytes -> (pair indices, symbols).

    ``symbols``: the ``A`` exponent values present, ascending, (A,) uint8 (at least one);
    pair ``k`` = ``i*A + j`` where ``symbols[i], symbols[j]`` are exponents ``2k, 2k+1``
    (an odd count pads the last pair with ``symbols[0]``): (ceil(numel / 2),) int32.
    """
    present = _histogram(exponents, 256).nonzero().reshape(-1)
    if present.numel() == 0:
        present = torch.zeros(1, dtype=torch.int64)
    alphabet = present.numel()
    dense = torch.zeros(256, dtype=torch.int32)
    dense[present] = torch.arange(alphabet, dtype=torch.int32)
    native = native_module()
    if native is not None:
        pairs = native.exponent_pairs(exponents, dense, alphabet)
    else:
        index = dense[exponents.to(torch.int64)]
        if index.numel() % 2:
            index = torch.cat([index, torch.zeros(1, dtype=torch.int32)])
        pairs = index[0::2] * alphabet + index[1::2]
    return pairs, present.to(torch.uint8)


def encode_bf16(
    values: torch.Tensor,
    *,
    chunk: int = DEFAULT_CHUNK,
    table_bits: int = DEFAULT_PAIR_BITS,
    threads: int | None = None,
) -> CodedTensor:
    """Code a BF16 tensor: exponents Huffman-coded in pairs, raw sign+mantissa bytes.

    ``table_bits`` limits the pair code length; ``chunk`` (weights per chunk) must be even.
    """
    if values.dtype != torch.bfloat16:
        raise ValueError(f"encode_bf16 needs a bfloat16 tensor, got {values.dtype}")
    if chunk <= 0 or chunk % 2:
        raise ValueError(f"chunk must be a positive even number (pairs of weights), got {chunk}")
    values = values.detach().cpu().contiguous()
    exponents, raw = split_bf16(values)
    pairs, symbols = exponent_pairs(exponents)
    alphabet = symbols.numel()
    lengths, offsets, stream, table_bits = _encode(
        pairs, alphabet * alphabet, chunk // 2, table_bits, threads
    )
    spec = StreamSpec(
        "bf16", tuple(values.shape), chunk, table_bits, alphabet, checksum(values), pairs=True
    )
    return CodedTensor(spec, lengths, offsets, stream, raw, symbols)


def encode_codes(
    codes: torch.Tensor,
    bits: int,
    *,
    chunk: int = DEFAULT_CHUNK,
    table_bits: int = DEFAULT_TABLE_BITS,
    threads: int | None = None,
) -> CodedTensor:
    """Code a uint8 tensor of integer codes in ``[0, 2**bits)``."""
    if codes.dtype != torch.uint8 or not 2 <= bits <= 8:
        raise ValueError(f"encode_codes needs uint8 codes of 2..8 bits, got {codes.dtype}/{bits}")
    codes = codes.detach().cpu().contiguous()
    if codes.numel() and int(codes.max()) >= 1 << bits:
        raise ValueError(f"codes exceed {bits} bits")
    table_bits = max(table_bits, bits)
    lengths, offsets, stream, table_bits = _encode(
        codes.reshape(-1), 1 << bits, chunk, table_bits, threads
    )
    spec = StreamSpec("codes", tuple(codes.shape), chunk, table_bits, 1 << bits, checksum(codes))
    return CodedTensor(spec, lengths, offsets, stream, None)


def _validate(coded: CodedTensor, where: str) -> None:
    spec = coded.spec
    problems = []
    if spec.pairs and (
        coded.symbols is None
        or coded.symbols.dtype != torch.uint8
        or tuple(coded.symbols.shape) != (spec.alphabet,)
    ):
        got = None if coded.symbols is None else (tuple(coded.symbols.shape), coded.symbols.dtype)
        raise FormatError(
            f"{where}: symbols {got}, expected ({spec.alphabet},) uint8",
            hint="the export is corrupted or was written by another version; re-export it",
        )
    size = spec.alphabet * spec.alphabet if spec.pairs else spec.alphabet
    check_lengths(coded.lengths.numpy(), size, spec.table_bits, where)
    if coded.offsets.dtype != torch.int64 or tuple(coded.offsets.shape) != (spec.n_chunks + 1,):
        problems.append(
            f"offsets {tuple(coded.offsets.shape)} {coded.offsets.dtype}, expected "
            f"({spec.n_chunks + 1},) int64"
        )
    if coded.stream.dtype != torch.uint8 or coded.stream.dim() != 1:
        problems.append(
            f"stream {tuple(coded.stream.shape)} {coded.stream.dtype}, expected 1-D uint8"
        )
    raw = coded.raw
    if spec.kind == "bf16" and (
        raw is None or raw.dtype != torch.uint8 or raw.numel() != spec.numel
    ):
        got = None if coded.raw is None else (tuple(coded.raw.shape), coded.raw.dtype)
        problems.append(f"raw {got}, expected ({spec.numel},) uint8")
    if problems:
        raise FormatError(
            f"{where}: " + "; ".join(problems),
            hint="the export is corrupted or was written by another version; re-export it",
        )


def _status_error(status: int, where: str) -> FormatError:
    code, chunk = divmod(int(status), 1_000_000)
    return FormatError(
        f"{where}: corrupt entropy-coded stream: {_ERRORS.get(code, f'status {code}')} "
        f"(chunk {chunk})",
        hint="the export is corrupted; re-export it or restore the file",
    )


def decode(
    coded: CodedTensor,
    *,
    where: str = "entropy stream",
    backend: Backend = "auto",
    threads: int | None = None,
    verify: bool = True,
) -> torch.Tensor:
    """Decode to the original tensor (bfloat16 or uint8 codes), bit-exact.

    Raises :class:`FormatError` for any corrupt input: a bad table, bad offsets, a stream that
    does not decode, or (with ``verify``) a checksum mismatch of the decoded bytes.
    """
    _validate(coded, where)
    spec = coded.spec
    native = native_module() if backend in ("auto", "native") else None
    if backend == "native" and native is None:
        raise RuntimeError("the native entropy decoder is not available (see the log)")
    bf16 = spec.kind == "bf16"
    if spec.pairs:
        out, status = _decode_pairs(coded, backend, native, threads)
    elif backend == "triton":
        from compress.formats.entropy.triton_decode import decode_triton

        lut = _single_table(coded)
        out, status = decode_triton(coded, lut)
    elif native is not None:
        pairs = torch.from_numpy(pair_table(coded.lengths.numpy(), spec.table_bits).view(np.int32))
        args = (coded.stream, coded.offsets, pairs, spec.table_bits, spec.chunk, spec.numel)
        if bf16:
            out = torch.empty(spec.numel, dtype=torch.int16)
            assert coded.raw is not None
            status = native.decode_bf16(*args, coded.raw, out, _threads(threads))
        else:
            out = torch.empty(spec.numel, dtype=torch.uint8)
            status = native.decode(*args, out, _threads(threads))
    else:
        symbols, status = decode_symbols_torch(
            coded.stream,
            coded.offsets,
            _single_table(coded),
            spec.table_bits,
            spec.chunk,
            spec.numel,
        )
        if status:
            raise _status_error(status, where)
        out = merge_bf16(symbols, coded.raw) if bf16 and coded.raw is not None else symbols
    if status:
        raise _status_error(status, where)
    result = out.view(torch.bfloat16) if bf16 else out
    result = result.reshape(spec.shape)
    if verify and checksum(result) != spec.checksum:
        raise FormatError(
            f"{where}: decoded tensor checksum {checksum(result)} != {spec.checksum} recorded "
            "at export",
            hint="the export is corrupted; re-export it or restore the file",
        )
    return result


def _single_table(coded: CodedTensor) -> torch.Tensor:
    table = decode_table(coded.lengths.numpy(), coded.spec.table_bits)
    return torch.from_numpy(table.view(np.int16))


def _pair_table(coded: CodedTensor) -> torch.Tensor:
    """The full decode table of a pair-coded BF16 tensor, as int32 (see ``pair_code_table``)."""
    assert coded.symbols is not None
    table = pair_code_table(coded.symbols.numpy(), coded.lengths.numpy(), coded.spec.table_bits)
    return torch.from_numpy(table.view(np.int32))


def _decode_pairs(
    coded: CodedTensor, backend: Backend, native: Any, threads: int | None
) -> tuple[torch.Tensor, int]:
    """Pair-coded BF16 -> (flat int16 bit patterns, status)."""
    spec = coded.spec
    assert coded.raw is not None and coded.symbols is not None
    if backend == "triton":
        from compress.formats.entropy.triton_decode import decode_triton

        return decode_triton(coded, _pair_table(coded))
    if native is not None:
        out = torch.empty(spec.numel, dtype=torch.int16)
        status = native.decode_bf16_pairs(
            coded.stream,
            coded.offsets,
            coded.symbols,
            coded.lengths,
            spec.table_bits,
            FAST_BITS,
            spec.chunk,
            spec.numel,
            coded.raw,
            out,
            _threads(threads),
        )
        return out, int(status)
    exponents, status = decode_pairs_torch(
        coded.stream, coded.offsets, _pair_table(coded), spec.table_bits, spec.chunk, spec.numel
    )
    if status:
        return exponents, status
    return merge_bf16(exponents, coded.raw), 0


def merge_bf16(exponents: torch.Tensor, raw: torch.Tensor) -> torch.Tensor:
    """(exponent bytes, sign+mantissa bytes) -> int16 BF16 bit patterns."""
    e = exponents.to(torch.int32)
    r = raw.to(torch.int32)
    bits = ((r & 0x80) << 8) | (e << 7) | (r & 0x7F)  # in [0, 2**16)
    return (bits - ((bits >> 15) << 16)).to(torch.int16)  # reinterpret as signed 16-bit


def _check_offsets_torch(offsets: torch.Tensor, stream: torch.Tensor) -> int:
    starts, ends = offsets[:-1], offsets[1:]
    if int(offsets[0]) != 0:
        return 10_000_000
    if bool((ends < starts).any()) or bool((starts % 8 != 0).any()):
        return 11_000_000
    if int(offsets[-1]) > stream.numel() * 8:
        return 12_000_000
    return 0


def _end_status(pos: torch.Tensor, ends: torch.Tensor, bad: torch.Tensor) -> int:
    over = pos > ends
    if bool(over.any()):
        return 2_000_000 + int(over.nonzero()[0, 0])
    if bool(bad.any()):
        return 1_000_000 + int(bad.nonzero()[0, 0])
    short = (ends - pos) >= 8
    if bool(short.any()):
        return 3_000_000 + int(short.nonzero()[0, 0])
    return 0


def decode_pairs_torch(
    stream: torch.Tensor,
    offsets: torch.Tensor,
    table: torch.Tensor,
    table_bits: int,
    chunk: int,
    total: int,
) -> tuple[torch.Tensor, int]:
    """Plain-torch decoder of pair-coded exponents (the reference): all chunks in lock-step, one
    pair a step. ``table``: :func:`~.huffman.pair_code_table` as int32.

    Returns (flat uint8 exponents, status) with the same status codes as the native decoder.
    """
    n_chunks = offsets.numel() - 1
    if n_chunks == 0:
        return torch.empty(0, dtype=torch.uint8), 0
    status = _check_offsets_torch(offsets, stream)
    if status:
        return torch.empty(0, dtype=torch.uint8), status
    padded = torch.cat([stream, torch.zeros(4, dtype=torch.uint8)]).to(torch.int64)
    entries = table.to(torch.int64) & 0xFFFFFFFF
    counts = (total - torch.arange(n_chunks, dtype=torch.int64) * chunk).clamp(max=chunk)
    pos = offsets[:-1].clone()
    out = torch.zeros(n_chunks, chunk, dtype=torch.uint8)
    bad = torch.zeros(n_chunks, dtype=torch.bool)
    last = padded.numel() - 4
    for i in range(0, chunk, 2):
        active = counts > i
        window = _peek32(padded, pos, last)
        entry = entries[window >> (32 - table_bits)]
        out[:, i] = (entry & 0xFF).to(torch.uint8)
        out[:, i + 1] = ((entry >> 8) & 0xFF).to(torch.uint8)
        bad |= active & ((entry >> 31) == 1)
        pos += ((entry >> 16) & 31) * active
    return out.reshape(-1)[:total], _end_status(pos, offsets[1:], bad)


def _peek32(padded: torch.Tensor, pos: torch.Tensor, last: int) -> torch.Tensor:
    """The 32 stream bits from bit ``pos`` on (MSB first), per lane; ``padded`` is the int64
    stream with 4 zero bytes appended and ``last`` its length without them."""
    byte = (pos >> 3).clamp(max=last)
    window = (
        (padded[byte] << 24) | (padded[byte + 1] << 16) | (padded[byte + 2] << 8) | padded[byte + 3]
    )
    return (window << (pos & 7)) & 0xFFFFFFFF


def decode_symbols_torch(
    stream: torch.Tensor,
    offsets: torch.Tensor,
    lut: torch.Tensor,
    table_bits: int,
    chunk: int,
    total: int,
) -> tuple[torch.Tensor, int]:
    """Plain-torch decoder (the reference): all chunks advance in lock-step, one symbol a step.

    Returns (flat uint8 symbols, status) with the same status codes as the native decoder.
    """
    n_chunks = offsets.numel() - 1
    starts = offsets[:-1]
    ends = offsets[1:]
    if n_chunks == 0:
        return torch.empty(0, dtype=torch.uint8), 0
    if int(offsets[0]) != 0:
        return torch.empty(0, dtype=torch.uint8), 10_000_000
    if bool((ends < starts).any()) or bool((starts % 8 != 0).any()):
        return torch.empty(0, dtype=torch.uint8), 11_000_000
    if int(offsets[-1]) > stream.numel() * 8:
        return torch.empty(0, dtype=torch.uint8), 12_000_000
    padded = torch.cat([stream, torch.zeros(4, dtype=torch.uint8)]).to(torch.int64)
    table = lut.to(torch.int64) & 0xFFFF
    counts = (total - torch.arange(n_chunks, dtype=torch.int64) * chunk).clamp(max=chunk)
    pos = starts.clone()
    out = torch.zeros(n_chunks, chunk, dtype=torch.uint8)
    bad = torch.zeros(n_chunks, dtype=torch.bool)
    last = padded.numel() - 4
    for i in range(chunk):
        active = counts > i
        window = _peek32(padded, pos, last)
        entry = table[window >> (32 - table_bits)]
        length = entry >> 8
        out[:, i] = (entry & 0xFF).to(torch.uint8)
        bad |= active & (length == 0)
        pos += length * active
    symbols = out.reshape(-1)[:total]
    over = pos > ends
    if bool(over.any()):
        return symbols, 2_000_000 + int(over.nonzero()[0, 0])
    if bool(bad.any()):
        return symbols, 1_000_000 + int(bad.nonzero()[0, 0])
    short = (ends - pos) >= 8
    if bool(short.any()):
        return symbols, 3_000_000 + int(short.nonzero()[0, 0])
    return symbols, 0
