"""Checks shared by the table formats' test modules (test_fp4.py: NF4, FP4, MXFP4, NVFP4;
test_fp6.py: MXFP6). Both formats store codes in a :class:`~compress.formats.fp4.table.PackedTable`
and run the same module, kernel-table and embedding contracts; each test module keeps its own
parametrized tests and calls these with its format's functions (:class:`TableKit`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from compress.formats import base as formats_base
from compress.formats import runtime_for
from compress.ir import QuantizedWeight


def seeded(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@dataclass(frozen=True)
class TableKit:
    """One table format family's pieces: ``quantize(weight, fmt) -> (codes, scales, zeros)``, its
    packed Linear and Embedding classes, and its ``kernels`` and native ``cpu`` modules."""

    quantize: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]
    linear: Any
    embedding: Any
    kernels: ModuleType
    cpu: ModuleType

    def packed_linear(
        self, fmt: Any, out_features: int, in_features: int, *, bias: bool = True
    ) -> tuple[torch.nn.Linear, QuantizedWeight, Any]:
        """A seeded Linear, its quantized record, and the packed module made from them."""
        linear = torch.nn.Linear(in_features, out_features, bias=bias)
        with torch.no_grad():
            linear.weight.copy_(seeded(out_features, in_features, seed=5) * 0.1)
        codes, scales, zeros = self.quantize(linear.weight, fmt)
        record = QuantizedWeight(codes, scales, zeros, fmt)
        return linear, record, self.linear.from_record(linear, record)

    def check_buffers_are_the_stored_tensors(
        self, fmt: Any, out_features: int, in_features: int
    ) -> None:
        _, _, module = self.packed_linear(fmt, out_features, in_features)
        declared = fmt.stored_tensors(out_features, in_features)
        buffers = dict(module.named_buffers())
        assert list(buffers) == [t.name for t in declared]
        for tensor in declared:
            assert buffers[tensor.name].shape == tensor.shape
            assert buffers[tensor.name].dtype == tensor.dtype
        assert not any(name == "weight" for name, _ in module.named_parameters())

    def check_kernel_matches_the_reference(
        self,
        kernel: str,
        fmt: Any,
        out_features: int,
        in_features: int,
        dtype: torch.dtype,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """``kernel`` called directly, and chosen by ``COMPRESS_KERNEL`` through the module."""
        monkeypatch.setattr(formats_base, "TILED_SLAB_BYTES", 4 * in_features * 7)  # 7-row slabs
        _, record, module = self.packed_linear(fmt, out_features, in_features)
        x = seeded(3, in_features, seed=2).to(dtype)
        expected = F.linear(x, record.dequantize(dtype), module.bias.to(dtype))
        got = self.kernels.KERNELS[kernel](x, module.packed())
        assert got.dtype == dtype
        tolerance = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(got, expected, rtol=tolerance, atol=tolerance)
        monkeypatch.setenv("COMPRESS_KERNEL", kernel)
        torch.testing.assert_close(module(x), expected, rtol=tolerance, atol=tolerance)

    def check_decode_takes_the_gemv_and_prefill_the_tiles(
        self, fmt: Any, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """One row takes the native GEMV, a hundred the tiles; a kernel name the format does not
        have falls back to the default (logged); the module follows the row count."""
        assert self.cpu.native() is not None, f"the native GEMV of {fmt} did not build here"
        kernels = self.kernels
        assert kernels.select(fmt, 64, rows=1, dtype=torch.bfloat16) == "cpu_gemv"
        assert kernels.select(fmt, 64, rows=100, dtype=torch.bfloat16) == "cpu_tiled"
        assert "cpu_gemv" in kernels.describe(fmt, 64)
        monkeypatch.setenv("COMPRESS_KERNEL", "cpu_gemv_int")  # not a kernel of these formats
        assert kernels.select(fmt, 64, rows=1, dtype=torch.float32) == "cpu_gemv"
        _, record, module = self.packed_linear(fmt, 24, 40)
        for rows in (1, 20):
            x = seeded(rows, 40)
            expected = F.linear(x, record.dequantize(), module.bias)
            torch.testing.assert_close(module(x), expected, rtol=1e-5, atol=1e-5)

    def check_native_gemv_takes_any_row_count(self, fmt: Any) -> None:
        _, record, module = self.packed_linear(fmt, 19, 70)
        x = seeded(2, 11, 70, seed=3).to(torch.bfloat16)  # 22 rows: three calls of at most 8
        got = self.kernels.KERNELS["cpu_gemv"](x, module.packed())
        expected = F.linear(x.float(), record.dequantize(), module.bias).to(torch.bfloat16)
        assert got.shape == (2, 11, 19) and got.dtype == torch.bfloat16
        torch.testing.assert_close(got, expected, rtol=1e-2, atol=1e-2)

    def check_embedding_gathers_the_dequantized_rows(self, fmt: Any) -> None:
        embedding = torch.nn.Embedding(50, 40)
        codes, scales, zeros = self.quantize(embedding.weight, fmt)
        record = QuantizedWeight(codes, scales, zeros, fmt)
        module = self.embedding.from_record(embedding, record)
        ids = torch.tensor([[0, 49, 7], [7, 7, 3]])
        assert torch.equal(module(ids), F.embedding(ids, record.dequantize()))

    def check_runtime_is_registered(self, fmt: Any) -> None:
        runtime = runtime_for(fmt)
        assert runtime.linear_from_record == self.linear.from_record
        assert runtime.describe_kernels is not None
        assert "cpu_tiled" in runtime.describe_kernels(fmt, 64)
        assert runtime.prepare is not None
