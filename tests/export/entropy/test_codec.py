"""The chunked Huffman codec: length-limited codes, bit-exact round trips on every backend."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from compress.errors import FormatError
from compress.formats.entropy import codec
from compress.formats.entropy.huffman import (
    canonical_codes,
    check_lengths,
    code_lengths,
    decode_table,
    pair_code_table,
    pair_table,
)
from compress.formats.entropy.native import native_module

BACKENDS = ["native", "torch"]


@pytest.fixture(scope="module", autouse=True)
def _native_built() -> None:
    if native_module() is None:  # the JIT build is part of what is tested
        pytest.fail("the native entropy codec did not build (see the log)")


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16) if t.dtype == torch.bfloat16 else t


def extreme_bf16() -> torch.Tensor:
    """Every one of the 65536 BF16 bit patterns (subnormals, ±inf, NaN payloads, ±0), shuffled,
    then a Gaussian bulk so that the code is skewed like real weights."""
    every = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)
    every = every[torch.randperm(every.numel(), generator=torch.Generator().manual_seed(0))]
    bulk = (torch.randn(70_000, generator=torch.Generator().manual_seed(1)) * 0.02).bfloat16()
    return torch.cat([every.view(torch.bfloat16), bulk])


@pytest.mark.parametrize(
    "counts",
    [
        [5],
        [1, 1],
        [1000, 1, 1, 1],
        [2**i for i in range(30)],  # would need 29-bit codes unlimited
        list(range(1, 257)),
        [0, 0, 7, 0, 3],
    ],
)
@pytest.mark.parametrize("limit", [8, 12, 16])
def test_code_lengths_are_prefix_codes_within_the_limit(counts: list[int], limit: int) -> None:
    counts_np = np.array(counts + [0] * (256 - len(counts)), dtype=np.int64)
    lengths = code_lengths(counts_np, limit)
    assert lengths.max() <= limit
    assert ((lengths > 0) == (counts_np > 0)).all()
    check_lengths(lengths, 256, limit, "test")  # Kraft holds
    codes = canonical_codes(lengths)
    words = {format(int(codes[s]), f"0{lengths[s]}b") for s in np.flatnonzero(lengths)}
    assert not any(a != b and b.startswith(a) for a in words for b in words)


def test_length_limit_costs_little_against_the_entropy() -> None:
    counts = np.bincount(
        codec.split_bf16((torch.randn(200_000) * 0.02).bfloat16())[0].numpy(), minlength=256
    )
    p = counts[counts > 0] / counts.sum()
    entropy = float(-(p * np.log2(p)).sum() * counts.sum())
    bits = float((code_lengths(counts, 12) * counts).sum())
    assert bits <= entropy * 1.02 + 64


def test_pair_table_agrees_with_single_table() -> None:
    lengths = code_lengths(np.array([50, 20, 10, 5, 3, 1, 1] + [0] * 249), 12)
    single = decode_table(lengths, 12)
    pairs = pair_table(lengths, 12)
    assert ((pairs & 0xFF) == (single & 0xFF)).all()
    assert (((pairs >> 21) & 31) == (single >> 8)).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("chunk", [256, 1000, 16384])
def test_bf16_round_trip_is_bit_exact_on_extreme_values(backend: str, chunk: int) -> None:
    values = extreme_bf16()
    coded = codec.encode_bf16(values, chunk=chunk)
    out = codec.decode(coded, backend=backend)  # type: ignore[arg-type]
    assert out.dtype == torch.bfloat16 and out.shape == values.shape
    assert torch.equal(_bits(out), _bits(values))


@pytest.mark.parametrize("shape", [(0,), (1,), (3, 5), (257, 64), (16384,), (16385,), (99999,)])
def test_bf16_round_trip_shapes(shape: tuple[int, ...]) -> None:
    values = (torch.randn(shape, generator=torch.Generator().manual_seed(2)) * 0.05).bfloat16()
    coded = codec.encode_bf16(values, chunk=4096)
    for backend in BACKENDS:
        assert torch.equal(_bits(codec.decode(coded, backend=backend)), _bits(values))  # type: ignore[arg-type]
    for threads in (1, 2, 3):
        assert torch.equal(_bits(codec.decode(coded, threads=threads)), _bits(values))


def test_odd_chunk_is_refused() -> None:
    from pydantic import ValidationError

    from compress.lossless.entropy_code import EntropyCodeConfig

    with pytest.raises(ValueError, match="even"):
        codec.encode_bf16(torch.zeros(10, dtype=torch.bfloat16), chunk=301)
    with pytest.raises(ValidationError, match="chunk=301 must be even"):
        EntropyCodeConfig(chunk=301)


@pytest.mark.parametrize("max_length", [8, 12, 16])
def test_native_pair_tables_match_the_reference(max_length: int) -> None:
    native = native_module()
    assert native is not None
    values = extreme_bf16()[60000:].contiguous()  # rare exponents: long codes and slow entries
    exponents, _ = codec.split_bf16(values)
    pairs, symbols = codec.exponent_pairs(exponents)
    counts = np.bincount(pairs.numpy(), minlength=symbols.numel() ** 2)
    needed = (int(np.count_nonzero(counts)) - 1).bit_length()
    lengths = code_lengths(counts, max(max_length, needed))
    bits = int(lengths.max())
    single, fast, full = native.pair_decode_tables(symbols, torch.from_numpy(lengths), bits, 12)
    reference = pair_code_table(symbols.numpy(), lengths, bits)
    # every window decodes to the same pair and length (the canonical slow path included)
    assert np.array_equal(full.numpy().view(np.uint32), reference)
    # a fast entry decodes the same exponents as one or two reference lookups
    fast_bits = min(12, bits)
    for index in range(0, 1 << fast_bits, 7):
        entry = int(fast[index])
        count = entry >> 40
        first = int(reference[index << (bits - fast_bits)])
        if (first >> 16) & 31 <= fast_bits and not first >> 31:
            assert int(single[index]) == first
        if count == 0:
            continue
        assert entry & 0xFFFF == first & 0xFFFF
        if count == 4:
            length = (first >> 16) & 31
            rest = ((index << length) & ((1 << fast_bits) - 1)) << (bits - fast_bits)
            assert (entry >> 16) & 0xFFFF == int(reference[rest]) & 0xFFFF


@pytest.mark.parametrize("backend", BACKENDS)
def test_version1_bf16_streams_still_decode(backend: str) -> None:
    """Exports of codec version 1 coded BF16 exponents one at a time (no ``symbols`` part)."""
    values = extreme_bf16()
    exponents, raw = codec.split_bf16(values)
    lengths, offsets, stream, bits = codec._encode(exponents, 256, 1000, 12, None)
    spec = codec.StreamSpec.from_dict(
        {
            "kind": "bf16",
            "shape": list(values.shape),
            "chunk": 1000,
            "table_bits": bits,
            "alphabet": 256,
            "checksum": codec.checksum(values),
        },
        "v1",
    )
    assert not spec.pairs
    coded = codec.CodedTensor(spec, lengths, offsets, stream, raw)
    assert torch.equal(_bits(codec.decode(coded, backend=backend)), _bits(values))  # type: ignore[arg-type]


def test_pairs_beat_single_exponent_codes() -> None:
    values = (torch.randn(512, 512, generator=torch.Generator().manual_seed(7)) * 0.02).bfloat16()
    exponents, _ = codec.split_bf16(values)
    single = codec._encode(exponents, 256, codec.DEFAULT_CHUNK, 12, None)[2]
    assert codec.encode_bf16(values).stream.numel() < 0.995 * single.numel()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
def test_integer_codes_round_trip(backend: str, bits: int) -> None:
    # a peaked, RTN-like distribution over the code range, plus every code at least once
    gen = torch.Generator().manual_seed(bits)
    centre = (1 << bits) / 2
    draws = (torch.randn(123, 77, generator=gen) * centre / 2.5 + centre).round()
    codes = draws.clamp(0, (1 << bits) - 1).to(torch.uint8)
    codes.view(-1)[: 1 << bits] = torch.arange(1 << bits, dtype=torch.uint8)
    coded = codec.encode_codes(codes, bits, chunk=500)
    assert torch.equal(codec.decode(coded, backend=backend), codes)  # type: ignore[arg-type]
    if bits >= 4:  # peaked codes take fewer bits than their width
        assert coded.stream.numel() * 8 < codes.numel() * bits


def test_native_and_torch_encoders_write_the_same_stream(monkeypatch: pytest.MonkeyPatch) -> None:
    values = extreme_bf16()
    native = codec.encode_bf16(values, chunk=3000)
    monkeypatch.setattr(codec, "native_module", lambda: None)
    plain = codec.encode_bf16(values, chunk=3000)
    for name, tensor in native.tensors().items():
        assert torch.equal(tensor, plain.tensors()[name]), name


def test_compression_of_gaussian_bf16_is_near_the_bound() -> None:
    values = (torch.randn(512, 512, generator=torch.Generator().manual_seed(3)) * 0.02).bfloat16()
    coded = codec.encode_bf16(values)
    bound = codec.entropy_bits(codec.split_bf16(values)[0]) / 8 + values.numel()
    assert coded.nbytes <= 1.005 * bound
    assert coded.nbytes <= 0.70 * 2 * values.numel()


def test_checksum_mismatch_is_a_format_error() -> None:
    values = (torch.randn(1000) * 0.02).bfloat16()
    coded = codec.encode_bf16(values, chunk=256)
    assert coded.raw is not None
    coded.raw[7] ^= 1  # raw mantissa bits: only the checksum can notice
    with pytest.raises(FormatError, match="checksum"):
        codec.decode(coded)
