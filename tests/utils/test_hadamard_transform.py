"""The fast Hadamard transform: native kernel and torch contractions against the matrix."""

from __future__ import annotations

import pytest
import torch

from compress.utils import hadamard as hadamard_module
from compress.utils.hadamard import hadamard, hadamard_transform

WIDTHS = [2, 4, 12, 20, 48, 64, 576, 640, 1536]


def _native_or_skip():
    ext = hadamard_module.native()
    if ext is None:
        pytest.skip("no native build here (no compiler, or COMPRESS_NATIVE=0)")
    return ext


@pytest.mark.parametrize("n", WIDTHS)
def test_native_kernel_equals_the_matrix(n: int) -> None:
    _native_or_skip()
    x = torch.randn(3, 5, n, generator=torch.Generator().manual_seed(n))
    want = x.double() @ hadamard(n).T
    got = hadamard_transform(x)  # CPU, float32, no grad: the native path
    assert got.dtype == torch.float32 and got.shape == x.shape
    assert (got.double() - want).abs().max() < 1e-5 * want.abs().max()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_native_kernel_in_half_precision_rounds_once(dtype: torch.dtype) -> None:
    _native_or_skip()
    x = torch.randn(4, 1536, generator=torch.Generator().manual_seed(1)).to(dtype)
    want = (x.double() @ hadamard(1536).T).to(dtype)  # exact sums, one rounding
    got = hadamard_transform(x)
    assert got.dtype == dtype
    ulps = (got.double() - want.double()).abs() / want.double().abs().clamp_min(1e-3)
    assert ulps.max() <= torch.finfo(dtype).eps  # float32 sums: at most one step off


def test_native_and_torch_paths_agree_and_autograd_takes_torch() -> None:
    _native_or_skip()
    x = torch.randn(2, 7, 1536, generator=torch.Generator().manual_seed(2))
    native = hadamard_transform(x)
    leaf = x.clone().requires_grad_(True)
    through_torch = hadamard_transform(leaf)
    assert through_torch.requires_grad
    assert torch.allclose(native, through_torch.detach(), atol=1e-5)
    through_torch.square().sum().backward()
    # H orthonormal: the gradient of ||x Hᵀ||² is 2x
    assert leaf.grad is not None and torch.allclose(leaf.grad, 2 * x, atol=1e-4)


def test_without_a_native_build_the_torch_path_answers(monkeypatch) -> None:
    monkeypatch.setattr(hadamard_module, "native", lambda: None)
    x = torch.randn(3, 576, generator=torch.Generator().manual_seed(3))
    want = x.double() @ hadamard(576).T
    assert (hadamard_transform(x).double() - want).abs().max() < 1e-5 * want.abs().max()
