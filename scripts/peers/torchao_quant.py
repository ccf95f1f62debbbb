"""torchao's weight-only quantization configs on a local HF folder, run inside torchao's own
virtual environment (nothing here imports ``compress``).

Set up once (torchao 0.18 is built against torch 2.13; its CUDA-only extensions fail to load
on a CPU machine with a warning and are not needed here)::

    python3 -m venv /tmp/tao/venv
    /tmp/tao/venv/bin/pip install torch==2.13.0
    /tmp/tao/venv/bin/pip install torchao==0.18.0 transformers==5.25.0 safetensors accelerate

``scripts/bench_presets.py`` calls this with that venv's python and reads back each decoder
Linear's weight as torchao leaves it (its quantized tensor subclass, dequantized), so the peer
is scored on the same windows as ours. torchao's round-to-nearest configs read no calibration
data; ``--calibration`` is accepted (the caller passes it to every peer) and ignored.

Printed on the last line of stdout: JSON with the wall time of ``quantize_`` and the peak RSS.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from typing import Any

CONFIGS = ("int8-wo", "int4-wo-g64", "int4-wo-g64-asym", "int4-hqq-g64", "fp8-wo")


def make_config(name: str) -> Any:
    """The torchao config a case name stands for (group 64: SmolLM2's 576 is no multiple of
    128, torchao's default group)."""
    import torch
    from torchao.quantization import (
        Float8WeightOnlyConfig,
        Int8WeightOnlyConfig,
        IntxWeightOnlyConfig,
    )
    from torchao.quantization.granularity import PerGroup
    from torchao.quantization.quant_primitives import MappingType

    if name == "int8-wo":
        return Int8WeightOnlyConfig()
    if name == "int4-wo-g64":
        return IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(64))
    if name == "int4-wo-g64-asym":
        return IntxWeightOnlyConfig(
            weight_dtype=torch.int4, granularity=PerGroup(64), mapping_type=MappingType.ASYMMETRIC
        )
    if name == "fp8-wo":
        return Float8WeightOnlyConfig()
    raise SystemExit(f"unknown config {name!r}; one of {', '.join(CONFIGS)}")


def hqq_int4(weight: Any, group: int = 64) -> Any:
    """torchao's HQQ (half-quadratic proximal search of each group's scale and zero point) at
    4 bits, asymmetric, dequantized. Its ``Int4WeightOnlyConfig(..., "hqq")`` packs for CUDA
    only (tile_packed_to_4d), so the primitive that config calls is called here directly, on
    the CPU, with the same arguments but the unpacked output."""
    import torch
    from torchao.quantization.quant_primitives import _choose_qparams_and_quantize_affine_hqq

    codes, scale, zero, _ = _choose_qparams_and_quantize_affine_hqq(
        weight.float(),
        nbits=4,
        group_size=group,
        axis=1,
        compute_dtype=torch.float32,
        device="cpu",
        raw_output=True,
    )
    rows = weight.shape[0]
    grouped = codes.float().reshape(rows, -1, group)
    return ((grouped - zero.reshape(rows, -1, 1)) * scale.reshape(rows, -1, 1)).reshape(
        weight.shape
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--calibration", help="ignored: round-to-nearest reads no data")
    parser.add_argument("--config", required=True, choices=CONFIGS)
    parser.add_argument("--out", required=True, help="safetensors file for the weights")
    args = parser.parse_args()

    import torch
    from safetensors.torch import save_file
    from torchao.quantization import quantize_
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)

    def decoder_linear(module: torch.nn.Module, fqn: str) -> bool:
        return isinstance(module, torch.nn.Linear) and ".layers." in fqn

    start = time.perf_counter()
    weights: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        if args.config == "int4-hqq-g64":
            for name, module in model.named_modules():
                if decoder_linear(module, name):
                    weights[f"{name}.weight"] = hqq_int4(module.weight).contiguous()
            seconds = time.perf_counter() - start
        else:
            quantize_(model, make_config(args.config), filter_fn=decoder_linear)
            seconds = time.perf_counter() - start
            for name, module in model.named_modules():
                if not decoder_linear(module, name):
                    continue
                weight = module.weight
                if type(weight) in (torch.Tensor, torch.nn.Parameter):
                    raise SystemExit(f"{name}: torchao left a plain tensor (config not applied)")
                weights[f"{name}.weight"] = weight.dequantize().float().contiguous()
    save_file(weights, args.out)
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"seconds": seconds, "peak_rss_mb": peak_rss_mb, "tensors": len(weights)}))


if __name__ == "__main__":
    main()
