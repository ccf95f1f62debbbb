"""Hadamard matrices of the orders transformer widths need, and random orthogonal ones.

A Hadamard matrix of order ``n`` (entries ±1, ``H Hᵀ = n I``) exists only for ``n`` = 1, 2 or a
multiple of 4. Powers of two come from Sylvester's doubling; other orders from Kronecker products
of Sylvester blocks with Paley's construction (order ``q + 1`` for a prime ``q ≡ 3 (mod 4)``:
12, 20, 24, 44, 48, 60, 68, 72, 80, 84, ...), searched recursively. That covers the widths of the
models we meet: SmolLM2's 576 = 8·72 (Paley 72) and 1536 = 128·12, Gemma 3 270M's 640 = 32·20, head
dimensions of 64/128/256. Orders it cannot build (a width of 6, say) get a clear error; the
``rotate`` pass then offers a random orthogonal matrix instead.
"""

from __future__ import annotations

from functools import cache
from importlib import resources
from types import ModuleType
from typing import Any

import torch
from torch import nn

from compress.errors import PassError
from compress.utils.native import build_in_background, build_isa, is_built, load_native

__all__ = [
    "ONLINE_HADAMARD_KEY",
    "hadamard",
    "hadamard_transform",
    "has_hadamard",
    "install_online_hadamard",
    "install_online_hadamards",
    "native",
    "prebuild",
    "random_orthogonal",
    "randomized_hadamard",
    "transforms_input_online",
]


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % d for d in range(2, int(q**0.5) + 1))


def _paley(q: int) -> torch.Tensor:
    """Paley construction I: a Hadamard matrix of order ``q + 1`` for prime ``q ≡ 3 mod 4``."""
    squares = {(x * x) % q for x in range(1, q)}
    chi = torch.tensor([0] + [1 if a in squares else -1 for a in range(1, q)], dtype=torch.int64)
    index = torch.arange(q)
    jacobsthal = chi[(index[None, :] - index[:, None]) % q]  # Q[i, j] = chi(j - i)
    n = q + 1
    s = torch.zeros(n, n, dtype=torch.int64)
    s[0, 1:] = 1
    s[1:, 0] = -1
    s[1:, 1:] = jacobsthal
    return s + torch.eye(n, dtype=torch.int64)


def _paley_orders(limit: int) -> list[int]:
    return [q + 1 for q in range(3, limit) if q % 4 == 3 and _is_prime(q)]


