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
import resource
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--calibration", required=True, help="torch file: (samples, seq_len)")
    parser.add_argument("--method", choices=["sparsegpt", "wanda"], required=True)
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--mask-structure", default="0:0", help='"0:0" unstructured, or "2:4"')
    parser.add_argument("--out", required=True, help="safetensors file for the pruned weights")
    args = parser.parse_args()

    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import WandaPruningModifier
    from llmcompressor.modifiers.pruning.sparsegpt import SparseGPTModifier
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
    ids: torch.Tensor = torch.load(args.calibration)
    dataset = Dataset.from_dict(
        {"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()}
    )
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
    start = time.perf_counter()
    oneshot(
        model=model,
        dataset=dataset,
        recipe=modifier,
        max_seq_length=ids.shape[1],
        num_calibration_samples=ids.shape[0],
        shuffle_calibration_samples=False,
    )
    seconds = time.perf_counter() - start
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    pruned = {
        f"{name}.weight": module.weight.detach().float().contiguous()
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and ".layers." in name
    }
    zeros = sum(int((w == 0).sum()) for w in pruned.values())
    total = sum(w.numel() for w in pruned.values())
    save_file(pruned, args.out)
    print(json.dumps({"seconds": seconds, "peak_rss_mb": peak_rss_mb, "sparsity": zeros / total}))


if __name__ == "__main__":
    main()
