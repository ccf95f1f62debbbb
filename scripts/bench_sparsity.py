"""Pruning quality on SmolLM2-135M: magnitude, Wanda and SparseGPT at 50% and 2:4 (and 4:8).

Each method runs through the Pipeline API (the same path as ``compress apply``) with the
settings of ``recipes/smollm2-*`` and is scored on 32 windows x 512 tokens of the builtin:wiki
evaluation split against the original model: perplexity, KL(original || pruned), top-1.

    python scripts/bench_sparsity.py                         # all -> benchmarks/sparsity.{json,md}
    python scripts/bench_sparsity.py --methods wanda-2of4 --merge
    python scripts/bench_sparsity.py --table                 # the markdown table of the JSON
    python scripts/bench_sparsity.py --merge --llmc-python /tmp/llmc/venv/bin/python \
        --methods llmc-sparsegpt-50 llmc-wanda-50 llmc-sparsegpt-2of4 llmc-wanda-2of4

``llmc-*`` rows are llm-compressor's ``SparseGPTModifier`` / ``WandaPruningModifier`` in their own
venv (``scripts/peers/llmc_prune.py``), on the same calibration windows, the pruned weights
copied into our model and scored on the same evaluation windows.
"""

from __future__ import annotations

import argparse
import datetime
import json
import resource
import time
from typing import Any

from benchrows import (
    BENCHMARKS,
    load_rows,
    machine,
    run_peer_script,
    score_decoder_weights,
    write_rows,
)

MODEL = "smollm2-135m"
CALIBRATION = {"dataset": "builtin:wiki", "samples": 64, "seq_len": 512, "seed": 0}
EVALUATE = {"perplexity": ["builtin:wiki"], "seq_len": 512, "max_windows": 32, "kl": True}

METHODS: dict[str, dict[str, Any]] = {
    "magnitude-50": {"method": "magnitude", "sparsity": 0.5},
    "wanda-50": {"method": "wanda", "sparsity": 0.5},
    "sparsegpt-50": {"method": "sparsegpt", "sparsity": 0.5},
    "magnitude-2of4": {"method": "magnitude", "pattern": "2:4"},
    "wanda-2of4": {"method": "wanda", "pattern": "2:4"},
    "sparsegpt-2of4": {"method": "sparsegpt", "pattern": "2:4"},
    "magnitude-4of8": {"method": "magnitude", "pattern": "4:8"},
    "wanda-4of8": {"method": "wanda", "pattern": "4:8"},
    "sparsegpt-4of8": {"method": "sparsegpt", "pattern": "4:8"},
    # OWL: per-layer sparsity by outlier ratio (threshold 5x the mean score, +-0.08), mean 50%
    "wanda-50-owl": {"method": "wanda", "sparsity": 0.5, "allocation": "owl"},
    "sparsegpt-50-owl": {"method": "sparsegpt", "sparsity": 0.5, "allocation": "owl"},
    "llmc-sparsegpt-50": {"method": "sparsegpt", "sparsity": 0.5, "peer": "llm-compressor"},
    "llmc-wanda-50": {"method": "wanda", "sparsity": 0.5, "peer": "llm-compressor"},
    "llmc-sparsegpt-2of4": {"method": "sparsegpt", "pattern": "2:4", "peer": "llm-compressor"},
    "llmc-wanda-2of4": {"method": "wanda", "pattern": "2:4", "peer": "llm-compressor"},
}


def run_peer(name: str, python: str) -> dict[str, Any]:
    """llm-compressor's pruning of the same model on the same calibration windows, scored here."""
    from compress.data import calibration_batch
    from compress.models import load_model

    options = METHODS[name]
    start = time.perf_counter()
    _, tokenizer = load_model(MODEL)
    ids = calibration_batch(
        tokenizer, CALIBRATION["dataset"], CALIBRATION["samples"], CALIBRATION["seq_len"], 0
    )
    arguments = ["--method", options["method"], "--sparsity", "0.5"]
    arguments += ["--mask-structure", options.get("pattern", "0:0")]
    weights, measured = run_peer_script(python, "llmc_prune.py", arguments, ids)
    quality = score_decoder_weights(weights, EVALUATE["max_windows"], EVALUATE["seq_len"])
    return {
        "method": name,
        "options": options,
        "sparsity": measured["sparsity"],
        "quality": {"builtin:wiki": quality},
        "timings": {"passes_s": measured["seconds"]},
        "run_seconds": time.perf_counter() - start,
        "peak_rss_mb": measured["peak_rss_mb"],
    }


