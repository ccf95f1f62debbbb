"""The chunked Huffman codec: length-limited codes, bit-exact round trips on every backend."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from compress.errors import FormatError
from compress.export.entropy import codec
from compress.export.entropy.huffman import (
    canonical_codes,
    check_lengths,
    code_lengths,
    decode_table,
    pair_table,
)
from compress.export.entropy.native import native_module

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


@pytest.mark.parametrize("shape", [(0,), (1,), (3, 5), (257, 64), (16384,), (16385,)])
def test_bf16_round_trip_shapes(shape: tuple[int, ...]) -> None:
    values = (torch.randn(shape, generator=torch.Generator().manual_seed(2)) * 0.05).bfloat16()
    coded = codec.encode_bf16(values, chunk=4096)
    for backend in BACKENDS:
        assert torch.equal(_bits(codec.decode(coded, backend=backend)), _bits(values))  # type: ignore[arg-type]


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
    assert coded.nbytes <= 1.01 * bound
    assert coded.nbytes <= 0.70 * 2 * values.numel()


def test_checksum_mismatch_is_a_format_error() -> None:
    values = (torch.randn(1000) * 0.02).bfloat16()
    coded = codec.encode_bf16(values, chunk=256)
    assert coded.raw is not None
    coded.raw[7] ^= 1  # raw mantissa bits: only the checksum can notice
    with pytest.raises(FormatError, match="checksum"):
        codec.decode(coded)
