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

Float formats are written in the layouts compressed-tensors has for them:

* FP8 E4M3 (per tensor, channel or 2-D block): ``float-quantized``, ``name.weight`` (N, K) as
  ``float8_e4m3fn`` (our codes are its bit patterns) and ``name.weight_scale`` ((1,), (N, 1) or
  blocks) in the model's dtype;
* MXFP4: ``mxfp4-pack-quantized``, ``name.weight_packed`` (N, K/2) uint8 (E2M1 codes, low nibble
  first, as ours) and ``name.weight_scale`` (N, K/32) uint8 E8M0 exponents, as ours;
* NVFP4: ``nvfp4-pack-quantized``, the same ``weight_packed``, ``weight_scale`` (N, K/16) as
  ``float8_e4m3fn`` (our E4M3 bit patterns) and ``weight_global_scale`` (1,) fp32, which
  compressed-tensors *divides* by: the reciprocal of our tensor scale (so a reloaded weight may
  differ from ours in the last bit of that product).

One export may mix these; each config group names its own format (``mixed-precision`` at the
top). Not written: E5M2, MXFP8, NF4/FP4 (use ``format: bitsandbytes``), block floating point.

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
from compress.formats.fp4 import FP4Format
from compress.formats.fp8 import FP8Format
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


def check_representable(name: str, fmt: Format, in_features: int) -> Format:
    """Refuse a module whose format no compressed-tensors layout (as vLLM serves it) holds;
    the format, otherwise."""
    if isinstance(fmt, IntFormat):
        return _check_int(name, fmt, in_features)
    reason = None
    if isinstance(fmt, FP8Format):
        if fmt.variant != "e4m3":
            reason = "E5M2 weights: vLLM serves FP8 weights in E4M3"
        elif fmt.scaling == "mx":
            reason = "MXFP8 (E8M0 scales per 32) is not written to this layout yet"
    elif isinstance(fmt, FP4Format):
        if fmt.variant not in ("mxfp4", "nvfp4"):
            reason = (
                f"{fmt.variant}: compressed-tensors has no layout for it (use format: "
                "bitsandbytes for nf4 / fp4)"
            )
        elif in_features % fmt.block:
            reason = f"rows of {in_features} are not whole blocks of {fmt.block}"
    else:
        reason = "no compressed-tensors layout holds this format"
    if reason is not None:
        raise ExportError(
            f"module {name!r} ({fmt.label()}) cannot be exported as {FORMAT_NAME}: {reason}",
            hint="quantize it to symmetric int4/int8, fp8 e4m3, mxfp4 or nvfp4, leave it out of "
            "the pass (ignore:), or export with format: compress",
        )
    return fmt


def _check_int(name: str, fmt: IntFormat, in_features: int) -> IntFormat:
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


def _fp8_scale_shape(fmt: FP8Format, out_features: int, in_features: int) -> tuple[int, ...]:
    return (1,) if fmt.scaling == "tensor" else fmt.scale_shape(out_features, in_features)


