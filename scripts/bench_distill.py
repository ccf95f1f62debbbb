"""Distillation on SmolLM2-135M: KL to the original before and after the ``distill`` pass.

For each recipe, the passes before ``distill`` run once (as ``compress apply`` runs them), the
student is scored on 32 windows x 512 tokens of the builtin:wiki evaluation split against the
original model, then ``distill`` trains it and it is scored again on the same windows. Wall
time and process CPU time of the distillation are recorded (this machine: 2 cores).

    python scripts/bench_distill.py                      # all -> benchmarks/distill.{json,md}
    python scripts/bench_distill.py --cases w3-gptq --merge
    python scripts/bench_distill.py --table              # the markdown of the JSON
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import time
from pathlib import Path
from typing import Any

from benchrows import BENCHMARKS, cpu_flags, load_rows, machine, write_rows

ROOT = Path(__file__).resolve().parent.parent
CASES = {
    "prune25": ROOT / "recipes" / "smollm2-prune25-distill.yaml",
    "drop8": ROOT / "recipes" / "smollm2-drop8-distill.yaml",
    "2of4": ROOT / "recipes" / "smollm2-2of4-distill.yaml",
    "w3-gptq": ROOT / "recipes" / "smollm2-w3-gptq-distill.yaml",
}
EVAL_WINDOWS = 32
SEQ_LEN = 512


def _cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


def _quality(metrics: Any) -> dict[str, float]:
    return {
        "kl": float(metrics.kl_mean),
        "top1": float(metrics.top1_agreement),
        "perplexity": float(metrics.perplexity),
        "reference_perplexity": float(metrics.reference_perplexity),
    }


def run_case(name: str) -> dict[str, Any]:
    import copy

    from compress.cli import RichProgress
    from compress.data import calibration_batch, load_texts, token_windows
    from compress.evaluate.quality import compare_to_reference
    from compress.models import load_model
    from compress.recipe import load_recipe
    from compress.registry import PassContext, config_for

    recipe = load_recipe(CASES[name])
    names = [config_for(c).name for c in recipe.passes]
    cut = names.index("distill")
    before_passes, distill_config = recipe.passes[:cut], recipe.passes[cut]
    model, tokenizer = load_model(recipe.model.name, dtype=recipe.model.dtype)
    reference = copy.deepcopy(model)
    windows = token_windows(
        tokenizer, load_texts("builtin:wiki", "evaluation"), SEQ_LEN, EVAL_WINDOWS
    )
    with RichProgress() as progress:
        context = PassContext(
            progress=progress, tokenizer=tokenizer, teacher_loader=lambda: reference
        )
        if any(config_for(c).calibrated for c in before_passes):
            spec = recipe.calibration
            context.calibration = calibration_batch(
                tokenizer, spec.dataset, spec.samples, spec.seq_len, spec.seed
            )
            context.calibration_source = spec.dataset
        start = time.perf_counter()
        for config in before_passes:
            config_for(config).fn(model, config, context)
        passes_seconds = time.perf_counter() - start
        parameters = sum(p.numel() for p in model.parameters())
        before = compare_to_reference(model, reference, windows, progress=progress)
        wall, cpu = time.perf_counter(), _cpu_seconds()
        report = config_for(distill_config).fn(model, distill_config, context)
        wall, cpu = time.perf_counter() - wall, _cpu_seconds() - cpu
        after = compare_to_reference(model, reference, windows, progress=progress)
    return {
        "case": name,
        "recipe": str(CASES[name].relative_to(ROOT)),
        "passes": [
            c.model_dump(mode="json") | {"pass": n}
            for c, n in zip(recipe.passes, names, strict=True)
        ],
        "parameters": parameters,
        "reference_parameters": sum(p.numel() for p in reference.parameters()),
        "before": _quality(before),
        "after": _quality(after),
        "prefix_seconds": passes_seconds,
        "distill_wall_seconds": wall,
        "distill_cpu_seconds": cpu,
        "distill": report.to_dict(),
    }


def render(meta: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    lines = [
        "| case | params | KL before | KL after | after/before | top-1 before → after | "
        "ppl before → after | tokens | steps | wall min | CPU min |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        b, a, m = row["before"], row["after"], row["distill"]["metrics"]
        lines.append(
            f"| {row['case']} | {row['parameters'] / 1e6:.1f}M of "
            f"{row['reference_parameters'] / 1e6:.1f}M | {b['kl']:.3f} | {a['kl']:.3f} | "
            f"{a['kl'] / b['kl']:.2f} | {100 * b['top1']:.1f}% → {100 * a['top1']:.1f}% | "
            f"{b['perplexity']:.2f} → {a['perplexity']:.2f} | {m['tokens']:,.0f} | "
            f"{m['steps']:.0f} | {row['distill_wall_seconds'] / 60:.1f} | "
            f"{row['distill_cpu_seconds'] / 60:.1f} |"
        )
    if rows:
        reference = rows[0]["before"]["reference_perplexity"]
        lines += [
            "",
            f"Original perplexity on the same windows: {reference:.2f}.",
            f"Machine: {meta['machine']}.",
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    parser.add_argument("--merge", action="store_true", help="keep rows of cases not rerun")
    parser.add_argument("--table", action="store_true", help="print the table of the JSON")
    args = parser.parse_args()
    out = BENCHMARKS / "distill.json"
    if args.table:
        saved = json.loads(out.read_text())
        print(render(saved["meta"], saved["rows"]), end="")
        return
    rows = load_rows(out, "case", args.merge)
    for name in args.cases:
        print(f"== {name}", flush=True)
        rows[name] = {**run_case(name), "date": datetime.date.today().isoformat()}
        meta = {
            "eval": f"builtin:wiki evaluation, {EVAL_WINDOWS} x {SEQ_LEN}",
            "machine": f"{machine()} ({cpu_flags()})",
        }
        ordered = write_rows(out, meta, rows, CASES)
        print(render(meta, ordered), flush=True)


if __name__ == "__main__":
    main()
