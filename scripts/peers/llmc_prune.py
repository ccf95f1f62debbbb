"""llm-compressor's SparseGPT and Wanda pruning on a local HF folder, run inside llm-compressor's
own virtual environment (the same venv as ``llmc_gptq.py``; see its docstring).

``scripts/bench_sparsity.py`` calls this with that venv's python, hands it the calibration windows
our own pruning recipes use, and reads back the pruned decoder Linear weights to score them on the
same evaluation windows as ours. Settings follow ours: every Linear of the decoder layers
(``lm_head`` ignored), SparseGPT block 128 and dampening 0.01 (ours), uniform sparsity.

Printed on the last line of stdout: JSON with the wall time of ``oneshot``, the peak RSS and the
measured sparsity of the weights written. Nothing here imports ``compress``.
"""

from __future__ import annotations

import argparse
import json


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--calibration", required=True, help="torch file: (samples, seq_len)")
    parser.add_argument("--method", choices=["sparsegpt", "wanda"], required=True)
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--mask-structure", default="0:0", help='"0:0" unstructured, or "2:4"')
    parser.add_argument("--out", required=True, help="safetensors file for the pruned weights")
    args = parser.parse_args()

    from llmc_common import decoder_linear_weights, oneshot_on_windows
    from llmcompressor.modifiers.pruning import WandaPruningModifier
    from llmcompressor.modifiers.pruning.sparsegpt import SparseGPTModifier
    from safetensors.torch import save_file

    common = {
        "sparsity": args.sparsity,
        "mask_structure": args.mask_structure,
        "targets": ["Linear"],
        "ignore": ["lm_head"],
    }
    modifier = (
        SparseGPTModifier(block_size=128, dampening_frac=0.01, **common)
        if args.method == "sparsegpt"
        else WandaPruningModifier(**common)
    )
    model, seconds, peak_rss_mb = oneshot_on_windows(args.model_dir, args.calibration, modifier)
    pruned = decoder_linear_weights(model)
    zeros = sum(int((w == 0).sum()) for w in pruned.values())
    total = sum(w.numel() for w in pruned.values())
    save_file(pruned, args.out)
    print(json.dumps({"seconds": seconds, "peak_rss_mb": peak_rss_mb, "sparsity": zeros / total}))


if __name__ == "__main__":
    main()