def expected_tensors(
    name: str, fmt: Format, out_features: int, in_features: int
) -> dict[str, tuple[tuple[int, ...], torch.dtype | None]]:
    """The tensors a quantized module stores in this layout: leaf -> (shape, dtype or None when
    it is the model's dtype)."""
    checked = check_representable(name, fmt, in_features)
    if isinstance(checked, FP8Format):
        return {
            "weight": ((out_features, in_features), torch.float8_e4m3fn),
            "weight_scale": (_fp8_scale_shape(checked, out_features, in_features), None),
        }
    if isinstance(checked, FP4Format):
        packed = (out_features, in_features // 2)
        blocks = (out_features, in_features // checked.block)
        if checked.variant == "mxfp4":
            return {"weight_packed": (packed, torch.uint8), "weight_scale": (blocks, torch.uint8)}
        return {
            "weight_packed": (packed, torch.uint8),
            "weight_scale": (blocks, torch.float8_e4m3fn),
            "weight_global_scale": ((1,), torch.float32),
        }
    assert isinstance(checked, IntFormat)
    groups = checked.groups(in_features)
    words = (in_features * checked.bits + 31) // 32
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
    rounding = _ScaleRounding(dtype)
    for item in items:
        owner, leaf, tensor, record = item.owner, item.leaf, item.tensor, item.record
        if record is None or leaf not in ("qweight", "scales", "tensor_scale"):
            converted = [item]
        else:
            fmt = check_representable(owner, record.fmt, record.shape[1])
            if isinstance(fmt, FP8Format):
                converted = _fp8_items(owner, leaf, tensor, fmt, record, rounding)
            elif isinstance(fmt, FP4Format):
                converted = _fp4_items(owner, leaf, tensor, fmt)
            else:
                converted = _int_items(owner, leaf, tensor, record, rounding)
        # nothing of this tensor is held while the producer makes the next one (an offloaded
        # export budgets for one tensor at a time)
        del tensor, item, record
        yield from converted
        del converted


class _ScaleRounding:
    """Float scales go in the model's dtype (what the loaders allocate); warn once if that
    rounds them."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype
        self.warned = False

    def __call__(self, owner: str, scale: torch.Tensor) -> torch.Tensor:
        rounded = scale.to(self.dtype)
        if not self.warned and not torch.equal(rounded.to(scale.dtype), scale):
            self.warned = True
            log.warning(
                "compressed-tensors export: %s scales rounded to %s, the model dtype the "
                "loaders allocate them in (first: %s)",
                scale.dtype,
                self.dtype,
                owner,
            )
        return rounded.contiguous()


def _int_items(
    owner: str,
    leaf: str,
    tensor: torch.Tensor,
    record: QuantizedWeight,
    rounding: _ScaleRounding,
) -> list[StoredItem]:
    if leaf == "qweight":
        out_features, in_features = record.shape
        return [
            StoredItem(f"{owner}.weight_packed", _words(tensor)),
            StoredItem(f"{owner}.weight_shape", torch.tensor([out_features, in_features])),
        ]
    return [StoredItem(f"{owner}.weight_scale", rounding(owner, tensor))]


def _fp8_items(
    owner: str,
    leaf: str,
    tensor: torch.Tensor,
    fmt: FP8Format,
    record: QuantizedWeight,
    rounding: _ScaleRounding,
) -> list[StoredItem]:
    if leaf == "qweight":  # our codes are E4M3 bit patterns
        return [StoredItem(f"{owner}.weight", tensor.view(torch.float8_e4m3fn).contiguous())]
    shape = _fp8_scale_shape(fmt, *record.shape)
    return [StoredItem(f"{owner}.weight_scale", rounding(owner, tensor.reshape(shape)))]


def _fp4_items(owner: str, leaf: str, tensor: torch.Tensor, fmt: FP4Format) -> list[StoredItem]:
    if leaf == "qweight":  # E2M1 codes, low nibble first: compressed-tensors' order too
        return [StoredItem(f"{owner}.weight_packed", tensor.contiguous())]
    if leaf == "tensor_scale":  # compressed-tensors divides by its global scale
        return [StoredItem(f"{owner}.weight_global_scale", (1.0 / tensor.float()).reshape(1))]
    if fmt.variant == "nvfp4":  # our E4M3 bit patterns
        return [StoredItem(f"{owner}.weight_scale", tensor.view(torch.float8_e4m3fn).contiguous())]
    return [StoredItem(f"{owner}.weight_scale", tensor.contiguous())]  # E8M0 exponents


def _weights_args(fmt: Format, in_features: int) -> dict[str, Any]:
    """The ``weights`` quantization args of a config group, as compressed-tensors writes them."""
    args: dict[str, Any] = {"symmetric": True, "dynamic": False, "actorder": None}
    if isinstance(fmt, FP8Format):
        args |= {"num_bits": 8, "type": "float", "strategy": fmt.scaling, "group_size": None}
        if fmt.scaling == "block":
            args["block_structure"] = [fmt.block_size, fmt.block_size]
        return args
    if isinstance(fmt, FP4Format):
        nvfp4 = fmt.variant == "nvfp4"
        return args | {
            "num_bits": 4,
            "type": "float",
            "strategy": "tensor_group" if nvfp4 else "group",
            "group_size": fmt.block,
            "scale_dtype": "torch.float8_e4m3fn" if nvfp4 else "torch.uint8",
        }
    assert isinstance(fmt, IntFormat)
    per_channel = fmt.group_size in (None, in_features)
    return args | {
        "num_bits": fmt.bits,
        "type": "int",
        "symmetric": fmt.symmetric,
        "strategy": "channel" if per_channel else "group",
        "group_size": None if per_channel else fmt.group_size,
        "observer": "minmax",
    }


def _layout_name(fmt: Format) -> str:
    if isinstance(fmt, FP8Format):
        return "float-quantized"
    if isinstance(fmt, FP4Format):
        return f"{fmt.variant}-pack-quantized"
    return "pack-quantized"


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
    layouts: set[str] = set()
    for name, record in records.items():
        fmt = check_representable(name, record.fmt, record.shape[1])
        args = _weights_args(fmt, record.shape[1])
        layout = _layout_name(fmt)
        layouts.add(layout)
        signature = repr(sorted(args.items()))
        if signature not in by_args:
            by_args[signature] = f"group_{len(by_args)}"
            groups[by_args[signature]] = {
                "targets": [],
                "weights": args,
                "input_activations": None,
                "output_activations": None,
                "format": layout,
            }
        groups[by_args[signature]]["targets"].append(name)
    return {
        "quant_method": FORMAT_NAME,
        "format": layouts.pop() if len(layouts) == 1 else "mixed-precision",
        "quantization_status": "compressed",
        "config_groups": groups,
        "ignore": [n for n in linears if n not in records],
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
    }
