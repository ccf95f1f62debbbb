"""GPTQ as pure tensor functions: Hessian accumulation and column-by-column quantization.

GPTQ (Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers", 2022) minimises the layer's output error ``||X Wᵀ - X Qᵀ||²`` one input column at a
time, in the Optimal Brain Surgeon way: after column ``i`` is rounded, its error is spread over the
columns not yet quantized through the inverse Hessian ``H⁻¹`` (``H = 2 XᵀX / n``), so later
columns absorb what earlier roundings lost. The practical algorithm, followed here:

* dead inputs (``H[i, i] == 0``, a channel that is always zero) get ``H[i, i] = 1`` and a zero
  weight; the diagonal is dampened by ``damp · mean(diag H)``;
* the updates use the rows of the upper Cholesky factor of ``H⁻¹`` (numerically stable, and what
  the sequential OBS updates reduce to), in float32 and in place; a factorisation that fails is
  retried with 10x the dampening a few times, then raises :class:`~compress.errors.PassError`;
* columns go in blocks of ``block_size``: inside a block updates are immediate, the remaining
  columns get one batched (lazy) update per block — the result does not depend on the block size;
* group-wise formats take each group's scale/zero from the group's *current* (error-updated)
  weights when the group's first column is reached; per-channel scales come from the whole
  weight up front;
* ``act_order`` processes columns by decreasing ``diag(H)`` (most active inputs first, while the
  most columns remain to absorb their error).

act_order with groups uses *static* groups: every group's scale/zero is computed up front from
the original weight in natural column order, and the permuted loop rounds each column with its
own group's fixed scale. The stored layout therefore stays the plain group-wise format (group
``j // group_size`` for column ``j``, no ``g_idx`` indirection for export or kernels), at the
price of scales that do not see the error updates.

Codes are computed exactly as :func:`compress.formats.quantize_int` computes them for the chosen
(storage-dtype rounded) scales, so ``dequantize_int(codes, scales, zeros, fmt)`` is the weight the
model will use.

The 4-bit table formats (:mod:`compress.formats.fp4`: NF4, bitsandbytes FP4, MXFP4, NVFP4) go
through the same loop with their own grid: a column is divided by its block's effective scale and
rounded to the nearest table value (a non-uniform grid: the rounding is the format's own
:meth:`~compress.formats.fp4.FP4Format.encode`), block scales (absmax, E8M0 or E4M3 as the variant
stores them) come from the error-updated weights at the block's first column, or from the original
weight under act_order, and NVFP4's per-tensor scale from the whole weight up front. OCP MXFP6
(:mod:`compress.formats.fp6`, E2M3 / E3M2 elements, E8M0 scales per 32) is a table format too
(a 64-value grid) and takes the same path.

FP8 (:mod:`compress.formats.fp8`, E4M3 / E5M2 per tensor, channel or 2-D block) goes through the
loop too: every scale is fixed up front from the original weight (a scale block spans many rows,
so it cannot follow one row's updates), and a column is divided by its scales, saturated and
cast to FP8 with round-to-nearest-even, exactly as :func:`~compress.formats.fp8.quantize_fp8`
rounds. The grid is non-uniform (relative steps of 2**-3 for E4M3): GPTQ's error feedback is
what takes a weight that sits off that grid (e.g. on a Q4_1 grid) closer than rounding can.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from compress.errors import PassError
from compress.formats.fp4 import FP4Format
from compress.formats.fp4.spec import TableFormat, quantize_table
from compress.formats.fp6 import FP6Format
from compress.formats.fp8 import FP8Format, quantize_fp8
from compress.formats.int import IntFormat, quantize_int
from compress.quant.observers import Observer, choose_clip

__all__ = ["GPTQResult", "accumulate_hessian", "gptq_quantize", "refit_group_scales"]

_CHOLESKY_RETRIES = 4


def accumulate_hessian(
    hessian: torch.Tensor | None, inputs: torch.Tensor, count: int
) -> tuple[torch.Tensor, int]:
    """Fold a batch into the running mean ``H = 2/n Σ x xᵀ`` over all rows seen so far.

    ``inputs`` (..., in_features), every leading index is one row (token); ``hessian`` (in, in)
    or ``None`` before the first batch; ``count`` rows already folded in. The batch product is
    taken in float32 and accumulated in the dtype of ``hessian`` (float32 when it starts as
    ``None``; pass a float64 zero matrix to accumulate in float64).

    Returns the updated (in, in) Hessian and the new row count. A float32 ``hessian`` is updated
    in place (a 5632-wide one is 127 MB: a second one, even briefly, is what a layer-wise run's
    peak memory would be made of).
    """
    if count < 0:
        raise ValueError(f"count must be non-negative, got {count}")
    in_features = inputs.shape[-1]
    rows = inputs.detach().reshape(-1, in_features).to(torch.float32)
    if hessian is None:
        if count:
            raise ValueError(f"count must be 0 when starting a Hessian, got {count}")
        hessian = torch.zeros(in_features, in_features, device=rows.device)
    elif hessian.shape != (in_features, in_features):
        raise ValueError(
            f"Hessian shape {tuple(hessian.shape)} does not match {in_features} input features"
        )
    added = rows.shape[0]
    if added == 0:
        return hessian, count
    total = count + added
    if hessian.dtype == rows.dtype:  # in place: no second (in, in) matrix, even briefly
        hessian.addmm_(rows.T, rows, beta=count / total, alpha=2.0 / total)
    else:
        product = (rows.T @ rows).to(hessian.dtype)  # (in, in)
        hessian = (hessian * (count / total)).add_(product, alpha=2.0 / total)
    return hessian, total


@dataclass
class GPTQResult:
    """Codes of one weight in the format of :func:`compress.formats.quantize_int`.

    codes:  (out_features, in_features) uint8, values in [0, 2**bits - 1]
    scales: (out_features, groups) in ``fmt.scale_dtype``
    zeros:  (out_features, groups) uint8, or None for symmetric formats
    error:  the summed OBS loss ``Σ (w - q)² / (2 [H⁻¹]ᵢᵢ)``, for reporting
    """

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    error: float


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    fmt: IntFormat | FP4Format | FP6Format | FP8Format,
    *,
    block_size: int = 128,
    damp: float = 0.01,
    act_order: bool = False,
    observer: Observer = "minmax",
    consume_hessian: bool = False,
    keep: torch.Tensor | None = None,
    scale_refits: int = 0,
) -> GPTQResult:
    """GPTQ codes of ``weight`` (out, in) given the input Hessian ``hessian`` (in, in).

    ``keep`` (out, in) bool, from a pruning pass's mask: positions that are False get the code
    of exact zero (every integer format has one), and their rounding error (the whole current
    weight) is fed back to the columns not yet quantized like any other: pruning and
    quantization then share one error compensation (SparseGPT's joint mode with a fixed mask),
    and the zeros stay zero. Group scales are chosen from the kept weights only.

    ``damp`` is the fraction of ``mean(diag H)`` added to the diagonal; when the Cholesky
    factorisation still fails it is retried with 10x the dampening a few times before a
    :class:`~compress.errors.PassError`. ``observer`` chooses each group's clip ratio
    (:func:`compress.quant.observers.choose_clip`). ``weight`` is not modified; ``hessian``
    is not either unless ``consume_hessian`` (the caller's last use of a float32 CPU Hessian):
    then it becomes the work matrix, which saves a copy of the largest buffer of a wide layer.

    ``scale_refits`` (integer formats with float scales): after the sweep, the group scales are
    refitted by least squares for the codes it chose (:func:`refit_group_scales`); each further
    refit first sweeps again with the refitted scales held fixed, so codes and scales alternate,
    and the round with the lowest objective is kept (``error`` is then that round's undamped
    ``½ tr(ΔW H ΔWᵀ)``). The Hessian is needed after the sweep and is never consumed.
    """
    if scale_refits and not (isinstance(fmt, IntFormat) and not fmt.power_of_two_scales):
        raise ValueError(
            f"scale_refits needs an integer format with float scales, got {fmt.label()}"
        )
    if isinstance(fmt, FP4Format | FP6Format):
        return _gptq_table(
            weight, hessian, fmt, block_size, damp, act_order, observer, consume_hessian, keep
        )
    if isinstance(fmt, FP8Format):
        if observer != "minmax":
            raise ValueError(f"fp8 scales come from each block's range; observer {observer!r}")
        return _gptq_fp8(weight, hessian, fmt, block_size, damp, act_order, consume_hessian, keep)
    _check_arguments(weight, hessian, block_size, damp)
    consume_hessian = consume_hessian and not scale_refits
    out_features, in_features = weight.shape
    groups = fmt.groups(in_features)  # FormatError when the group size does not divide
    size = in_features // groups
    w, keep, diagonal = _prepare_weight(weight, hessian, keep)

    # Scales known before the loop: per-channel, or static groups under act_order.
    dynamic_groups = fmt.group_size is not None and not act_order
    scales = torch.empty(out_features, groups, device=w.device)  # float32 copy of stored scales
    zeros = torch.full((out_features, groups), float(fmt.midpoint), device=w.device)
    if not dynamic_groups:
        _, fixed_scales, fixed_zeros = quantize_int(
            w, fmt, clip_ratio=choose_clip(w, fmt, observer)
        )
        scales.copy_(fmt.scale_values(fixed_scales))
        if fixed_zeros is not None:
            zeros.copy_(fixed_zeros.to(torch.float32))

    w, keep, perm, hinv = _prepare_factor(
        w, keep, hessian, diagonal, act_order, damp, consume_hessian
    )

    group_of_column = torch.arange(in_features, device=w.device) // size  # natural order
    if perm is not None:
        group_of_column = group_of_column[perm]
    column_group = group_of_column.tolist()  # each column's group, in processing order
    group_fmt = IntFormat(fmt.bits, size, fmt.symmetric, fmt.scale_dtype)

    max_code = float(fmt.levels - 1)
    scale = zero = torch.empty(0)  # (out,) of the current group

    def round_column(
        column: int, x: torch.Tensor, sweep: _Sweep
    ) -> tuple[torch.Tensor, torch.Tensor]:
        nonlocal scale, zero
        if dynamic_groups:
            if column % size == 0:  # first column of a group: scale from current weights
                current = sweep.group(column, size)
                if keep is not None:  # pruned positions hold feedback, not weights
                    current = current * keep[:, column : column + size]
                scale, zero = _group_params(current, group_fmt, observer)
                scales[:, column // size] = scale
                zeros[:, column // size] = zero
        else:  # views, not an (out, in) expansion: that would be 2 x 46 MB on a wide layer
            scale, zero = scales[:, column_group[column]], zeros[:, column_group[column]]
        code = torch.round(x / scale).add_(zero).clamp_(0.0, max_code)
        if keep is not None:
            code = torch.where(keep[:, column], code, zero)  # (zero - zero) * scale == 0
        # uint8 codes (whole numbers in [0, 255]: the sweep's cast is exact)
        return code, (code - zero) * scale

    start_w = w.clone() if scale_refits > 1 else w  # each re-sweep starts from the same weights
    codes, loss = _sweep(w, hinv, block_size, perm, round_column)
    stored_scales = fmt.store_scales(scales)
    stored_zeros = None if fmt.symmetric else zeros.to(torch.uint8)
    best = GPTQResult(codes, stored_scales, stored_zeros, loss)
    for refit in range(scale_refits):
        if refit:  # sweep again, every scale now fixed to the refitted ones
            dynamic_groups = False
            w = start_w.clone()
            codes, _ = _sweep(w, hinv, block_size, perm, round_column)
        stored_scales = refit_group_scales(weight, hessian, codes, stored_scales, stored_zeros, fmt)
        scales.copy_(fmt.scale_values(stored_scales))
        loss = _objective(weight, hessian, fmt.dequantize(codes, stored_scales, stored_zeros)) / 2
        if refit == 0 or loss < best.error:  # a greedy re-sweep can lose: keep the best round
            best = GPTQResult(codes, stored_scales, stored_zeros, loss)
    return best


def _objective(weight: torch.Tensor, hessian: torch.Tensor, quantized: torch.Tensor) -> float:
    """``tr((W - Q) H (W - Q)ᵀ)``: the layer's output error that GPTQ minimises."""
    error = weight.detach().to(torch.float32) - quantized.to(torch.float32)
    return float(((error @ hessian.to(torch.float32)) * error).sum())


def _check_arguments(
    weight: torch.Tensor, hessian: torch.Tensor, block_size: int, damp: float
) -> None:
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(weight.shape)}")
    in_features = weight.shape[1]
    if hessian.shape != (in_features, in_features):
        raise ValueError(
            f"Hessian shape {tuple(hessian.shape)} does not match weight {tuple(weight.shape)}"
        )
    if block_size < 1:
        raise ValueError(f"block_size must be positive, got {block_size}")
    if damp < 0:
        raise ValueError(f"damp must be non-negative, got {damp}")


def _prepare_weight(
    weight: torch.Tensor, hessian: torch.Tensor, keep: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """The float32 work copy of ``weight`` (pruned and dead inputs zeroed), the keep mask on its
    device, and the Hessian's diagonal with dead inputs set to 1."""
    w = weight.detach().to(torch.float32).clone()  # (out, in), updated in place later
    if keep is not None:
        if keep.shape != weight.shape:
            raise ValueError(f"keep mask {tuple(keep.shape)} != weight {tuple(weight.shape)}")
        keep = keep.to(device=w.device, dtype=torch.bool)
        w.mul_(keep)
    if not _all_finite(hessian):
        raise PassError(
            "gptq: the calibration Hessian has non-finite entries",
            hint="check the calibration data and the layer inputs for inf/nan activations",
        )
    diagonal = torch.diagonal(hessian).detach().to(device=w.device, dtype=torch.float32).clone()
    dead = diagonal == 0
    diagonal[dead] = 1.0
    w[:, dead] = 0.0  # an input that is always zero: its weight is free, zero is cheapest
    return w, keep, diagonal


def _prepare_factor(
    w: torch.Tensor,
    keep: torch.Tensor | None,
    hessian: torch.Tensor,
    diagonal: torch.Tensor,
    act_order: bool,
    damp: float,
    consume_hessian: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
    """``(w, keep, perm, hinv)``: weight and mask in processing order (``perm`` under
    act_order, else None) and the upper factor of the dampened inverse Hessian in that order."""
    perm: torch.Tensor | None = None
    if act_order:
        perm = torch.argsort(diagonal, descending=True, stable=True)
        w = w[:, perm]
        if keep is not None:
            keep = keep[:, perm]

    in_place = (
        consume_hessian
        and hessian.device.type == "cpu"
        and hessian.dtype == torch.float32
        and hessian.is_contiguous()
    )
    if in_place:
        h = hessian.detach()
        if perm is not None:
            _permute_in_place(h.numpy(), perm.numpy())
    elif perm is None:
        h = hessian.detach().to(device=w.device, dtype=torch.float32).clone()
    else:  # one gather, no intermediate (in, in) copy
        h = hessian.detach().to(device=w.device)[perm.unsqueeze(1), perm].float()
    h.diagonal().copy_(diagonal if perm is None else diagonal[perm])
    hinv = _inverse_hessian_factor(h, damp)  # h itself, now the (in, in) upper factor
    return w, keep, perm, hinv


def _gptq_table(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    fmt: TableFormat,
    block_size: int,
    damp: float,
    act_order: bool,
    observer: Observer,
    consume_hessian: bool,
    keep: torch.Tensor | None,
) -> GPTQResult:
    """GPTQ onto a table grid (4-bit, MXFP6): each column is rounded to the nearest table value
    after dividing by its block's scale (the format's ``encode``, the reference's own rounding).

    Block scales come from the block's current (error-updated) weights when its first column is
    reached, as integer groups' do; under act_order they are static, from the original weight
    (:func:`~compress.formats.fp4.spec.quantize_table`). NVFP4's tensor scale is taken from the
    whole weight up front.
    ``observer: mse`` picks each block's scale by the format's ``search_clip`` (least squared
    rounding error of the block's weights as they stand when the scale is chosen).
    """
    _check_arguments(weight, hessian, block_size, damp)
    out_features, in_features = weight.shape
    fmt.check_width(in_features)
    size = fmt.block
    groups = -(-in_features // size)
    w, keep, diagonal = _prepare_weight(weight, hessian, keep)
    tensor_scale = fmt.tensor_scale(w)
    stored = torch.empty(out_features, groups, dtype=fmt.scale_dtype, device=w.device)
    effective = torch.empty(out_features, groups, device=w.device)
    if act_order:
        clip = fmt.search_clip(w) if observer == "mse" else 1.0
        _, fixed, _ = quantize_table(w, fmt, clip_ratio=clip)
        stored.copy_(fixed)
        effective.copy_(fmt.effective_scales(fixed, tensor_scale))

    w, keep, perm, hinv = _prepare_factor(
        w, keep, hessian, diagonal, act_order, damp, consume_hessian
    )
    group_of_column = torch.arange(in_features, device=w.device) // size  # natural order
    if perm is not None:
        group_of_column = group_of_column[perm]
    column_group = group_of_column.tolist()
    table = fmt.table.to(w.device)
    zero_code = torch.tensor(fmt.zero_code, dtype=torch.uint8, device=w.device)

    def round_column(
        column: int, x: torch.Tensor, sweep: _Sweep
    ) -> tuple[torch.Tensor, torch.Tensor]:
        group = column_group[column]
        if not act_order and column % size == 0:  # first column of a scale block
            current = sweep.group(column, size)
            if keep is not None:  # pruned positions hold feedback, not weights
                current = current * keep[:, column : column + size]
            amax = current.abs().amax(dim=1)
            if observer == "mse":
                amax = amax * fmt.search_clip(current, tensor_scale)[:, 0]
            stored[:, group], effective[:, group] = fmt.block_scales(amax, tensor_scale)
        scale = effective[:, group]
        code = fmt.encode(x, scale)
        if keep is not None:
            code = torch.where(keep[:, column], code, zero_code)
        return code, table[code.long()] * scale

    codes, loss = _sweep(w, hinv, block_size, perm, round_column)
    return GPTQResult(codes, stored, tensor_scale, loss)


def _gptq_fp8(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    fmt: FP8Format,
    block_size: int,
    damp: float,
    act_order: bool,
    consume_hessian: bool,
    keep: torch.Tensor | None,
) -> GPTQResult:
    """GPTQ onto the FP8 grid with the scales of :func:`quantize_fp8` on the original weight
    (pruned positions excluded); each column is cast as the reference casts."""
    _check_arguments(weight, hessian, block_size, damp)
    out_features, in_features = weight.shape
    w, keep, diagonal = _prepare_weight(weight, hessian, keep)
    _, stored, _ = quantize_fp8(w, fmt)  # (blocks down, blocks across), fixed
    scales = fmt.scale_values(stored)
    rows_per_block, columns_per_block = fmt.block_shape(out_features, in_features)
    row_block = torch.arange(out_features, device=w.device) // rows_per_block
    w, keep, perm, hinv = _prepare_factor(
        w, keep, hessian, diagonal, act_order, damp, consume_hessian
    )
    column_of = list(range(in_features)) if perm is None else perm.tolist()
    limit = fmt.max_value

    def round_column(
        column: int, x: torch.Tensor, sweep: _Sweep
    ) -> tuple[torch.Tensor, torch.Tensor]:
        scale = scales[row_block, column_of[column] // columns_per_block]  # (out,)
        if keep is not None:  # a pruned position keeps the code of +0
            x = x * keep[:, column]
        code = (x / scale).clamp_(-limit, limit).to(fmt.torch_dtype)
        return code.view(torch.uint8), code.to(torch.float32) * scale

    codes, loss = _sweep(w, hinv, block_size, perm, round_column)
    return GPTQResult(codes, stored, None, loss)


def _inverse_hessian_factor(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor ``U`` of the dampened ``H⁻¹`` (``UᵀU = H⁻¹``), float32, in ``h``.

    With ``J`` the index reversal and ``J H J = L Lᵀ``, ``H⁻¹ = (J L⁻¹ J)ᵀ (J L⁻¹ J)`` and
    ``J L⁻¹ J`` is upper triangular with a positive diagonal, so it *is* the factor: one
    Cholesky and one triangular inverse instead of Cholesky, inverse, Cholesky.

    Memory matters here (offloaded runs budget for one layer; a 5632-wide Hessian is 127 MB),
    so on the CPU everything happens inside ``h``, in float32 as the reference GPTQ does:
    ``J·J`` is a reversal of the flat buffer, LAPACK's ``potrf`` and ``trtri`` (through scipy)
    overwrite one triangle. The other triangle is left alone until success, so a failed
    factorisation restores ``h`` from it and retries with 10x the dampening.
    """
    if h.device.type != "cpu":
        return _factor_on_device(h, damp)
    from threadpoolctl import threadpool_limits

    # One BLAS thread: these factorisations take milliseconds, and OpenBLAS's threads spin-wait
    # for each other; on a busy machine a 1536-wide factor took 1.5-5 s with two threads
    # against 0.07 s with one (measured on the 2-core CI machine under load 6).
    with threadpool_limits(limits=1, user_api="blas"):
        return _factor_cpu(h, damp)


def _factor_cpu(h: torch.Tensor, damp: float) -> torch.Tensor:
    from scipy.linalg import lapack  # scipy.linalg imports slowly; only GPTQ needs it

    matrix = h.numpy()  # C-contiguous float32, shares memory with h
    n = matrix.shape[0]
    _reverse_in_place(matrix)  # J H J
    diagonal = np.diagonal(matrix).copy()
    mean_diag = float(diagonal.astype(np.float64).mean())
    fraction = damp
    for _ in range(_CHOLESKY_RETRIES + 1):
        matrix.flat[:: n + 1] = diagonal + np.float32(fraction * mean_diag)
        # LAPACK is column-major: matrix.T is the same memory, Fortran-ordered. Its upper
        # factor R (JHJ = RᵀR) read row-major is L = Rᵀ, in the lower triangle; trtri then
        # leaves L⁻¹ there. The strict upper triangle (row-major) keeps J H J meanwhile.
        upper, info = lapack.spotrf(matrix.T, lower=0, clean=0, overwrite_a=1)
        if info == 0:
            inverse, info = lapack.strtri(upper, lower=0, overwrite_c=1)
            if info == 0 and not np.shares_memory(inverse, matrix):  # LAPACK had to copy
                matrix[...] = inverse.T
        if info == 0:
            for row in range(n - 1):
                matrix[row, row + 1 :] = 0.0
            _reverse_in_place(matrix)  # J L⁻¹ J
            if _all_finite(h):
                return h
            raise PassError(
                "gptq: the inverse Hessian factor has non-finite entries",
                hint="use more calibration samples, or a larger damp",
            )
        for row in range(1, n):  # restore the lower triangle from the untouched upper one
            matrix[row, :row] = matrix[:row, row]
        fraction = fraction * 10 if fraction > 0 else 1e-3
    raise _not_positive_definite(fraction / 10, damp)


def _all_finite(tensor: torch.Tensor, rows: int = 256) -> bool:
    """``isfinite(tensor).all()`` a slab of rows at a time: the full boolean mask of a
    5632-wide Hessian would be a 32 MB temporary."""
    return all(bool(torch.isfinite(slab).all()) for slab in torch.split(tensor, rows))


def _factor_on_device(h: torch.Tensor, damp: float) -> torch.Tensor:
    """The same factor with torch's own (out-of-place) kernels, for accelerator tensors."""
    mean_diag = float(torch.diagonal(h).double().mean())
    fraction = damp
    for _ in range(_CHOLESKY_RETRIES + 1):
        reversed_h = h.flip(0, 1)
        reversed_h.diagonal().add_(fraction * mean_diag)
        lower, info = torch.linalg.cholesky_ex(reversed_h)
        del reversed_h
        if int(info) == 0:
            eye = torch.eye(lower.shape[0], dtype=lower.dtype, device=lower.device)
            factor = torch.linalg.solve_triangular(lower, eye, upper=False).flip(0, 1)
            if bool(torch.isfinite(factor).all()):
                return factor.contiguous()
        fraction = fraction * 10 if fraction > 0 else 1e-3
    raise _not_positive_definite(fraction / 10, damp)


def _not_positive_definite(last: float, first: float) -> PassError:
    return PassError(
        f"gptq: the Hessian is not positive definite even with dampening {last:g} "
        f"of mean(diag H) (started at {first:g})",
        hint="use more calibration samples, or a larger damp",
    )


def _permute_in_place(matrix: np.ndarray, perm: np.ndarray) -> None:
    """``matrix ← matrix[perm][:, perm]`` by following the permutation's cycles, one row or
    column of scratch at a time."""
    n = len(perm)
    for axis in (0, 1):
        lines = matrix if axis == 0 else matrix.T
        seen = np.zeros(n, dtype=bool)
        for first in range(n):
            if seen[first] or perm[first] == first:
                seen[first] = True
                continue
            held = lines[first].copy()
            at = first
            while True:
                seen[at] = True
                source = int(perm[at])
                if source == first:
                    lines[at] = held
                    break
                lines[at] = lines[source]
                at = source


def _reverse_in_place(matrix: np.ndarray, chunk: int = 1 << 20) -> None:
    """``matrix[i, j] ↔ matrix[n-1-i, n-1-j]`` of a C-contiguous matrix: its flat buffer reversed,
    swapped a chunk at a time so no second matrix is allocated."""
    flat = matrix.reshape(-1)
    size = flat.size
    for start in range(0, size // 2, chunk):
        stop = min(start + chunk, size // 2)
        head = flat[start:stop].copy()
        flat[start:stop] = flat[size - stop : size - start][::-1]
        flat[size - stop : size - start] = head[::-1]


class _Sweep:
    """Where the column loop stands: the current block of weights and its scaled errors, so a
    grid can read the up-to-date weights of a group that starts at the current column."""

    def __init__(self, w: torch.Tensor, hinv: torch.Tensor) -> None:
        self.w, self.hinv = w, hinv
        self.block = self.errors = torch.empty(0)
        self.start = self.stop = 0

    def group(self, column: int, size: int) -> torch.Tensor:
        """(out, size) current weights of the group starting at ``column``."""
        return _current_group(
            self.w, self.block, self.errors, self.hinv, self.start, self.stop, column, size
        )


RoundColumn = Callable[[int, torch.Tensor, _Sweep], tuple[torch.Tensor, torch.Tensor]]
"""``(column, current weights (out,), sweep) -> (codes (out,), the weights they stand for)``."""


def _sweep(
    w: torch.Tensor,
    hinv: torch.Tensor,
    block_size: int,
    perm: torch.Tensor | None,
    round_column: RoundColumn,
) -> tuple[torch.Tensor, float]:
    """GPTQ's column loop, the same for every grid: each column (in processing order) is
    rounded by ``round_column``, its error is spread over the columns after it inside the block
    at once and over the rest of the weight once per block (lazy batching). ``w`` is updated in
    place. Returns the uint8 codes in natural column order and the summed OBS loss."""
    out_features, in_features = w.shape
    codes = torch.empty(out_features, in_features, dtype=torch.uint8, device=w.device)
    losses = torch.zeros(out_features, device=w.device)
    sweep = _Sweep(w, hinv)
    for start in range(0, in_features, block_size):
        stop = min(start + block_size, in_features)
        block = w[:, start:stop].clone()  # (out, count): exact current weights of the block
        errors = torch.zeros_like(block)  # scaled errors (w - q) / [H⁻¹]ᵢᵢ
        hinv_block = hinv[start:stop, start:stop]
        sweep.block, sweep.errors, sweep.start, sweep.stop = block, errors, start, stop
        for i in range(stop - start):
            column = start + i
            x = block[:, i]
            code, rounded = round_column(column, x, sweep)
            error = (x - rounded).div_(hinv_block[i, i])
            codes[:, column] = code
            errors[:, i] = error
            block[:, i + 1 :].addr_(error, hinv_block[i, i + 1 :], alpha=-1.0)
        losses += errors.square().sum(dim=1) / 2
        w[:, stop:].sub_(errors @ hinv[start:stop, stop:])
    if perm is not None:
        codes = codes[:, torch.argsort(perm)]
    return codes, float(losses.sum())


def _current_group(
    w: torch.Tensor,
    block: torch.Tensor,
    errors: torch.Tensor,
    hinv: torch.Tensor,
    start: int,
    stop: int,
    column: int,
    size: int,
) -> torch.Tensor:
    """(out, size) current weights of the group starting at ``column``.

    Columns inside the block are up to date in ``block``; columns past it have not yet had this
    block's lazy update, so it is applied here for the columns quantized so far.
    """
    end = column + size
    inside = block[:, column - start : min(end, stop) - start]
    if end <= stop:
        return inside
    done = column - start
    outside = w[:, stop:end] - errors[:, :done] @ hinv[start:column, stop:end]
    return torch.cat([inside, outside], dim=1)


def _group_params(
    current: torch.Tensor, group_fmt: IntFormat, observer: Observer
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out,) float32 scale and zero of one group from its current weights (out, size)."""
    clip = choose_clip(current, group_fmt, observer)
    _, scale, zero = quantize_int(current, group_fmt, clip_ratio=clip)
    scale_f32 = group_fmt.scale_values(scale[:, 0])
    if zero is None:
        return scale_f32, torch.full_like(scale_f32, float(group_fmt.midpoint))
    return scale_f32, zero[:, 0].to(torch.float32)


def refit_group_scales(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    codes: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    fmt: IntFormat,
    *,
    ridge: float = 1e-6,
) -> torch.Tensor:
    """Least-squares group scales for fixed integer ``codes``: the stored scales that minimise
    GPTQ's own objective ``tr((W - Q) H (W - Q)ᵀ)`` with ``Q = s · (codes - zero)``.

    Why: GPTQ picks a group's scale before rounding it (up front from the original weight under
    ``act_order``, from the error-updated weights otherwise) by a range rule, not by the output
    error; with the codes settled, that error is a quadratic in each row's scales (one small
    ``groups × groups`` system per row), so the best scales are one batched solve. Never worse
    on the objective than the scales it starts from (up to the storage dtype's rounding): a row
    whose system is singular, or whose solution has a non-positive scale, keeps its scales.

    ``weight`` (out, in) is the original weight, ``hessian`` (in, in) the layer's input Hessian,
    ``codes``/``scales``/``zeros`` GPTQ's result in ``fmt``'s storage (float scales only: e8m0
    block exponents are not refitted). Returns scales in ``fmt``'s storage dtype.
    """
    if fmt.power_of_two_scales:
        raise ValueError("refit_group_scales: e8m0 (power-of-two) scales cannot be refitted")
    out_features, in_features = weight.shape
    groups = fmt.groups(in_features)
    size = in_features // groups
    w = weight.detach().to(torch.float32)
    h = hessian.detach().to(device=w.device, dtype=torch.float32)
    zero = (
        torch.full((out_features, groups), float(fmt.midpoint), device=w.device)
        if zeros is None
        else zeros.to(device=w.device, dtype=torch.float32)
    )
    old = fmt.scale_values(scales).to(device=w.device, dtype=torch.float32)
    new = torch.empty_like(old)
    # rows in chunks: the (rows, groups, groups) systems of a wide layer are large
    chunk = max(1, _REFIT_ELEMENTS // max(groups * groups, in_features))
    for first in range(0, out_features, chunk):
        rows = slice(first, min(first + chunk, out_features))
        # integer steps from the zero point, per weight: Q = s[group] * steps
        steps = codes[rows].to(device=w.device, dtype=torch.float32)
        steps -= zero[rows].repeat_interleave(size, dim=1)
        new[rows] = _least_squares_scales(w[rows], h, steps, old[rows], groups, ridge)
    stored_value = fmt.scale_values(fmt.store_scales(torch.nan_to_num(new)))
    usable = (torch.isfinite(new) & torch.isfinite(stored_value) & (stored_value > 0)).all(dim=1)
    return fmt.store_scales(torch.where(usable.unsqueeze(1), new, old))


_REFIT_ELEMENTS = 1 << 24
"""Floats per row chunk of :func:`refit_group_scales` (64 MB of float32 per work tensor)."""


def _least_squares_scales(
    w: torch.Tensor,
    h: torch.Tensor,
    steps: torch.Tensor,
    old: torch.Tensor,
    groups: int,
    ridge: float,
) -> torch.Tensor:
    """(rows, groups) scales minimising ``(w - s·steps) H (w - s·steps)ᵀ`` row by row; NaN in a
    row whose system could not be solved."""
    rows, in_features = w.shape
    size = in_features // groups
    # normal equations per row: A s = b, A[g, g'] = steps_g H steps_g'ᵀ, b[g] = steps_g H wᵀ
    b = ((w @ h) * steps).reshape(rows, groups, size).sum(dim=-1)  # H symmetric
    system = torch.empty(rows, groups, groups, device=w.device)
    for g in range(groups):
        columns = slice(g * size, (g + 1) * size)
        through_g = steps[:, columns] @ h[columns, :]  # (rows, in): steps_g H, row by row
        system[:, :, g] = (through_g * steps).reshape(rows, groups, size).sum(dim=-1)
    diagonal = torch.diagonal(system, dim1=1, dim2=2)
    # a ridge towards the old scales keeps a group whose codes are all zero where it was
    strength = ridge * diagonal.mean(dim=1, keepdim=True).clamp_min(1e-30)
    system.diagonal(dim1=1, dim2=2).add_(strength)
    rhs = b + strength * old
    solution, info = torch.linalg.solve_ex(system.double(), rhs.double().unsqueeze(-1))
    new = solution.squeeze(-1).to(torch.float32)
    new[info != 0] = float("nan")
    return new
