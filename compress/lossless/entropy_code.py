"""The ``entropy_code`` pass: mark a model so its export stores weights entropy-coded, bit-exact.

Lossless coding changes nothing in memory, so the pass only validates the selection, estimates
the size from symbol histograms (exact Huffman lengths, no encoding) and attaches an
:class:`~compress.ir.EntropyPlan` that the export writer reads. BF16 tensors get
DFloat11-style coding (exponents Huffman-coded in pairs, raw sign+mantissa; arXiv
2504.11651); the integer codes of quantized Linears (INT2-INT8) are Huffman-coded whole. Put it
last in a recipe::

    model: {name: smollm2-135m, dtype: bfloat16}
    passes:
      - {pass: rtn, bits: 4, group_size: 64}     # optional
      - {pass: entropy_code}
"""

from __future__ import annotations

import fnmatch

import torch
from pydantic import Field, field_validator
from torch import nn

from compress.errors import PassError
from compress.formats.entropy.codec import (
    DEFAULT_CHUNK,
    DEFAULT_PAIR_BITS,
    DEFAULT_TABLE_BITS,
    exponent_pairs,
    split_bf16,
)
from compress.formats.entropy.huffman import code_lengths
from compress.ir import EntropyPlan, attach, quantized_modules
from compress.registry import PassConfig, PassContext, PassReport, register_pass

__all__ = ["EntropyCodeConfig", "entropy_code", "select_tensors"]


class EntropyCodeConfig(PassConfig):
    """Settings of the ``entropy_code`` pass."""

    floats: bool = Field(default=True, description="code BF16 tensors (exponents Huffman-coded)")
    codes: bool = Field(default=True, description="code the integer codes of quantized Linears")
    min_numel: int = Field(
        default=4096, ge=1, description="smaller tensors stay raw: their table would not pay off"
    )
    chunk: int = Field(
        default=DEFAULT_CHUNK,
        ge=256,
        le=1 << 24,
        description="weights per independently decodable chunk (threads / GPU lanes); even",
    )
    table_bits: int = Field(
        default=DEFAULT_TABLE_BITS,
        ge=8,
        le=16,
        description="integer codes: longest code in bits = log2 of the decode table size",
    )
    pair_bits: int = Field(
        default=DEFAULT_PAIR_BITS,
        ge=8,
        le=16,
        description="BF16: longest exponent-pair code in bits (16 is within 0.001 bits/weight "
        "of unlimited on SmolLM2; 12 costs 0.016)",
    )
    ignore: list[str] = Field(
        default_factory=list, description="glob patterns of tensor names to keep raw"
    )

    @field_validator("chunk")
    @classmethod
    def _even_chunk(cls, chunk: int) -> int:
        if chunk % 2:
            raise ValueError(
                f"chunk={chunk} must be even: BF16 exponents are coded in pairs that never "
                f"straddle chunks (try chunk: {chunk + 1})"
            )
        return chunk


def select_tensors(
    model: nn.Module, config: EntropyCodeConfig | EntropyPlan
) -> tuple[dict[str, str], dict[str, str]]:
    """(coded state-dict names -> kind, skipped names -> why) for ``model`` under ``config``.

    ``kind`` is ``"bf16"`` for a dense BF16 tensor or ``"codes"`` for a quantized Linear's
    ``weight`` (exported as its packed codes).
    """
    records = quantized_modules(model)
    chosen: dict[str, str] = {}
    skipped: dict[str, str] = {}
    seen: set[int] = set()
    for key, tensor in model.state_dict().items():
        owner, _, leaf = key.rpartition(".")
        if any(fnmatch.fnmatchcase(key, pattern) for pattern in config.ignore):
            skipped[key] = "matches ignore"
            continue
        if owner in records and leaf == "weight":
            if config.codes:
                chosen[key] = "codes"
            continue
        if tensor.data_ptr() in seen or not tensor.is_floating_point() or not config.floats:
            continue  # tied aliases are stored once; integer buffers stay raw
        seen.add(tensor.data_ptr())
        if tensor.numel() < config.min_numel:
            continue
        if tensor.dtype != torch.bfloat16:
            skipped[key] = f"dtype {str(tensor.dtype).removeprefix('torch.')} (only bfloat16 coded)"
            continue
        chosen[key] = "bf16"
    return chosen, skipped


def _estimated_bits(symbols: torch.Tensor, alphabet: int, table_bits: int) -> float:
    counts = torch.bincount(symbols.reshape(-1).to(torch.int64), minlength=alphabet)
    needed = max(alphabet - 1, 1).bit_length()  # codes long enough for every symbol
    lengths = code_lengths(counts.numpy(), max(table_bits, needed))
    return float((counts.numpy() * lengths).sum())


@register_pass("entropy_code", EntropyCodeConfig)
def entropy_code(model: nn.Module, config: EntropyCodeConfig, context: PassContext) -> PassReport:
    """Lossless entropy coding of BF16 weights and quantized codes in the export."""
    chosen, skipped = select_tensors(model, config)
    if not chosen:
        raise PassError(
            "entropy_code: no tensor to code (it codes bfloat16 tensors and quantized codes)"
            + (f"; skipped e.g. {next(iter(skipped.items()))}" if skipped else ""),
            hint="load the model in bfloat16 (model: {name: ..., dtype: bfloat16}) or "
            "quantize it first",
        )
    report = PassReport(name="entropy_code", skipped=skipped)
    records = quantized_modules(model)
    state = model.state_dict()
    raw_bits = coded_bits = 0.0
    for key, kind in context.progress.track(chosen.items(), "entropy_code", total=len(chosen)):
        if kind == "bf16":
            exponents, _ = split_bf16(state[key])
            pairs, symbols = exponent_pairs(exponents)
            alphabet = symbols.numel() ** 2
            bits = _estimated_bits(pairs, alphabet, config.pair_bits) + 8 * exponents.numel()
            before = 16 * exponents.numel()
        else:
            record = records[key.rpartition(".")[0]]
            bits = _estimated_bits(record.codes, 1 << record.fmt.code_bits, config.table_bits)
            before = record.fmt.code_bits * record.codes.numel()
        report.touched.append(key)
        numel = before / (16 if kind == "bf16" else records[key.rpartition(".")[0]].fmt.code_bits)
        report.per_module[key] = {
            "bits_per_weight": bits / numel,
            "raw_bits_per_weight": before / numel,
        }
        raw_bits += before
        coded_bits += bits
    report.metrics["estimated_ratio"] = coded_bits / raw_bits
    attach(
        model,
        EntropyPlan(
            floats=config.floats,
            codes=config.codes,
            min_numel=config.min_numel,
            chunk=config.chunk,
            table_bits=config.table_bits,
            pair_bits=config.pair_bits,
            ignore=list(config.ignore),
        ),
    )
    return report
