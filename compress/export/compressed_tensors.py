"""The compressed-tensors "pack-quantized" layout, for serving an export with vLLM.

``export: {dir: ..., format: compressed-tensors}`` writes the same model as a compress export,
but each quantized Linear ``name`` stores what compressed-tensors (and so vLLM and transformers'
built-in ``compressed-tensors`` quantizer) reads for int weight-only schemes:

=============================  ===================  =======  ====================================
name                           shape                dtype    meaning
=============================  ===================  =======  ====================================
``name.weight_packed``         (N, ceil(K*b/32))    int32    codes ``q + 2**(b-1)``, each row one
                                                             little-endian bit stream in words
``name.weight_scale``          (N, G)               model    per-group (G = 1: per-channel) scale
``name.weight_shape``          (2,)                 int64    ``[N, K]``
=============================  ===================  =======  ====================================

and ``W = q * scale`` with signed ``q``. Our symmetric codes are already ``q + 2**(b-1)`` and
our rows the same little-endian bit stream, so ``weight_packed`` is ``qweight`` padded to whole
32-bit words, reinterpreted: nothing is re-quantized, and the reloaded model computes with
exactly the codes and (fp16-rounded) scales of a compress export.

Only what vLLM's weight-only kernels serve and the loaders here read back is written: 4 or 8
bits, symmetric, groups of 32, 64 or 128 or per-channel. Anything else (3-bit, group 40, ...)
is refused with an :class:`~compress.errors.ExportError` naming the module, its format and the
reason. Asymmetric formats are refused too: compressed-tensors 0.20 stores their zero points
packed along N (``weight_zero_point``, (ceil(N*b/32), G) int32), but its transformers
integration lays the parameter out unpacked, (N, G), on the meta device, so such a checkpoint
fails to load with a size mismatch (llm-compressor issue 1618 reports the same). Scales
are stored in the model's dtype, which is what the compressed-tensors loader allocates them in
(fp16 scales are exact in fp32; a bf16 model rounds them to bf16, as vLLM would).

Writing needs no compressed-tensors install; loading the folder does (``pip install
'compress-llm[vllm]'``).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from compress.errors import ExportError
from compress.export.stream import StoredItem
from compress.formats import Format
from compress.formats.int import IntFormat
from compress.ir import QuantizedWeight

__all__ = [
    "FORMAT_NAME",
    "SUPPORTED_BITS",
    "SUPPORTED_GROUPS",
    "check_representable",
    "convert_state",
    "expected_tensors",
    "quantization_config",
]

log = logging.getLogger(__name__)

FORMAT_NAME = "compressed-tensors"
SUPPORTED_BITS = (4, 8)
SUPPORTED_GROUPS = (None, 32, 64, 128)
"""Group sizes vLLM's weight-only kernels accept; ``None`` is per-channel."""
VLLM_FUSED = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
"""Linears vLLM fuses into one (Llama-family names): they must share one scheme."""


def _describe(fmt: Format) -> str:
    if not isinstance(fmt, IntFormat):
        return fmt.label()
    group = f"group {fmt.group_size}" if fmt.group_size else "per-channel"
    return f"int{fmt.bits} {group} {'symmetric' if fmt.symmetric else 'asymmetric'}"


def check_representable(name: str, fmt: Format, in_features: int) -> IntFormat:
    """Refuse a module whose format the pack-quantized layout (as vLLM serves it) cannot hold;
    the integer format it is, otherwise."""
    if not isinstance(fmt, IntFormat):
        raise ExportError(
            f"module {name!r} ({fmt.label()}) cannot be exported as {FORMAT_NAME}: only "
            "integer formats are written in its pack-quantized layout",
            hint="export with format: compress",
        )
    reason = None
    group = None if fmt.group_size in (None, in_features) else fmt.group_size
    if fmt.bits not in SUPPORTED_BITS:
        reason = f"{fmt.bits}-bit codes: vLLM serves pack-quantized weights at 4 or 8 bits"
    elif group not in SUPPORTED_GROUPS:
        reason = f"group size {group}: vLLM's kernels take groups of 32, 64 or 128, or per-channel"
    elif not fmt.symmetric:
        reason = (
            "asymmetric (zero points): transformers' compressed-tensors loader cannot read "
            "packed zero points back (size mismatch on weight_zero_point)"
        )
    elif fmt.power_of_two_scales:
        reason = "E8M0 power-of-two scales (block floating point): the layout stores float scales"
    if reason is not None:
        raise ExportError(
            f"module {name!r} ({_describe(fmt)}) cannot be exported as {FORMAT_NAME}: {reason}",
            hint="quantize it to symmetric int4 or int8 with group_size 32, 64, 128 or null, "
            "leave it out of the pass (ignore:), or export with format: compress",
        )
    return fmt


