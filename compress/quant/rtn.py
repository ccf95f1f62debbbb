"""Round-to-nearest weight quantization (RTN).

Calibration-free: each group of a weight row gets a scale (and zero point when asymmetric) from
its range, and every weight is rounded to the nearest level. The baseline every calibrated
method is measured against.

Example recipe entries::

    passes:
      - {pass: rtn, bits: 4, group_size: 64, symmetric: true, observer: mse}
      - {pass: rtn, format: fp8_e4m3, scaling: channel}          # FP8 weights, fp32 scales
      - {pass: rtn, format: fp8_e4m3, scaling: block, scale_block: 64}
      - {pass: rtn, format: fp8_e4m3, scaling: mx}               # OCP MXFP8: E8M0 per 32
      - {pass: rtn, format: nf4, scale_block: 64}                # bitsandbytes NF4, absmax/64
      - {pass: rtn, format: mxfp4}                               # OCP MXFP4: E2M1, E8M0 per 32
      - {pass: rtn, format: mxfp6_e2m3}                          # OCP MXFP6 (or mxfp6_e3m2)
      - {pass: rtn, bits: 8, group_size: 32, scale_dtype: e8m0}  # OCP MXINT8
      - {pass: rtn, bits: 4, group_size: 16, scale_dtype: e8m0}  # block floating point, 4-bit

``format`` names the number format (``int``, the default; ``fp8_e4m3`` / ``fp8_e5m2``; or a
4-bit table format, :mod:`compress.formats.fp4`: ``nf4`` / ``fp4`` as bitsandbytes defines them,
``mxfp4``, ``nvfp4``; or OCP MXFP6, :mod:`compress.formats.fp6`: ``mxfp6_e2m3``,
``mxfp6_e3m2``); the keys after it belong to some formats only: ``bits``, ``group_size``,
``symmetric`` and ``scale_dtype`` to ``int`` (``scale_dtype: e8m0`` makes it block floating
point: a power-of-two scale per group, stored as one exponent byte; see
:mod:`compress.formats.int.spec`); ``observer: mse`` to ``int``, the 4-bit table formats and
MXFP6 (each block's scale searched for the least rounding error); ``scaling`` (``tensor``,
``channel``, the default, ``block``, or ``mx`` for OCP MXFP8) to FP8; ``scale_block`` to FP8
with ``scaling: block`` (the side of a square 2-D block, default 128; edge blocks may be
partial) and to ``nf4`` / ``fp4`` (columns per absmax block, default 64). ``mxfp4``,
``nvfp4`` and MXFP6 fix their blocks (32, 16 and 32). A key the chosen format does not take is
refused, naming it.
"""

from __future__ import annotations

import typing
from collections.abc import Callable, Mapping
from typing import Any, Literal