@cache
def _factor_orders(n: int) -> tuple[int, ...] | None:
    """Orders of the Kronecker factors of the order-``n`` matrix, outermost first (2 for a
    Sylvester doubling, ``q + 1`` for a Paley block); ``()`` for order 1, None when unreachable."""
    if n == 1:
        return ()
    if n % 2 == 0 and (half := _factor_orders(n // 2)) is not None:
        return (2, *half)
    for order in _paley_orders(n):
        if n % order == 0 and (rest := _factor_orders(n // order)) is not None:
            return (order, *rest)
    return None


@cache
def _factor_int(order: int) -> torch.Tensor:
    if order == 2:
        return torch.tensor([[1, 1], [1, -1]], dtype=torch.int64)
    return _paley(order - 1)


@cache
def _hadamard_int(n: int) -> torch.Tensor | None:
    orders = _factor_orders(n)
    if orders is None:
        return None
    matrix = torch.ones(1, 1, dtype=torch.int64)
    for order in orders:
        matrix = torch.kron(matrix, _factor_int(order))
    return matrix


def has_hadamard(n: int) -> bool:
    """Whether :func:`hadamard` can build order ``n``."""
    return n >= 1 and _hadamard_int(n) is not None


def _unbuildable(n: int) -> PassError:
    return PassError(
        f"no Hadamard matrix of order {n} can be built here (orders are 1, 2, or multiples "
        "of 4 reachable as products of powers of two and Paley orders)",
        hint="use method: random_orthogonal for this width",
    )


def hadamard(n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """An orthonormal Hadamard matrix of order ``n`` (``H Hᵀ = I``, entries ±1/√n)."""
    matrix = _hadamard_int(n) if n >= 1 else None
    if matrix is None:
        raise _unbuildable(n)
    return matrix.to(dtype) / n**0.5


_TRANSFORM_BLOCK = 128  # adjacent factors are merged up to this order: fewer, denser contractions


@cache
def _transform_blocks(orders: tuple[int, ...]) -> tuple[torch.Tensor, ...]:
    blocks: list[torch.Tensor] = []
    for order in orders:
        factor = _factor_int(order)
        if blocks and len(blocks[-1]) * order <= _TRANSFORM_BLOCK:
            blocks[-1] = torch.kron(blocks[-1], factor)
        else:
            blocks.append(factor)
    return tuple(blocks) or (torch.ones(1, 1, dtype=torch.int64),)


_NATIVE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_MAX_NATIVE_BLOCK = 256  # the dense part costs order² per group; larger ones stay with torch


def _native_eligible(x: torch.Tensor) -> bool:
    return (
        x.device.type == "cpu"
        and x.dtype in _NATIVE_DTYPES
        and not (x.requires_grad and torch.is_grad_enabled())
        and x.numel() > 0
    )


@cache
def _native_block(orders: tuple[int, ...]) -> torch.Tensor | None:
    """The dense factor after the leading factors of 2 (float32), or None when too large."""
    twos = next((i for i, order in enumerate(orders) if order != 2), len(orders))
    block = torch.ones(1, 1, dtype=torch.int64)
    for order in orders[twos:]:
        block = torch.kron(block, _factor_int(order))
    return block.to(torch.float32).contiguous() if len(block) <= _MAX_NATIVE_BLOCK else None


@cache
def _source() -> str:
    return resources.files(__package__).joinpath("hadamard.cpp").read_text(encoding="utf-8")


def native() -> ModuleType | None:
    """The native transform built for this CPU's instruction set, or None (no compiler,
    ``COMPRESS_NATIVE=0``): callers then take the torch path."""
    return load_native("hadamard", _source(), ["hadamard_rows"], isa=build_isa())


def prebuild() -> None:
    """Start the first-use build in a process of its own unless it is cached."""
    if not is_built("hadamard", _source(), ["hadamard_rows"], isa=build_isa()):
        build_in_background(__name__, "native")


@cache
def _blocks_as(
    orders: tuple[int, ...], dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, ...]:
    """The factors in the dtype and on the device of a call: converted once, not per token (a
    third of a decode step's transform time went to the conversion)."""
    return tuple(block.to(device=device, dtype=dtype) for block in _transform_blocks(orders))


def hadamard_transform(x: torch.Tensor) -> torch.Tensor:
    """``x @ hadamard(n).T`` along the last dimension, without the ``n × n`` matrix.

    On CPU, without autograd, in float32/bfloat16/float16, a native kernel does it
    (``hadamard.cpp``: butterflies for the factors of 2, the small dense block for the rest,
    float32 sums); otherwise torch contractions as below.

    The matrix is a Kronecker product of small factors (2s and Paley blocks), so the transform
    contracts one axis of ``x.view(..., f1, f2, ...)`` with each factor (adjacent small factors
    merged up to order 128): ``n·Σfᵢ`` multiply-adds instead of ``n²`` (SmolLM2's 1536 = 128·12:
    215k against 2.4M). Differentiable; any float dtype.
    """
    n = x.shape[-1]
    orders = _factor_orders(n) if n >= 1 else None
    if orders is None:
        raise _unbuildable(n)
    if _native_eligible(x):
        ext, block = native(), _native_block(orders)
        if ext is not None and block is not None:
            rows = x.reshape(-1, n).contiguous()
            return ext.hadamard_rows(rows, block).view(x.shape)
    lead = x.shape[:-1]
    y = x.reshape(-1, *(len(b) for b in _transform_blocks(orders)))
    for axis in range(1, y.dim()):
        # each step in the dtype the last one gave (autocast may lower a contraction's output)
        factor = _blocks_as(orders, y.dtype, y.device)[axis - 1]
        y = torch.movedim(torch.tensordot(y, factor, dims=([axis], [1])), -1, axis)
    return (y.reshape(*lead, n) / n**0.5).to(x.dtype)


ONLINE_HADAMARD_KEY = "compress_online_hadamard"
"""The ``config.json`` key listing the modules whose input is transformed online (``rotate``'s
``online_down``); the export loader installs the transform on each."""


def _transform_input(_: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    return (hadamard_transform(args[0]), *args[1:])


def transforms_input_online(module: nn.Module) -> bool:
    """Whether :func:`install_online_hadamard` put the transform on ``module``."""
    return any(hook is _transform_input for hook in module._forward_pre_hooks.values())


def install_online_hadamard(module: nn.Module) -> None:
    """Transform ``module``'s input with :func:`hadamard_transform` before every forward (its
    weight holds ``W Hᵀ``). Idempotent; the hook is a module-level function, so copies of the
    module (a teacher, a checkpoint) carry it, and input capture hooks registered later see the
    transformed input, which is what the weight multiplies."""
    if not transforms_input_online(module):
        module.register_forward_pre_hook(_transform_input)


def install_online_hadamards(model: nn.Module) -> list[str]:
    """Install the online transform on every module the model's config lists (see
    :data:`ONLINE_HADAMARD_KEY`); the names installed."""
    spec = getattr(getattr(model, "config", None), ONLINE_HADAMARD_KEY, None)
    if not spec:
        return []
    names = [str(name) for name in spec.get("modules", [])]
    for name in names:
        install_online_hadamard(model.get_submodule(name))
    prebuild()  # the native transform compiles while the model finishes loading
    return names


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randomized_hadamard(n: int, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``diag(±1) · H``: a Hadamard matrix with random row signs (QuaRot's choice), orthonormal;
    the signs break the structure that would otherwise align with the model's own."""
    signs = torch.randint(0, 2, (n,), generator=_generator(seed)).to(dtype) * 2 - 1
    return signs[:, None] * hadamard(n, dtype)


def random_orthogonal(n: int, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """A Haar-random orthogonal matrix (QR of a Gaussian, signs fixed by R's diagonal)."""
    gaussian = torch.randn(n, n, generator=_generator(seed), dtype=torch.float64)
    q, r = torch.linalg.qr(gaussian)
    return (q * torch.sign(torch.diagonal(r))[None, :]).to(dtype)
