"""Triton decoder of chunked Huffman streams: one lane per chunk, ``BLOCK`` chunks per program.

Each chunk's start bit and output count are stored, so no counting pass or prefix sum is needed
at decode time (the encoder did that work): every lane peeks 32 bits at its position, looks the
next ``table_bits`` of them up in the single-symbol table, writes one symbol (merged with its raw
sign+mantissa byte for BF16) and advances. Reads past the stream are masked to zero and writes
are masked to the lane's count, so a corrupt stream cannot fault; the lane's end position and a
"not a code" flag come back for the same checks as the CPU decoder.

Pair-coded BF16 (codec version 2) runs a second kernel: each step looks the next ``table_bits``
bits up in the full pair table (``2**table_bits`` int32 entries: two exponent bytes and the code
length) and writes two weights.

Runs on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1`` (how the tests run it).
"""

from __future__ import annotations

import torch

from compress.formats.entropy.streams import CodedTensor

__all__ = ["decode_triton"]

_kernel = None
_pair_kernel = None


def _build_pairs() -> object:
    import triton
    import triton.language as tl

    @triton.jit
    def decode_pairs_kernel(
        stream_ptr,
        nbytes,
        offsets_ptr,
        lut_ptr,
        raw_ptr,
        out_ptr,
        end_pos_ptr,
        bad_ptr,
        n_chunks,
        chunk,
        total,
        TABLE_BITS: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        lane = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        live = lane < n_chunks
        pos = tl.load(offsets_ptr + lane, mask=live, other=0)
        first = lane.to(tl.int64) * chunk
        count = tl.minimum(total - first, chunk)
        count = tl.where(live, count, 0)
        bad = tl.full([BLOCK], 0, tl.int32)
        for i in range(0, chunk, 2):
            active = count > i
            byte = pos >> 3
            window = tl.full([BLOCK], 0, tl.int64)
            for k in tl.static_range(4):
                b = tl.load(stream_ptr + byte + k, mask=active & (byte + k < nbytes), other=0).to(
                    tl.int64
                )
                window = (window << 8) | b
            window = (window << (pos & 7)) & 0xFFFFFFFF
            index = window >> (32 - TABLE_BITS)
            entry = tl.load(lut_ptr + index, mask=active, other=0).to(tl.int64) & 0xFFFFFFFF
            length = (entry >> 16) & 31
            bad = bad | (active & ((entry >> 31) != 0)).to(tl.int32)
            for k in tl.static_range(2):
                target = first + i + k
                ok = count > i + k
                r = tl.load(raw_ptr + target, mask=ok, other=0).to(tl.int32)
                e = ((entry >> (8 * k)) & 0xFF).to(tl.int32)
                value = ((r & 0x80) << 8) | (e << 7) | (r & 0x7F)
                value = value - ((value >> 15) << 16)  # as signed 16-bit
                tl.store(out_ptr + target, value.to(tl.int16), mask=ok)
            pos = pos + tl.where(active, length, 0).to(tl.int64)
        tl.store(end_pos_ptr + lane, pos, mask=live)
        tl.store(bad_ptr + lane, bad, mask=live)

    return decode_pairs_kernel


def _build() -> object:
    import triton
    import triton.language as tl

    @triton.jit
    def decode_kernel(
        stream_ptr,
        nbytes,
        offsets_ptr,
        lut_ptr,
        raw_ptr,
        out_ptr,
        end_pos_ptr,
        bad_ptr,
        n_chunks,
        chunk,
        total,
        TABLE_BITS: tl.constexpr,
        BF16: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        lane = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        live = lane < n_chunks
        pos = tl.load(offsets_ptr + lane, mask=live, other=0)
        first = lane.to(tl.int64) * chunk
        count = tl.minimum(total - first, chunk)
        count = tl.where(live, count, 0)
        bad = tl.full([BLOCK], 0, tl.int32)
        for i in range(0, chunk):
            active = count > i
            byte = pos >> 3
            window = tl.full([BLOCK], 0, tl.int64)
            for k in tl.static_range(4):
                b = tl.load(stream_ptr + byte + k, mask=active & (byte + k < nbytes), other=0).to(
                    tl.int64
                )
                window = (window << 8) | b
            window = (window << (pos & 7)) & 0xFFFFFFFF
            index = window >> (32 - TABLE_BITS)
            entry = tl.load(lut_ptr + index, mask=active, other=0).to(tl.int32) & 0xFFFF
            length = entry >> 8
            symbol = entry & 0xFF
            bad = bad | (active & (length == 0)).to(tl.int32)
            target = first + i
            if BF16:
                r = tl.load(raw_ptr + target, mask=active, other=0).to(tl.int32)
                value = ((r & 0x80) << 8) | (symbol << 7) | (r & 0x7F)
                value = value - ((value >> 15) << 16)  # as signed 16-bit
                tl.store(out_ptr + target, value.to(tl.int16), mask=active)
            else:
                tl.store(out_ptr + target, symbol.to(tl.uint8), mask=active)
            pos = pos + tl.where(active, length, 0).to(tl.int64)
        tl.store(end_pos_ptr + lane, pos, mask=live)
        tl.store(bad_ptr + lane, bad, mask=live)

    return decode_kernel


def decode_triton(
    coded: CodedTensor, lut: torch.Tensor, *, block: int = 64
) -> tuple[torch.Tensor, int]:
    """Decode on the device of ``coded.stream`` (CUDA, or CPU under ``TRITON_INTERPRET=1``).

    ``lut``: the single-symbol table (int16), or for pair-coded BF16 the full pair table (int32).
    Returns (flat int16 BF16 bits or uint8 symbols, status) like the other decoders.
    """
    import triton

    global _kernel, _pair_kernel
    if _kernel is None:
        _kernel = _build()
    if _pair_kernel is None:
        _pair_kernel = _build_pairs()
    spec = coded.spec
    device = coded.stream.device
    offsets = coded.offsets.to(device)
    n_chunks = offsets.numel() - 1
    bf16 = spec.kind == "bf16"
    out = torch.empty(spec.numel, dtype=torch.int16 if bf16 else torch.uint8, device=device)
    if n_chunks == 0:
        return out, 0
    starts, ends = offsets[:-1], offsets[1:]
    if int(offsets[0]) != 0:
        return out, 10_000_000
    if bool((ends < starts).any()) or bool((starts % 8 != 0).any()):
        return out, 11_000_000
    if int(offsets[-1]) > coded.stream.numel() * 8:
        return out, 12_000_000
    end_pos = torch.empty(n_chunks, dtype=torch.int64, device=device)
    bad = torch.empty(n_chunks, dtype=torch.int32, device=device)
    raw = coded.raw.to(device) if coded.raw is not None else out
    grid = (triton.cdiv(n_chunks, block),)
    if spec.pairs:
        _pair_kernel[grid](  # type: ignore[index]
            coded.stream,
            coded.stream.numel(),
            offsets,
            lut.to(device),
            raw,
            out,
            end_pos,
            bad,
            n_chunks,
            spec.chunk,
            spec.numel,
            TABLE_BITS=spec.table_bits,
            BLOCK=block,
        )
        return out, _status(end_pos, ends, bad)
    _kernel[grid](  # type: ignore[index]
        coded.stream,
        coded.stream.numel(),
        offsets,
        lut.to(device),
        raw,
        out,
        end_pos,
        bad,
        n_chunks,
        spec.chunk,
        spec.numel,
        TABLE_BITS=spec.table_bits,
        BF16=bf16,
        BLOCK=block,
    )
    return out, _status(end_pos, ends, bad)


def _status(end_pos: torch.Tensor, ends: torch.Tensor, bad: torch.Tensor) -> int:
    over = end_pos > ends
    if bool(over.any()):
        return 2_000_000 + int(over.nonzero()[0, 0])
    if bool((bad != 0).any()):
        return 1_000_000 + int((bad != 0).nonzero()[0, 0])
    short = (ends - end_pos) >= 8
    if bool(short.any()):
        return 3_000_000 + int(short.nonzero()[0, 0])
    return 0
