"""bitsandbytes' 4-bit serialization, so that stock transformers + bitsandbytes load an NF4 / FP4
export (for QLoRA, or anywhere bitsandbytes runs) without ``import compress``.

``export: {dir: ..., format: bitsandbytes}`` writes every quantized Linear ``name`` the way
bitsandbytes' ``Linear4bit`` saves itself (what ``from_pretrained`` with a
``quantization_config`` of ``quant_method: bitsandbytes`` reads back):

=============================================  ==============  =======  ==========================
name                                           shape           dtype    meaning
=============================================  ==============  =======  ==========================
``name.weight``                                (N*K/2, 1)      uint8    codes of the row-major
                                                                        flattened weight, two a
                                                                        byte, *high* nibble first
``name.weight.absmax``                         (N*K/B,)        float32  absmax of each block of B
``name.weight.quant_map``                      (16,)           float32  code -> value (the table)
``name.weight.quant_state.bitsandbytes__nf4``  (bytes,)        uint8    JSON: quant_type,
                                                                        blocksize, dtype, shape
=============================================  ==============  =======  ==========================

bitsandbytes cuts the *flattened* weight into blocks; ours run along rows. The two agree when
``K`` is a multiple of the block size, which is required (SmolLM2: 576 and 1536 are multiples of
64). Our codes and absmax scales are bitsandbytes' own for NF4 (its round-to-nearest gives the
same bytes: ``tests/export/test_bitsandbytes.py``), so a GPTQ-calibrated NF4 model is written
as is, and loads as an ordinary bitsandbytes model that QLoRA can train on. Only the nibble order
differs from ours (we put the even column in the low nibble). Double quantization of the absmax
(``bnb_4bit_use_double_quant``) is not written: the absmax stay fp32, 0.5 bits per weight at
blocks of 64.

Writing needs no bitsandbytes install; loading the folder does (``pip install bitsandbytes``).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from compress.errors import ExportError
from compress.export.stream import StoredItem
from compress.formats import Format
from compress.formats.fp4 import FP4Format
from compress.ir import QuantizedWeight

__all__ = [
    "BLOCK_SIZES",
    "FORMAT_NAME",
    "check_representable",
    "convert_state",
    "expected_tensors",
    "quantization_config",
]

FORMAT_NAME = "bitsandbytes"
BLOCK_SIZES = (64, 128, 256, 512, 1024, 2048, 4096)
"""Block sizes bitsandbytes' 4-bit kernels take."""


def check_representable(name: str, fmt: Format, shape: tuple[int, int]) -> FP4Format:
    """Refuse a module bitsandbytes' 4-bit layout cannot hold; its 4-bit format otherwise."""
    hint = (
        "quantize it with format: nf4 (or fp4) and scale_block 64 or 128, leave it out of the "
        "pass (ignore:), or export with format: compress"
    )
    if not isinstance(fmt, FP4Format) or fmt.variant not in ("nf4", "fp4"):
        raise ExportError(
            f"module {name!r} ({fmt.label()}) cannot be exported as {FORMAT_NAME}: its 4-bit "
            "layout holds bitsandbytes' nf4 and fp4 only",
            hint=hint,
        )
    in_features = shape[1]
    if fmt.block not in BLOCK_SIZES:
        reason = f"blocks of {fmt.block}: bitsandbytes takes {', '.join(map(str, BLOCK_SIZES))}"
    elif in_features % fmt.block:
        reason = (
            f"rows of {in_features} are not whole blocks of {fmt.block}: bitsandbytes blocks the "
            "flattened weight, so its blocks would straddle rows"
        )
    else:
        return fmt
    raise ExportError(
        f"module {name!r} ({fmt.label()}) cannot be exported as {FORMAT_NAME}: {reason}",
        hint=hint,
    )


def expected_tensors(
    name: str, fmt: Format, out_features: int, in_features: int
) -> dict[str, tuple[tuple[int, ...], torch.dtype | None]]:
    """The tensors a quantized module stores in this layout: leaf -> (shape, dtype); the quant
    state's JSON has no fixed length (None: not checked)."""
    fp4 = check_representable(name, fmt, (out_features, in_features))
    return {
        "weight": ((out_features * in_features // 2, 1), torch.uint8),
        "weight.absmax": ((out_features * in_features // fp4.block,), torch.float32),
        "weight.quant_map": ((16,), torch.float32),
    }


def _state_json(fmt: FP4Format, shape: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    """The packed non-tensor part of bitsandbytes' ``QuantState`` (JSON bytes as uint8)."""
    state = {
        "quant_type": fmt.variant,
        "blocksize": fmt.block,
        "dtype": str(dtype).removeprefix("torch."),
        "shape": list(shape),
    }
    return torch.tensor(list(json.dumps(state).encode("utf-8")), dtype=torch.uint8)


def convert_state(items: Iterator[StoredItem], *, dtype: torch.dtype) -> Iterator[StoredItem]:
    """Rename and re-lay the tensors of a compress export (``writer.packed_state``) on the fly,
    one module deep; ``dtype`` is the model's float dtype, which the quant state records."""
    for item in items:
        owner, leaf, tensor, record = item.owner, item.leaf, item.tensor, item.record
        if record is None or leaf not in ("qweight", "scales"):
            converted = [item]
        elif leaf == "qweight":
            fmt = check_representable(owner, record.fmt, record.shape)
            swapped = ((tensor & 0x0F) << 4) | (tensor >> 4)  # high nibble first
            converted = [
                StoredItem(f"{owner}.weight", swapped.reshape(-1, 1).contiguous()),
                StoredItem(f"{owner}.weight.quant_map", fmt.table.to(torch.float32).clone()),
                StoredItem(
                    f"{owner}.weight.quant_state.bitsandbytes__{fmt.variant}",
                    _state_json(fmt, record.shape, dtype),
                ),
            ]
        else:
            absmax = tensor.to(torch.float32).reshape(-1).contiguous()
            converted = [StoredItem(f"{owner}.weight.absmax", absmax)]
        del tensor, item, record
        yield from converted
        del converted


def quantization_config(
    records: dict[str, QuantizedWeight], model: nn.Module, dtype: torch.dtype
) -> dict[str, Any] | None:
    """``config.json``'s ``quantization_config`` for transformers' bitsandbytes quantizer.

    One ``bnb_4bit_quant_type`` for the model (transformers' config has one); every Linear that
    is not quantized (``lm_head``, left-out layers) is listed in ``llm_int8_skip_modules``, or
    the loader would turn it into a 4-bit layer with nothing to load.
    """
    if not records:
        return None
    variants = {}
    for name, record in records.items():
        variants[name] = check_representable(name, record.fmt, record.shape).variant
    if len(set(variants.values())) > 1:
        listing = ", ".join(f"{n}: {v}" for n, v in list(variants.items())[:4])
        raise ExportError(
            f"the quantized modules mix 4-bit types ({listing}, ...), but a {FORMAT_NAME} "
            "export names one bnb_4bit_quant_type",
            hint="quantize every module to the same format (nf4 or fp4), or export with "
            "format: compress",
        )
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    skipped = [n for n in linears if n not in records]
    return {
        "quant_method": FORMAT_NAME,
        "load_in_4bit": True,
        "load_in_8bit": False,
        "_load_in_4bit": True,
        "_load_in_8bit": False,
        "bnb_4bit_quant_type": next(iter(variants.values())),
        "bnb_4bit_use_double_quant": False,
        "bnb_4bit_compute_dtype": str(dtype).removeprefix("torch."),
        "bnb_4bit_quant_storage": "uint8",
        "llm_int8_skip_modules": skipped,
    }
