"""Structured pruning on SmolLM2-135M: layers, MLP channels, head groups and combinations.

Each variant runs the ``prune`` pass(es) with ``structure`` on a copy of the model (calibration:
builtin:wiki, 32 windows x 512 tokens, seed 0) and is scored on 32 windows x 512 tokens of the
builtin:wiki evaluation split against the original model: perplexity, KL(original || pruned),
top-1, with the parameter counts (decoder = the 30 decoder layers; embeddings excluded). One
thread (the machine is shared), one run.

    python scripts/bench_structured.py                  # all -> benchmarks/structured.json
    python scripts/bench_structured.py --variants layers-8 --merge
    python scripts/bench_structured.py --table          # the markdown table of the JSON
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_sparsity import MODEL
from benchrows import BENCHMARKS, cpu_flags, load_rows, machine, write_rows

CALIBRATION = {"dataset": "builtin:wiki", "samples": 32, "seq_len": 512, "seed": 0}
EVAL_WINDOWS, EVAL_SEQ_LEN = 32, 512

VARIANTS: dict[str, list[dict[str, Any]]] = {
    "layers-8": [{"structure": "layers", "remove": 8}],
    "channels-512": [{"structure": "channels", "remove": 512}],  # 24.99%: just short of 25
    "channels-544": [{"structure": "channels", "remove": 544}],
    "channels-576": [{"structure": "channels", "remove": 576}],
    "heads-2of3": [{"structure": "heads", "remove": 2}],
    "heads-1+channels-384": [
        {"structure": "heads", "remove": 1},
        {"structure": "channels", "remove": 384},
    ],
    "channels-384+layers-3": [
        {"structure": "channels", "remove": 384},
        {"structure": "layers", "remove": 3},
    ],
    "channels-512+layers-1": [
        {"structure": "channels", "remove": 512},
        {"structure": "layers", "remove": 1},
    ],
    "channels-480+layers-1": [
        {"structure": "channels", "remove": 480},
        {"structure": "layers", "remove": 1},
    ],
    "channels-416+layers-2": [
        {"structure": "channels", "remove": 416},
        {"structure": "layers", "remove": 2},
    ],
    "channels-352+layers-3": [
        {"structure": "channels", "remove": 352},
        {"structure": "layers", "remove": 3},
    ],
    "channels-288+layers-4": [
        {"structure": "channels", "remove": 288},
        {"structure": "layers", "remove": 4},
    ],
    "channels-224+layers-5": [
        {"structure": "channels", "remove": 224},
        {"structure": "layers", "remove": 5},
    ],
}


def decoder_parameters(model: Any) -> int:
    from compress.utils.modules import decoder_layers

    return sum(p.numel() for p in decoder_layers(model)[1].parameters())


def run_one(name: str, model: Any, reference: Any, calibration: Any, windows: Any) -> dict:
    from compress.evaluate.quality import compare_to_reference
    from compress.prune.prune import PruneConfig, prune
    from compress.registry import PassContext

    pruned = copy.deepcopy(model)
    context = PassContext(calibration=calibration)
    start = time.perf_counter()
    removed_layers: list[list[str]] = []
    for options in VARIANTS[name]:
        report = prune(pruned, PruneConfig(**options), context)
        if options["structure"] == "layers":  # indices of the model the pass saw
            removed_layers.append(sorted(report.touched, key=lambda n: int(n.rsplit(".", 1)[1])))
    prune_seconds = time.perf_counter() - start
    start = time.perf_counter()
    quality = compare_to_reference(pruned, reference, windows, batch_size=4)
    config = pruned.config
    before = decoder_parameters(reference)
    after = decoder_parameters(pruned)
    return {
        "variant": name,
        "passes": VARIANTS[name],
        "parameters": sum(p.numel() for p in pruned.parameters()),
        "reference_parameters": sum(p.numel() for p in reference.parameters()),
        "decoder_parameters": after,
        "reference_decoder_parameters": before,
        "decoder_fraction_removed": 1 - after / before,
        "shape": {
            k: getattr(config, k)
            for k in ("num_hidden_layers", "num_attention_heads", "num_key_value_heads")
        }
        | {"intermediate_size": config.intermediate_size},
        "removed_layers": removed_layers,
        "quality": quality.to_dict(),
        "prune_seconds": prune_seconds,
        "evaluate_seconds": time.perf_counter() - start,
    }


def render(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| variant | layers | heads (kv) | MLP channels | decoder params | removed | params | "
        "ppl | KL | top-1 | prune s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        q, s = row["quality"], row["shape"]
        lines.append(
            f"| {row['variant']} | {s['num_hidden_layers']} | {s['num_attention_heads']} "
            f"({s['num_key_value_heads']}) | {s['intermediate_size']} | "
            f"{row['decoder_parameters'] / 1e6:.1f}M | "
            f"{100 * row['decoder_fraction_removed']:.1f}% | "
            f"{row['parameters'] / 1e6:.1f}M | {q['perplexity']:.2f} | {q['kl_mean']:.3f} | "
            f"{100 * q['top1_agreement']:.1f}% | {row['prune_seconds']:.0f} |"
        )
    if rows:
        first = rows[0]
        lines += [
            "",
            f"Original: 30 layers, 9 heads (3 kv), 1536 MLP channels, "
            f"{first['reference_decoder_parameters'] / 1e6:.1f}M decoder parameters, "
            f"{first['reference_parameters'] / 1e6:.1f}M in all; perplexity "
            f"{first['quality']['reference_perplexity']:.2f} on the same windows.",
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS))
    parser.add_argument("--merge", action="store_true", help="keep rows of variants not rerun")
    parser.add_argument("--table", action="store_true", help="print the JSON's table, run nothing")
    args = parser.parse_args()
    out = BENCHMARKS / "structured.json"
    if args.table:
        print(render(json.loads(out.read_text())["rows"]), end="")
        return

    import torch

    from compress.data import calibration_batch, load_texts, token_windows
    from compress.models import load_model

    torch.set_num_threads(1)  # the machine's two cores are shared
    model, tokenizer = load_model(MODEL)
    model = model.eval()
    calibration = calibration_batch(
        tokenizer, CALIBRATION["dataset"], CALIBRATION["samples"], CALIBRATION["seq_len"], 0
    )
    texts = load_texts("builtin:wiki", "evaluation")
    windows = token_windows(tokenizer, texts, EVAL_SEQ_LEN, EVAL_WINDOWS)
    rows = load_rows(out, "variant", args.merge)
    meta = {
        "model": MODEL,
        "calibration": CALIBRATION,
        "evaluate": {"dataset": "builtin:wiki", "windows": EVAL_WINDOWS, "seq_len": EVAL_SEQ_LEN},
        "machine": f"{machine()}, {cpu_flags()}, torch threads 1",
        "command": "python " + " ".join(["scripts/bench_structured.py", *sys.argv[1:]]),
        "dtype": str(next(model.parameters()).dtype),
    }
    for name in args.variants:
        print(f"== {name}", flush=True)
        rows[name] = {
            **run_one(name, model, model, calibration, windows),
            "date": datetime.date.today().isoformat(),
        }
        print(json.dumps(rows[name], indent=1, default=str), flush=True)
        write_rows(out, meta, rows, VARIANTS)
    print(render([rows[n] for n in VARIANTS if n in rows]), end="")


if __name__ == "__main__":
    main()
