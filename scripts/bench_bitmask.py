"""A pruned, unquantized SmolLM2-135M stored in the bitmask format against the same weights
stored dense: decoder bytes, folder size, decode speed, and that the logits are the same.

The builtin model (bf16) is magnitude-pruned per row to each ``--sparsity`` (every decoder
Linear; the weights, not their quality, are what this measures: a calibrated Wanda or SparseGPT
mask stores the same number of values), exported with ``sparse: true`` (the default: values plus
a bitmask) and ``sparse: false``, and both folders are reloaded: prefill logits must be equal
(the reference kernel is the dense matmul of the same values), and greedy decode speed is
measured for each in a fresh process, alternating between the two, ``--rounds`` times (medians).

    python scripts/bench_bitmask.py          # -> benchmarks/bitmask.{json,md}
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchrows import BENCHMARKS, cpu_flags, machine


def decoder_bytes(folder: Path) -> int:
    from safetensors import safe_open

    total = 0
    for path in folder.glob("*.safetensors"):
        with safe_open(str(path), "pt") as handle:
            for key in handle.keys():  # noqa: SIM118  (safe_open has no __iter__)
                if ".layers." in key and "norm" not in key:
                    tensor = handle.get_tensor(key)
                    total += tensor.numel() * tensor.element_size()
    return total


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def one_sparsity(sparsity: float, rounds: int, tokens: int, work: Path) -> dict[str, Any]:
    import copy

    import torch
    from transformers import AutoModelForCausalLM

    import compress  # noqa: F401  (our loader)
    from compress.evaluate.speed import measure_generation
    from compress.export.writer import export_model
    from compress.models import load_model
    from compress.prune.prune import PruneConfig, prune
    from compress.registry import PassContext

    model, tokenizer = load_model("smollm2-135m")
    pruned = copy.deepcopy(model)
    prune(pruned, PruneConfig(method="magnitude", sparsity=sparsity), PassContext())
    folders = {"bitmask": work / f"bitmask-{sparsity}", "dense": work / f"dense-{sparsity}"}
    export_model(pruned, tokenizer, folders["bitmask"])
    export_model(pruned, tokenizer, folders["dense"], sparse=False)
    ids = torch.arange(1000, 1128).unsqueeze(0)
    with torch.inference_mode():
        logits = {
            name: AutoModelForCausalLM.from_pretrained(folder)(ids).logits
            for name, folder in folders.items()
        }
    speeds: dict[str, list[float]] = {name: [] for name in folders}
    for _ in range(rounds):
        for name, folder in folders.items():
            speeds[name].append(measure_generation(folder, new_tokens=tokens).tokens_per_s)
    row = {
        "sparsity": sparsity,
        "prefill_logits_equal": bool(torch.equal(logits["bitmask"], logits["dense"])),
        "decoder_bytes": {name: decoder_bytes(f) for name, f in folders.items()},
        "folder_bytes": {name: folder_bytes(f) for name, f in folders.items()},
        "tokens_per_s": {name: statistics.median(v) for name, v in speeds.items()},
        "tokens_per_s_runs": speeds,
    }
    row["decoder_ratio"] = row["decoder_bytes"]["bitmask"] / row["decoder_bytes"]["dense"]
    row["speed_ratio"] = row["tokens_per_s"]["bitmask"] / row["tokens_per_s"]["dense"]
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sparsity", nargs="*", type=float, default=[0.5, 0.7])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=32)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [one_sparsity(s, args.rounds, args.tokens, Path(tmp)) for s in args.sparsity]
    data = {
        "machine": machine(),
        "cpu_flags": cpu_flags(),
        "date": datetime.date.today().isoformat(),
        "command": "python scripts/bench_bitmask.py " + " ".join(sys.argv[1:]),
        "rows": rows,
    }
    (BENCHMARKS / "bitmask.json").write_text(json.dumps(data, indent=1) + "\n")
    lines = [
        "# Pruned bf16 SmolLM2-135M: the bitmask format against dense storage",
        "",
        f"Machine: {data['machine']} ({data['cpu_flags']}); {data['date']}.",
        f"Command: `{data['command']}`",
        "",
        "Magnitude pruning per row of every decoder Linear, exported sparse (values + bitmask) "
        f"and dense; greedy decode of {args.tokens} tokens at batch 1 in a fresh process, "
        f"{args.rounds} alternating rounds, medians.",
        "",
        "| sparsity | decoder bytes, bitmask / dense | folder MB, bitmask / dense | "
        "decode tokens/s, bitmask / dense | ratio | prefill logits equal |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        mb = {k: v / 1e6 for k, v in row["folder_bytes"].items()}
        tps = row["tokens_per_s"]
        lines.append(
            f"| {row['sparsity']:.0%} | {row['decoder_ratio']:.3f} | {mb['bitmask']:.1f} / "
            f"{mb['dense']:.1f} | {tps['bitmask']:.1f} / {tps['dense']:.1f} | "
            f"{row['speed_ratio']:.2f}x | {row['prefill_logits_equal']} |"
        )
    (BENCHMARKS / "bitmask.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
