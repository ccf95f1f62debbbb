"""The Triton decoder against the original tensors: in Triton's CPU interpreter without CUDA
(``TRITON_INTERPRET=1``, set before triton is imported), compiled on a GPU with it."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton", reason="the `gpu` extra is not installed")

from compress.errors import FormatError
from compress.formats.entropy import codec

from .test_codec import _bits, extreme_bf16

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _to(coded: codec.CodedTensor) -> codec.CodedTensor:
    raw = coded.raw.to(DEVICE) if coded.raw is not None else None
    return codec.CodedTensor(
        coded.spec,
        coded.lengths,
        coded.offsets.to(DEVICE),
        coded.stream.to(DEVICE),
        raw,
        coded.symbols,
    )


@pytest.mark.parametrize("size", [1500, 1501])  # an odd count ends in a padding exponent
def test_triton_decoder_round_trip(size: int) -> None:
    values = extreme_bf16()[65000 : 65000 + size].contiguous()  # NaN/inf and the Gaussian bulk
    coded = codec.encode_bf16(values, chunk=256)
    out = codec.decode(_to(coded), backend="triton", verify=False)
    assert torch.equal(_bits(out.cpu()), _bits(values))
    codes = torch.randint(0, 8, (40, 30), dtype=torch.uint8, generator=torch.Generator())
    coded_codes = codec.encode_codes(codes, 3, chunk=300)
    assert torch.equal(codec.decode(_to(coded_codes), backend="triton", verify=False).cpu(), codes)


def test_triton_decoder_refuses_a_truncated_stream() -> None:
    values = (torch.randn(1500, generator=torch.Generator().manual_seed(4)) * 0.02).bfloat16()
    coded = codec.encode_bf16(values, chunk=256)
    broken = codec.CodedTensor(
        coded.spec,
        coded.lengths,
        coded.offsets,
        coded.stream[:-40].clone(),
        coded.raw,
        coded.symbols,
    )
    with pytest.raises(FormatError):
        codec.decode(_to(broken), backend="triton")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_triton_decoder_on_cuda_at_model_scale() -> None:
    values = (torch.randn(2048, 2048) * 0.02).bfloat16()
    coded = codec.encode_bf16(values, chunk=1024)
    out = codec.decode(_to(coded), backend="triton", verify=False)
    assert torch.equal(_bits(out.cpu()), _bits(values))
