"""Corrupt streams never crash or hang a decoder: each ends in FormatError or decodes exactly.

Byte flips anywhere (exponent symbols, table, offsets, stream, raw bytes), truncation and tables
or offsets of the wrong size, on the native (C++, one and three threads) and the plain-torch
decoder. Bounded: ~20 s in all.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from compress.errors import FormatError
from compress.formats.entropy import codec

VALUES = torch.cat(
    [
        (torch.randn(3000, generator=torch.Generator().manual_seed(5)) * 0.02).bfloat16(),
        torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan"), 1e-40]).bfloat16(),
    ]
)
CODES = (torch.randn(60, 50, generator=torch.Generator().manual_seed(6)) * 2 + 8).clamp(0, 15)
CODES = CODES.round().to(torch.uint8)
CODED = {
    "bf16": codec.encode_bf16(VALUES, chunk=500),
    "codes": codec.encode_codes(CODES, 4, chunk=700),
}
ORIGINAL = {"bf16": VALUES.view(torch.int16), "codes": CODES}


def _decode_or_error(coded: codec.CodedTensor, kind: str, backend: str) -> None:
    try:
        if backend == "threads":
            out = codec.decode(coded, backend="native", threads=3)
        else:
            out = codec.decode(coded, backend=backend)  # type: ignore[arg-type]
    except FormatError as error:
        assert "corrupt" in str(error) or "expected" in str(error) or "table" in str(error)
        return
    got = out.view(torch.int16) if kind == "bf16" else out
    assert torch.equal(got.reshape(ORIGINAL[kind].shape), ORIGINAL[kind])


def _clone(coded: codec.CodedTensor) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in coded.tensors().items()}


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
@given(
    kind=st.sampled_from(["bf16", "codes"]),
    part=st.sampled_from(["symbols", "lengths", "offsets", "stream", "raw"]),
    flips=st.lists(st.tuples(st.integers(0, 10**9), st.integers(1, 255)), min_size=1, max_size=4),
    backend=st.sampled_from(["native", "native", "native", "torch", "threads"]),
)
def test_byte_flips(kind: str, part: str, flips: list[tuple[int, int]], backend: str) -> None:
    coded = CODED[kind]
    parts = _clone(coded)
    if part not in parts:
        part = "stream"
    data = parts[part].view(torch.uint8).reshape(-1)
    for where, mask in flips:
        data[where % data.numel()] ^= mask
    _decode_or_error(codec.CodedTensor.from_tensors(coded.spec, parts), kind, backend)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(
    kind=st.sampled_from(["bf16", "codes"]),
    part=st.sampled_from(["symbols", "lengths", "offsets", "stream", "raw"]),
    keep=st.floats(0.0, 1.0),
    grow=st.booleans(),
)
def test_wrong_sizes(kind: str, part: str, keep: float, grow: bool) -> None:
    """Truncated or padded tensors, including tables of the wrong size."""
    coded = CODED[kind]
    parts = _clone(coded)
    if part not in parts:
        part = "stream"
    tensor = parts[part]
    if grow:
        extra = torch.zeros(max(1, int(keep * 10)), dtype=tensor.dtype)
        parts[part] = torch.cat([tensor, extra])
    else:
        parts[part] = tensor[: int(keep * (tensor.numel() - 1))].clone()
    _decode_or_error(codec.CodedTensor.from_tensors(coded.spec, parts), kind, "native")


@pytest.mark.parametrize("backend", ["native", "torch"])
def test_garbage_offsets_and_a_table_that_is_not_a_prefix_code(backend: str) -> None:
    coded = CODED["bf16"]
    parts = _clone(coded)
    parts["offsets"][1] = 2**62  # far past the stream
    with pytest.raises(FormatError, match="offsets"):
        codec.decode(codec.CodedTensor.from_tensors(coded.spec, parts), backend=backend)  # type: ignore[arg-type]
    parts = _clone(coded)
    parts["lengths"][:] = 1  # 256 one-bit codes
    with pytest.raises(FormatError, match="Kraft"):
        codec.decode(codec.CodedTensor.from_tensors(coded.spec, parts), backend=backend)  # type: ignore[arg-type]
