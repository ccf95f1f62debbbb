"""GPTQ: layer-wise quantization that corrects rounding error with second-order information.

For each Linear, the inputs it sees on calibration text give the Hessian ``H = 2 XᵀX`` of the
layer's squared output error; columns are rounded one at a time and the error of each is spread
over the columns not yet rounded, weighted by ``H⁻¹`` (Frantar et al., "GPTQ: Accurate
Post-Training Quantization for Generative Pre-trained Transformers", 2022). Layers are processed
in order by :mod:`compress.sequential`, so each one is calibrated on the outputs of the already
quantized layers before it. The maths lives in :mod:`compress.quant.gptq_math`.

Example recipe entries::

    calibration: {dataset: builtin:wiki, samples: 128, seq_len: 512}
    passes:
      - {pass: gptq, bits: 4, group_size: 64, act_order: true, observer: mse}
      - {pass: gptq, format: nvfp4}            # or nf4 (scale_block: 64), fp4, mxfp4
      - {pass: gptq, format: mxfp6_e3m2}       # OCP MXFP6, or mxfp6_e2m3
      - {pass: gptq, format: fp8_e4m3, scaling: channel}
      - {pass: gptq, bits: 4, group_size: 64, scale_refits: 2}

``scale_refits`` refits the integer group scales by least squares once the codes are chosen
(GPTQ's own objective, codes fixed; :func:`~compress.quant.gptq_math.refit_group_scales`), then
sweeps again with them; off by default (each refit costs one more sweep of the layer).

``format`` takes ``int`` (the default), a 4-bit table format (``nf4``, ``fp4``, ``mxfp4``,
``nvfp4``), MXFP6 (``mxfp6_e2m3``, ``mxfp6_e3m2``) or FP8 (``fp8_e4m3``, ``fp8_e5m2``, any
``scaling``), with the same keys as ``rtn``;
GPTQ then rounds onto that format's grid.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from pydantic import Field, model_validator
from torch import nn

from compress.errors import PassError
from compress.formats.fp4 import FP4Format
from compress.formats.fp6 import FP6Format
from compress.formats.fp8 import FP8Format
from compress.formats.int import IntFormat
from compress.ir import QuantizedWeight, SparsityMask, get, set_quantized
from compress.quant.allocate import allocated_format
from compress.quant.checks import check_group_sizes
from compress.quant.gptq_math import accumulate_hessian, gptq_quantize
from compress.quant.rtn import RTNConfig, quantization_error
from compress.registry import PassContext, PassReport, register_pass
from compress.sequential import run_sequential
from compress.utils.hooks import capture_inputs
from compress.utils.modules import select_decoder_linears

__all__ = ["GPTQConfig", "gptq"]


class GPTQConfig(RTNConfig):
    """Settings of the ``gptq`` pass: the RTN format options plus GPTQ's own."""

    block_size: int = Field(default=128, gt=0, description="columns per lazy-update block")
    damp: float = Field(
        default=0.01, gt=0, le=1, description="dampening, as a fraction of mean(diag H)"
    )
    act_order: bool = Field(
        default=False, description="round columns in order of decreasing Hessian diagonal"
    )
    batch_size: int = Field(default=8, gt=0, description="calibration samples per forward")
    scale_refits: int = Field(
        default=0,
        ge=0,
        le=8,
        description="least-squares refits of the group scales for the chosen codes (integer "
        "formats); each refit after the first sweeps the codes again with the scales fixed",
    )

    @model_validator(mode="after")
    def _refits_need_float_scales(self) -> GPTQConfig:
        if self.scale_refits and (self.format != "int" or self.scale_dtype == "e8m0"):
            chosen = f"format: {self.format}" if self.format != "int" else "scale_dtype: e8m0"
            raise ValueError(
                f"scale_refits {self.scale_refits} refits the float group scales of integer "
                f"formats, and {chosen} has none to refit; drop scale_refits"
            )
        return self

    def gptq_format(self) -> IntFormat | FP4Format | FP6Format | FP8Format:
        """The format GPTQ rounds onto: integer, 4-bit table, MXFP6 or FP8 grids."""
        fmt = self.weight_format()
        assert isinstance(fmt, IntFormat | FP4Format | FP6Format | FP8Format)
        return fmt