import torch
from pydantic import (
    Field,
    ModelWrapValidatorHandler,
    SerializerFunctionWrapHandler,
    ValidationError,
    model_serializer,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError
from torch import nn

from compress.errors import PassError
from compress.formats import Format
from compress.formats.fp4 import DEFAULT_BLOCKS, FP4Format
from compress.formats.fp4.spec import Variant as FP4Variant
from compress.formats.fp6 import MX_BLOCK, FP6Format
from compress.formats.fp6.spec import Variant as FP6Variant
from compress.formats.fp8 import FP8Format
from compress.formats.int import IntFormat
from compress.formats.int.spec import ScaleDtype
from compress.ir import QuantizedWeight, set_quantized
from compress.quant.allocate import allocated_format
from compress.quant.checks import check_group_sizes, format_when_read
from compress.quant.observers import choose_clip
from compress.registry import PassConfig, PassContext, PassReport, register_pass
from compress.sequential import for_each_layer
from compress.utils.modules import decoder_layers, select_weights, untie_

__all__ = ["RTNConfig", "WeightFormatConfig", "quantization_error", "rtn"]


WeightFormat = Literal[
    "int", "fp8_e4m3", "fp8_e5m2", "nf4", "fp4", "mxfp4", "nvfp4", "mxfp6_e2m3", "mxfp6_e3m2"
]
_INT_ONLY = ("bits", "group_size", "symmetric", "scale_dtype")
_FP8_ONLY = ("scaling", "scale_block")
_FP4_FORMATS = ("nf4", "fp4", "mxfp4", "nvfp4")
_FP6_FORMATS = ("mxfp6_e2m3", "mxfp6_e3m2")
_TABLE_FORMATS = (*_FP4_FORMATS, *_FP6_FORMATS)  # codes into a fixed table, a scale per block
_TABLE_BLOCKS = {**DEFAULT_BLOCKS, **dict.fromkeys(_FP6_FORMATS, MX_BLOCK)}
_FREE_BLOCKS = ("nf4", "fp4")  # the table formats whose block size is a choice
DEFAULT_FP8_BLOCK = 128  # DeepSeek-V3's weight blocks


def _format_key_problems(data: Mapping[Any, Any]) -> list[InitErrorDetails]:
    """One located error per key of ``data`` that the chosen format does not take."""
    chosen = data.get("format", "int")
    if chosen not in typing.get_args(WeightFormat):
        return []  # field validation names the bad format itself
    problems: list[InitErrorDetails] = []

    def refuse(key: str, message: str) -> None:
        error = PydanticCustomError("value_error", "{reason}", {"reason": message})
        problems.append(InitErrorDetails(type=error, loc=(key,), input=data[key]))

    for key in data:
        if chosen == "int" and key in _FP8_ONLY and data[key] is not None:
            refuse(
                key,
                f"{key} applies to format: fp8_e4m3 or fp8_e5m2, not format: int; set format: "
                "fp8_e4m3, or use group_size for integer groups",
            )
        elif chosen in _TABLE_FORMATS:
            _refuse_table_key(chosen, key, data[key], refuse)
        elif chosen != "int" and key in _INT_ONLY:
            fix = (
                "set scaling: block and scale_block for finer scales" if key == "group_size" else ""
            )
            refuse(
                key,
                f"{key} applies to format: int, not format: {chosen} (its codes are 8-bit "
                f"floats with fp32 scales); {fix or 'drop it'}",
            )
        elif chosen != "int" and key == "observer" and data[key] not in ("minmax", None):
            refuse(
                key,
                f"observer {data[key]} searches clip ratios on integer grids; format: {chosen} "
                "takes observer: minmax",
            )
        elif chosen != "int" and key == "scale_block" and data[key] is not None:
            scaling = data.get("scaling", "channel")
            if scaling in ("tensor", "channel", "mx"):
                refuse(
                    key,
                    f"scale_block needs scaling: block (scaling is {scaling}); set scaling: "
                    "block, or drop scale_block",
                )
    return problems


def _refuse_table_key(
    chosen: str, key: str, value: Any, refuse: Callable[[str, str], None]
) -> None:
    """The keys a table format (4-bit, MXFP6) does not take (see :func:`_format_key_problems`)."""
    bits = 6 if chosen in _FP6_FORMATS else 4
    what = f"format: {chosen} ({bits}-bit codes into a fixed table, a scale per block)"
    if key in _INT_ONLY:
        fix = (
            "set scale_block for the block size"
            if chosen in _FREE_BLOCKS
            else f"its blocks are {_TABLE_BLOCKS[chosen]} wide by definition; drop it"
        )
        refuse(
            key,
            f"{key} applies to format: int, not {what}; "
            + (fix if key == "group_size" else "drop it"),
        )
    elif key == "scaling" and value is not None:
        refuse(key, f"scaling applies to the fp8 formats, not {what}; drop it")
    elif key == "scale_block" and value is not None and chosen not in _FREE_BLOCKS:
        refuse(
            key,
            f"format: {chosen} has blocks of {_TABLE_BLOCKS[chosen]} by definition; drop "
            "scale_block, or use nf4 / fp4 for other block sizes",
        )


class WeightFormatConfig(PassConfig):
    """The keys that choose a weight format (``format`` and the keys of that format), shared by
    the passes that quantize to it (``rtn``, ``gptq``) or prepare for it (``awq``)."""

    bits: int = Field(default=4, ge=2, le=8, description="code width in bits (2..8)")
    group_size: int | None = Field(
        default=128,
        gt=0,
        description="columns sharing one scale; null = one scale per output channel",
    )
    symmetric: bool = Field(default=True, description="symmetric codes (no stored zero point)")
    scale_dtype: ScaleDtype = Field(
        default="float16",
        description="how group scales are stored: float16 / bfloat16 / float32, or e8m0 (a "
        "power-of-two exponent per group: block floating point; bits 8 with group_size 32 is "
        "OCP MXINT8; needs symmetric)",
    )
    format: WeightFormat = Field(
        default="int",
        description="number format of the weights: int (bits, group_size, symmetric), "
        "fp8_e4m3 / fp8_e5m2 (scaling, scale_block), nf4 / fp4 (scale_block), mxfp4, nvfp4, "
        "mxfp6_e2m3 / mxfp6_e3m2",
    )
    scaling: Literal["tensor", "channel", "block", "mx"] = Field(
        default="channel",
        description="fp8 only: one scale per tensor, per output channel (the default), per "
        "square block of scale_block, or mx (MXFP8: a power-of-two E8M0 scale per 32 weights "
        "of a row)",
    )
    scale_block: int | None = Field(
        default=None,
        gt=0,
        description=f"fp8 with scaling: block: side of the square blocks sharing one scale "
        f"(default {DEFAULT_FP8_BLOCK}; edge blocks may be partial); nf4 / fp4: columns per "
        f"absmax block (default {DEFAULT_BLOCKS['nf4']})",
    )

    @model_validator(mode="wrap")
    @classmethod
    def _keys_of_the_format(
        cls, data: Any, handler: ModelWrapValidatorHandler[WeightFormatConfig]
    ) -> Any:
        # Keys of the other format are refused where they stand (passes[0].bits), before field
        # validation, so that a recipe error names the key and its value.
        if isinstance(data, Mapping):
            problems = _format_key_problems(data)
            if problems:
                raise ValidationError.from_exception_data(cls.__name__, problems)
        return handler(data)

    @model_serializer(mode="wrap")
    def _dump(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # Only the keys of the chosen format: an integer recipe dumps as it always has (the
        # manifest's recipe, resume), and a dump validates again.
        data: dict[str, Any] = handler(self)
        if self.format in _TABLE_FORMATS:
            for key in (*_INT_ONLY, "scaling"):
                data.pop(key, None)
            data.pop("scale_block", None)
            if self.format in _FREE_BLOCKS:
                data["scale_block"] = self.fp4_format().block  # the size it used
            return data
        drop = ("format", *_FP8_ONLY) if self.format == "int" else _INT_ONLY
        for key in drop:
            data.pop(key, None)
        if self.format != "int" and self.scaling == "block":
            data["scale_block"] = self.scale_block or DEFAULT_FP8_BLOCK  # the size it used
        elif self.format != "int":
            data.pop("scale_block", None)
        return data

    @model_validator(mode="after")
    def _integer_format_exists(self) -> WeightFormatConfig:
        if self.format == "int":
            format_when_read(self.int_format)
        return self

    def int_format(self) -> IntFormat:
        """The integer format of ``format: int`` (its keys also have defaults otherwise)."""
        return IntFormat(self.bits, self.group_size, self.symmetric, self.scale_dtype)

    def fp4_format(self) -> FP4Format:
        """The 4-bit table format of ``format: nf4 | fp4 | mxfp4 | nvfp4``."""
        return FP4Format(typing.cast(FP4Variant, self.format), self.scale_block)

    def fp6_format(self) -> FP6Format:
        """The MXFP6 format of ``format: mxfp6_e2m3 | mxfp6_e3m2``."""
        return FP6Format(typing.cast(FP6Variant, self.format.removeprefix("mxfp6_")))

    def weight_format(self) -> Format:
        """The format this pass quantizes weights to."""
        if self.format == "int":
            return self.int_format()
        if self.format in _FP4_FORMATS:
            return self.fp4_format()
        if self.format in _FP6_FORMATS:
            return self.fp6_format()
        block = (self.scale_block or DEFAULT_FP8_BLOCK) if self.scaling == "block" else None
        return FP8Format("e4m3" if self.format == "fp8_e4m3" else "e5m2", self.scaling, block)


class RTNConfig(WeightFormatConfig):
    """Settings of the ``rtn`` pass."""

    observer: Literal["minmax", "mse"] = Field(
        default="minmax",
        description="range of each group: minmax = full range; mse = clip ratio searched per "
        "group (int) or block (nf4, fp4, mxfp4, nvfp4, mxfp6_*) to minimise the weight "
        "reconstruction error",
    )
    targets: list[str] | None = Field(
        default=None,
        description="glob patterns of module names; default: every Linear in decoder blocks. "
        "Embeddings and lm_head are quantized only when named, e.g. [model.embed_tokens, "
        "lm_head]; a tied pair named together is quantized once and stored once",
    )
    ignore: list[str] = Field(default_factory=list, description="glob patterns to leave as is")

    def formats(self) -> list[Format]:
        """The formats this pass leaves on modules (their runtimes are prepared early)."""
        return [self.weight_format()]


def quantization_error(weight: torch.Tensor, record: QuantizedWeight) -> float:
    """Relative Frobenius error ``||W - Q(W)|| / ||W||`` of one weight."""
    reference = weight.detach().to(torch.float32)
    diff = reference - record.dequantize(torch.float32)
    return float(diff.norm() / reference.norm().clamp_min(1e-30))


@register_pass("rtn", RTNConfig)
def rtn(model: nn.Module, config: RTNConfig, context: PassContext) -> PassReport:
    """Round-to-nearest quantization of Linear weights (integer, FP8, a 4-bit table format or
    MXFP6)."""
    fmt = config.weight_format()
    modules, skipped = select_weights(model, config.targets, config.ignore)
    if not modules:
        raise PassError(
            "rtn: no Linear or Embedding module matched targets="
            f"{config.targets if config.targets is not None else '<decoder blocks>'}",
            hint="check the targets/ignore patterns against model.named_modules()",
        )
    check_group_sizes(modules, fmt)
    report = PassReport(name="rtn", skipped=skipped)
    report.notes += untie_(model, modules)
    # A tied weight (lm_head = embedding) is quantized once. Only weights held by several
    # selected modules are remembered, with the weight itself: under offload a decoder layer's
    # freed weight may leave its id to the next layer's.
    holders: dict[int, int] = {}
    for module in modules.values():
        holders[id(module.weight)] = holders.get(id(module.weight), 0) + 1
    shared: dict[int, tuple[torch.Tensor, QuantizedWeight | None]] = {
        id(m.weight): (m.weight, None) for m in modules.values() if holders[id(m.weight)] > 1
    }

    def quantize(name: str, module: nn.Linear | nn.Embedding) -> None:
        weight = module.weight
        if weight.is_meta:
            raise PassError(
                f"rtn: {name} is not in memory (the model is offloaded)",
                hint="with model.offload only modules inside the decoder layers can be quantized",
            )
        tied = shared.get(id(weight))
        if tied is not None and tied[0] is weight and tied[1] is not None:
            # tied to a module quantized already: same codes, same weight
            set_quantized(module, tied[1], update_weight=False)
            report.touched.append(name)
            return
        chosen = allocated_format(name, module, fmt, "rtn")  # allocate_bits' width, if any
        clip: torch.Tensor | float = 1.0
        if isinstance(chosen, IntFormat):
            clip = choose_clip(weight, chosen, config.observer)
        elif isinstance(chosen, FP4Format | FP6Format) and config.observer == "mse":
            clip = chosen.search_clip(weight)
        codes, scales, zeros = chosen.quantize(weight, clip_ratio=clip)
        record = QuantizedWeight(codes, scales, zeros, chosen)
        report.per_module[name] = {"relative_error": quantization_error(weight, record)}
        if tied is not None:
            shared[id(weight)] = (weight, record)
        set_quantized(module, record)
        report.touched.append(name)

    prefix, _ = decoder_layers(model)

    def step(index: int, layer_name: str, layer: nn.Module) -> None:
        for name, module in modules.items():
            if name.startswith(layer_name + "."):
                quantize(name, module)

    # decoder layers one at a time (offloadable, resumable), then anything targeted outside them
    for_each_layer(
        model,
        step,
        description="rtn layers",
        progress=context.progress,
        layers=context.layers,
        report=report,
    )
    for name, module in modules.items():
        if not name.startswith(prefix + "."):
            quantize(name, module)
    errors = [entry["relative_error"] for entry in report.per_module.values()]
    report.metrics["mean_relative_error"] = sum(errors) / len(errors)
    report.metrics["max_relative_error"] = max(errors)
    return report
