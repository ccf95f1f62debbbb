"""Hadamard matrices of the orders transformer widths need, and random orthogonal ones.

A Hadamard matrix of order ``n`` (entries ±1, ``H Hᵀ = n I``) exists only for ``n`` = 1, 2 or a
multiple of 4. Powers of two come from Sylvester's doubling; other orders from Kronecker products
of Sylvester blocks with Paley's construction (order ``q + 1`` for a prime ``q ≡ 3 (mod 4)``:
12, 20, 24, 44, 48, 60, 68, 72, 80, 84, ...), searched recursively. That covers the widths of the
models we meet: SmolLM2's 576 = 12·12·4 and 1536 = 12·128, Gemma 3 270M's 640 = 20·32, head
dimensions of 64/128/256. Orders it cannot build (a width of 6, say) get a clear error; the
``rotate`` pass then offers a random orthogonal matrix instead.
"""

from __future__ import annotations

from functools import cache

import torch

from compress.errors import PassError

__all__ = ["hadamard", "has_hadamard", "random_orthogonal", "randomized_hadamard"]


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
def _hadamard_int(n: int) -> torch.Tensor | None:
    if n == 1:
        return torch.ones(1, 1, dtype=torch.int64)
    if n % 2 == 0 and (half := _hadamard_int(n // 2)) is not None:
        return torch.cat([torch.cat([half, half], 1), torch.cat([half, -half], 1)], 0)
    for order in _paley_orders(n):
        if n % order == 0 and (rest := _hadamard_int(n // order)) is not None:
            return torch.kron(_paley(order - 1), rest)
    return None


def has_hadamard(n: int) -> bool:
    """Whether :func:`hadamard` can build order ``n``."""
    return n >= 1 and _hadamard_int(n) is not None


def hadamard(n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """An orthonormal Hadamard matrix of order ``n`` (``H Hᵀ = I``, entries ±1/√n)."""
    matrix = _hadamard_int(n) if n >= 1 else None
    if matrix is None:
        raise PassError(
            f"no Hadamard matrix of order {n} can be built here (orders are 1, 2, or multiples "
            "of 4 reachable as products of powers of two and Paley orders)",
            hint="use method: random_orthogonal for this width",
        )
    return matrix.to(dtype) / n**0.5


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