def expected_tensors(
    name: str, fmt: Format, out_features: int, in_features: int
) -> dict[str, tuple[tuple[int, ...], torch.dtype | None]]:
    """The tensors a quantized module stores in this layout: leaf -> (shape, dtype or None when
    it is the model's dtype)."""
    int_fmt = check_representable(name, fmt, in_features)
    groups = int_fmt.groups(in_features)
    words = (in_features * int_fmt.bits + 31) // 32
    return {
        "weight_packed": ((out_features, words), torch.int32),
        "weight_scale": ((out_features, groups), None),
        "weight_shape": ((2,), None),
    }


def _words(packed_bytes: torch.Tensor) -> torch.Tensor:
    """(rows, bytes) uint8 little-endian bit streams → (rows, ceil(bytes/4)) int32 words."""
    rows, width = packed_bytes.shape
    padded = torch.nn.functional.pad(packed_bytes, (0, -width % 4))
    if sys.byteorder != "little":
        raise ExportError("the compressed-tensors export needs a little-endian machine")
    words = padded.contiguous().view(torch.int32)  # bytes 0..3 → bits 0..31 of a word
    return words.reshape(rows, -1)


def convert_state(items: Iterator[StoredItem], *, dtype: torch.dtype) -> Iterator[StoredItem]:
    """Rename and re-lay the tensors of a compress export (``writer.packed_state``) on the fly;
    each packed tensor carries its module's record, so the stream stays one module deep.
    """
    rounded = False
    for item in items:
        owner, leaf, tensor, record = item.owner, item.leaf, item.tensor, item.record
        if record is None or leaf not in ("qweight", "scales"):
            converted = [item]
        elif leaf == "qweight":
            out_features, in_features = record.shape
            check_representable(owner, record.fmt, in_features)
            converted = [
                StoredItem(f"{owner}.weight_packed", _words(tensor)),
                StoredItem(f"{owner}.weight_shape", torch.tensor([out_features, in_features])),
            ]
        else:
            scale = tensor.to(dtype)
            if not rounded and not torch.equal(scale.to(tensor.dtype), tensor):
                rounded = True
                log.warning(
                    "compressed-tensors export: %s scales rounded to %s, the model dtype the "
                    "loaders allocate them in (first: %s)",
                    tensor.dtype,
                    dtype,
                    owner,
                )
            converted = [StoredItem(f"{owner}.weight_scale", scale.contiguous())]
        # nothing of this tensor is held while the producer makes the next one (an offloaded
        # export budgets for one tensor at a time)
        del tensor, item, record
        yield from converted
        del converted


def _weights_args(fmt: IntFormat, in_features: int) -> dict[str, Any]:
    per_channel = fmt.group_size in (None, in_features)
    return {
        "num_bits": fmt.bits,
        "type": "int",
        "symmetric": fmt.symmetric,
        "strategy": "channel" if per_channel else "group",
        "group_size": None if per_channel else fmt.group_size,
        "dynamic": False,
        "actorder": None,
        "observer": "minmax",
    }


def _check_fused_shards(records: dict[str, QuantizedWeight], linears: list[str]) -> None:
    """vLLM loads q/k/v (gate/up) as one matrix with the scheme of the first shard."""
    present = set(linears)
    for name in linears:
        parent, _, leaf = name.rpartition(".")
        for shards in VLLM_FUSED:
            if leaf != shards[0]:
                continue
            names = [f"{parent}.{shard}" for shard in shards if f"{parent}.{shard}" in present]
            formats = {
                n: _describe(records[n].fmt) if n in records else "not quantized" for n in names
            }
            if len(set(formats.values())) > 1:
                listing = ", ".join(f"{n}: {f}" for n, f in formats.items())
                raise ExportError(
                    f"modules {listing} cannot be exported as {FORMAT_NAME}: vLLM fuses them "
                    "into one layer, which needs one format",
                    hint="give these projections the same format (or leave them all out), "
                    "or export with format: compress",
                )


def quantization_config(
    records: dict[str, QuantizedWeight], model: nn.Module
) -> dict[str, Any] | None:
    """``config.json``'s ``quantization_config``: one config group per distinct format.

    Targets are exact module names, so per-layer formats need no class-wide rule; every other
    Linear (``lm_head``, left-out layers) is listed in ``ignore``, which vLLM consults.
    """
    if not records:
        return None
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    _check_fused_shards(records, linears)
    groups: dict[str, dict[str, Any]] = {}
    by_args: dict[str, str] = {}
    for name, record in records.items():
        fmt = check_representable(name, record.fmt, record.shape[1])
        args = _weights_args(fmt, record.shape[1])
        signature = repr(sorted(args.items()))
        if signature not in by_args:
            by_args[signature] = f"group_{len(by_args)}"
            groups[by_args[signature]] = {
                "targets": [],
                "weights": args,
                "input_activations": None,
                "output_activations": None,
                "format": "pack-quantized",
            }
        groups[by_args[signature]]["targets"].append(name)
    return {
        "quant_method": FORMAT_NAME,
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": groups,
        "ignore": [n for n in linears if n not in records],
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
    }
