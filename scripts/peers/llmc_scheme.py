"""llm-compressor's round-to-nearest preset schemes (NVFP4A16, MXFP4A16, FP8_DYNAMIC, FP8_BLOCK,
...) on a local HF folder, run inside llm-compressor's own virtual environment (the venv of
``llmc_gptq.py``; see its docstring).

``scripts/bench_fp4.py`` and ``scripts/bench_fp8.py`` call this with that venv's python and read
back each decoder Linear's weight as llm-compressor's own fake quantization leaves it
(``compressed_tensors``' ``forward_quantize`` with the scales its observers chose), so the peer is
scored on the same windows as ours. Only the weights are taken: a scheme that also quantizes
activations (FP8_DYNAMIC's per-token FP8, FP8_BLOCK's groups of 128) is compared weight-only,
like our weight-only rows.

Printed on the last line of stdout: JSON with the wall time of ``oneshot`` and the peak RSS.
Nothing here imports ``compress``.
"""

from __future__ import annotations

import argparse
import json


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--calibration", required=True, help="torch file: (samples, seq_len)")
    parser.add_argument("--scheme", required=True, help="a preset name, e.g. NVFP4A16")
    parser.add_argument("--out", required=True, help="safetensors file for the weights")
    args = parser.parse_args()

    import torch
    from compressed_tensors.quantization.lifecycle.forward import forward_quantize
    from llmc_common import oneshot_on_windows
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from safetensors.torch import save_file

    modifier = QuantizationModifier(targets="Linear", scheme=args.scheme, ignore=["lm_head"])
    model, seconds, peak_rss_mb = oneshot_on_windows(args.model_dir, args.calibration, modifier)
    weights: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, module in model.named_modules():
            scheme = getattr(module, "quantization_scheme", None)
            if not isinstance(module, torch.nn.Linear) or ".layers." not in name or not scheme:
                continue
            fake = forward_quantize(module, module.weight, "weight", scheme.weights)
            weights[f"{name}.weight"] = fake.detach().float().contiguous()
    save_file(weights, args.out)
    print(json.dumps({"seconds": seconds, "peak_rss_mb": peak_rss_mb, "tensors": len(weights)}))


if __name__ == "__main__":
    main()