def run_one(name: str) -> dict[str, Any]:
    from compress.pipeline import Pipeline
    from compress.recipe import parse_recipe

    recipe = parse_recipe(
        {
            "model": MODEL,
            "calibration": CALIBRATION,
            "passes": [{"pass": "prune", **METHODS[name]}],
            "evaluate": EVALUATE,
        },
        source=name,
    )
    start = time.perf_counter()
    result = Pipeline.from_recipe(recipe).run()
    seconds = time.perf_counter() - start
    quality = result.report["quality"]
    entry = quality[0] if isinstance(quality, list) else quality
    prune = result.report["passes"][0]
    return {
        "method": name,
        "options": METHODS[name],
        "sparsity": prune["metrics"]["sparsity"],
        "quality": entry,
        "timings": result.report.get("timings", {}),
        "run_seconds": seconds,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def render(meta: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    """The markdown table of ``rows``."""
    lines = [
        "| tool | method | pattern | sparsity | ppl | KL | top-1 | prune s | run s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        q = next(iter(row["quality"].values()))
        pattern = row["options"].get("pattern", "unstructured")
        method = row["options"]["method"]
        if row["options"].get("allocation", "uniform") != "uniform":
            method += f" ({row['options']['allocation']} allocation)"
        lines.append(
            f"| {row['options'].get('peer', 'compress')} | {method} | "
            f"{pattern} | {row['sparsity']:.3f} | "
            f"{q['perplexity']:.2f} | {q['kl_mean']:.4f} | {100 * q['top1_agreement']:.1f}% | "
            f"{row['timings'].get('passes_s', float('nan')):.0f} | {row['run_seconds']:.0f} |"
        )
    reference = next(iter(rows[0]["quality"].values()))["reference_perplexity"] if rows else None
    if reference is not None:
        lines += ["", f"Original model perplexity on the same windows: {reference:.2f}."]
    kl = {row["method"]: next(iter(row["quality"].values()))["kl_mean"] for row in rows}
    comparisons = []
    for method in ("wanda", "sparsegpt"):
        settings = (("50", [f"{method}-50", f"{method}-50-owl"]), ("2of4", [f"{method}-2of4"]))
        for setting, ours in settings:
            peer = f"llmc-{method}-{setting}"
            run = [name for name in ours if name in kl]
            if peer not in kl or not run:
                continue
            best = min(run, key=kl.__getitem__)
            verdict = "below" if kl[best] < kl[peer] else "not below"
            comparisons.append(
                f"- {method} {setting.replace('of', ':')}: ours ({best}) {kl[best]:.4f}, "
                f"llm-compressor {kl[peer]:.4f}: {verdict} theirs."
            )
    if comparisons:
        lines += ["", "Against llm-compressor at the same setting (KL):", "", *comparisons]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--methods", nargs="*", default=list(METHODS))
    parser.add_argument("--merge", action="store_true", help="keep rows of methods not rerun")
    parser.add_argument(
        "--table", action="store_true", help="print the table of the JSON, run nothing"
    )
    parser.add_argument("--llmc-python", help="python of llm-compressor's venv (llmc-* methods)")
    args = parser.parse_args()
    out = BENCHMARKS / "sparsity.json"
    if args.table:
        saved = json.loads(out.read_text())
        print(render(saved["meta"], saved["rows"]), end="")
        return
    rows = load_rows(out, "method", args.merge)
    for name in args.methods:
        print(f"== {name}", flush=True)
        if METHODS[name].get("peer"):
            if not args.llmc_python:
                raise SystemExit(f"{name} needs --llmc-python (see scripts/peers/llmc_gptq.py)")
            row = run_peer(name, args.llmc_python)
        else:
            row = run_one(name)
        rows[name] = {**row, "date": datetime.date.today().isoformat()}
        print(json.dumps(rows[name], indent=1, default=str), flush=True)
        meta = {"model": MODEL, "calibration": CALIBRATION, "evaluate": EVALUATE}
        meta["machine"] = machine()
        write_rows(out, meta, rows, METHODS)


if __name__ == "__main__":
    main()
