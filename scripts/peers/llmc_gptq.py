"""llm-compressor's GPTQ on a local HF folder, run inside llm-compressor's own virtual environment.

``scripts/bench_quality.py`` calls this with the python of a separate venv (llm-compressor pins
a transformers version other than ours), hands it the calibration windows it also gives our own
GPTQ, and reads back the fake-quantized decoder Linear weights to score them like every other
method. The venv (CPU torch pinned first so pip does not pull the CUDA build):

    python -m venv /tmp/llmc/venv
    /tmp/llmc/venv/bin/pip install torch==2.13.0
    /tmp/llmc/venv/bin/pip install llmcompressor==0.14.0.1 transformers==5.17.0

Printed on the last line of stdout: JSON with the wall time of ``oneshot`` and the process's
peak RSS up to then. Nothing here imports ``compress``.
"""

from __future__ import annotations

import argparse
import json


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--calibration", required=True, help="torch file: (samples, seq_len)")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--symmetric", action="store_true")
    parser.add_argument("--actorder", default=None, help="static | group | weight | none")
    parser.add_argument("--out", required=True, help="safetensors file for the quantized weights")
    args = parser.parse_args()

    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from llmc_common import decoder_linear_weights, oneshot_on_windows
    from llmcompressor.modifiers.gptq import GPTQModifier
    from safetensors.torch import save_file

    weights = QuantizationArgs(
        num_bits=args.bits,
        type="int",
        symmetric=args.symmetric,
        strategy="group",
        group_size=args.group_size,
        actorder=None if args.actorder in (None, "none") else args.actorder,
    )
    modifier = GPTQModifier(
        config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=weights)},
        ignore=["lm_head"],
    )
    model, seconds, peak_rss_mb = oneshot_on_windows(args.model_dir, args.calibration, modifier)
    quantized = decoder_linear_weights(model)  # each at its quantized-then-dequantized value
    save_file(quantized, args.out)
    print(json.dumps({"seconds": seconds, "peak_rss_mb": peak_rss_mb, "tensors": len(quantized)}))


if __name__ == "__main__":
    main()