@register_pass("gptq", GPTQConfig, calibrated=True)
def gptq(model: nn.Module, config: GPTQConfig, context: PassContext) -> PassReport:
    """GPTQ weight quantization, calibrated layer by layer."""
    calibration = context.require_calibration("gptq")
    fmt = config.gptq_format()
    modules, skipped = select_decoder_linears(
        model,
        config.targets,
        config.ignore,
        pass_name="gptq",
        why="gptq calibrates decoder layers only",
    )
    check_group_sizes(modules, fmt)

    report = PassReport(name="gptq", skipped=skipped)

    def step(index: int, layer_name: str, layer: nn.Module, run: Callable[[], None]) -> None:
        mine = {n: m for n, m in modules.items() if n.startswith(layer_name + ".")}
        if not mine:
            return
        hessians = SharedHessians()
        with capture_inputs(mine, hessians.collect):
            run()
        hessians.stop_collecting()
        names = list(mine)
        for position, name in enumerate(names):
            hessian, count = hessians.get(name)
            if hessian is None or count == 0:
                raise PassError(f"gptq: layer {name} saw no calibration input")
            last_use = not any(hessians.shared(name, later) for later in names[position + 1 :])
            if last_use:  # GPTQ may work inside it; nothing else holds it past this module
                hessians.drop(name)
            chosen = allocated_format(name, mine[name], fmt, "gptq")  # allocate_bits' width
            assert isinstance(chosen, IntFormat | FP4Format | FP6Format | FP8Format)
            _quantize_module(name, mine[name], hessian, chosen, config, report, consume=last_use)
            del hessian
            context.layers.release_weight(mine[name])  # offloading: its codes are enough now

    run_sequential(
        model,
        calibration,
        step,
        batch_size=config.batch_size,
        description="gptq layers",
        progress=context.progress,
        layers=context.layers,
        report=report,
    )
    errors = [m["relative_error"] for m in report.per_module.values()]
    report.metrics["mean_relative_error"] = sum(errors) / len(errors)
    report.metrics["max_relative_error"] = max(errors)
    report.metrics["calibration_tokens"] = float(calibration.numel())
    return report


class SharedHessians:
    """Hessian accumulators, one per distinct input: q/k/v (and gate/up) read the same tensor.

    Sharing is decided on the first batch, while every module's first input is held alive, so a
    matching storage pointer can only mean the very same tensor.
    """

    def __init__(self) -> None:
        self._first: dict[str, torch.Tensor] = {}
        self._owner: dict[str, str] = {}
        self._sums: dict[str, tuple[torch.Tensor | None, int]] = {}

    def collect(self, name: str, inputs: torch.Tensor) -> None:
        if name not in self._owner:
            self._owner[name] = next(
                (
                    other
                    for other, seen in self._first.items()
                    if seen.data_ptr() == inputs.data_ptr() and seen.shape == inputs.shape
                ),
                name,
            )
            self._first[name] = inputs
        owner = self._owner[name]
        if owner != name:
            return
        hessian, count = self._sums.get(name, (None, 0))
        self._sums[name] = accumulate_hessian(hessian, inputs, count)

    def stop_collecting(self) -> None:
        """Drop the first inputs held for the sharing check (a wide layer's are tens of MB)."""
        self._first.clear()

    def shared(self, name: str, other: str) -> bool:
        return self._owner.get(name, name) == self._owner.get(other, other)

    def drop(self, name: str) -> None:
        self._sums.pop(self._owner.get(name, name), None)

    def get(self, name: str) -> tuple[torch.Tensor | None, int]:
        return self._sums.get(self._owner.get(name, name), (None, 0))


def _quantize_module(
    name: str,
    module: nn.Linear,
    hessian: torch.Tensor,
    fmt: IntFormat | FP4Format | FP6Format | FP8Format,
    config: GPTQConfig,
    report: PassReport,
    *,
    consume: bool = False,
) -> None:
    mask = get(module, SparsityMask)  # a pruned layer: its zeros stay zero (gptq_quantize keep)
    result = gptq_quantize(
        module.weight.detach(),
        hessian,
        fmt,
        block_size=config.block_size,
        damp=config.damp,
        act_order=config.act_order,
        observer=config.observer,
        consume_hessian=consume,
        keep=None if mask is None else mask.mask,
        scale_refits=config.scale_refits,
    )
    record = QuantizedWeight(result.codes, result.scales, result.zeros, fmt)
    report.per_module[name] = {
        "relative_error": quantization_error(module.weight, record),
        "gptq_loss": result.error,
    }
    set_quantized(module, record)
    report.touched.append(name)
