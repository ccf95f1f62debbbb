"""4-bit table formats on SmolLM2-135M: NF4 (bitsandbytes, blocks of 64), MXFP4 and NVFP4, each
by round-to-nearest and by GPTQ onto the format's grid.

Each case runs through the Pipeline API (the same path as ``compress apply``) with the settings
of ``recipes/smollm2-{nf4,mxfp4,nvfp4}-gptq.yaml`` (GPTQ) or the same format under ``rtn``, and
is scored on 32 windows x 512 tokens of the builtin:wiki evaluation split against the original
model: perplexity, KL(original || quantized), top-1 agreement.

    python scripts/bench_fp4.py                        # all -> benchmarks/fp4.{json,md}
    python scripts/bench_fp4.py --cases nf4-gptq --merge
    python scripts/bench_fp4.py --table                # the markdown table of the JSON
"""

from __future__ import annotations

import argparse
import datetime
import json
import resource
import shlex
import sys
import time
from typing import Any

from benchrows import BENCHMARKS, cpu_flags, load_rows, machine, write_rows

MODEL = "smollm2-135m"
CALIBRATION = {"dataset": "builtin:wiki", "samples": 64, "seq_len": 512, "seed": 0}
EVALUATE = {
    "perplexity": ["builtin:wiki"],
    "seq_len": 512,
    "max_windows": 32,
    "kl": True,
    "batch_size": 4,
}
GPTQ = {"act_order": True}

CASES: dict[str, dict[str, Any]] = {
    "nf4-rtn": {"pass": "rtn", "format": "nf4", "scale_block": 64},
    "nf4-gptq": {"pass": "gptq", "format": "nf4", "scale_block": 64, **GPTQ},
    "mxfp4-rtn": {"pass": "rtn", "format": "mxfp4"},
    "mxfp4-gptq": {"pass": "gptq", "format": "mxfp4", **GPTQ},
    "nvfp4-rtn": {"pass": "rtn", "format": "nvfp4"},
    "nvfp4-gptq": {"pass": "gptq", "format": "nvfp4", **GPTQ},
}


def run_one(name: str) -> dict[str, Any]:
    from compress.pipeline import Pipeline
    from compress.recipe import parse_recipe

    entry = CASES[name]
    recipe: dict[str, Any] = {"model": MODEL, "passes": [entry], "evaluate": EVALUATE}
    if entry["pass"] == "gptq":
        recipe["calibration"] = CALIBRATION
    parsed = parse_recipe(recipe, source=name)
    bits = parsed.passes[0].formats()[0].bits_per_weight(576)
    start = time.perf_counter()
    result = Pipeline.from_recipe(parsed).run()
    seconds = time.perf_counter() - start
    quality = result.report["quality"]
    scores = quality[0] if isinstance(quality, list) else quality
    return {
        "case": name,
        "entry": entry,
        "bits_per_weight": bits,
        "quality": scores,
        "pass_metrics": result.report["passes"][0]["metrics"],
        "timings": result.report.get("timings", {}),
        "run_seconds": seconds,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def render(meta: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    """The markdown of ``rows``: the command, the machine, the table."""
    lines = [
        "# 4-bit table formats on SmolLM2-135M: NF4, MXFP4, NVFP4 by RTN and GPTQ",
        "",
        "Commands (`--merge` keeps the rows of cases not rerun):",
        "",
        *(f"    {command}" for command in meta.get("commands", [])),
        "",
        f"Machine: {meta.get('machine', '?')}; CPU flags: {meta.get('cpu_flags', '?')}. "
        "OMP_NUM_THREADS=1; the machine was shared with other jobs, so seconds are inflated and "
        "not comparable between rows (KL, perplexity and top-1 are not affected).",
        "",
        "Settings: every Linear of the 30 decoder layers (embeddings and the tied lm_head kept). "
        f"GPTQ calibration: {meta['calibration']['samples']} windows x "
        f"{meta['calibration']['seq_len']} tokens of builtin:wiki (calibration split), act-order "
        "with static block scales, dampening 0.01. Evaluation: "
        f"{meta['evaluate']['max_windows']} windows x {meta['evaluate']['seq_len']} tokens of "
        "the builtin:wiki evaluation split, KL(original ‖ quantized) in nats/token. Bits per "
        "weight: 4 code bits + the block scale (fp32 absmax per 64 for NF4, E8M0 per 32 for "
        "MXFP4, E4M3 per 16 for NVFP4; NVFP4's one fp32 per tensor left out).",
        "",
        "| case | bits/weight | ppl | KL | top-1 | pass s | run s | date |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        q = next(iter(row["quality"].values()))
        lines.append(
            f"| {row['case']} | {row['bits_per_weight']:.3f} | {q['perplexity']:.2f} | "
            f"{q['kl_mean']:.4f} | {100 * q['top1_agreement']:.1f}% | "
            f"{row['timings'].get('passes_s', float('nan')):.0f} | {row['run_seconds']:.0f} | "
            f"{row.get('date', '')} |"
        )
    reference = next(iter(rows[0]["quality"].values()))["reference_perplexity"] if rows else None
    if reference is not None:
        lines += ["", f"Original model perplexity on the same windows: {reference:.2f}."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cases", nargs="*", default=list(CASES))
    parser.add_argument("--merge", action="store_true", help="keep rows of cases not rerun")
    parser.add_argument("--table", action="store_true", help="write the table of the JSON only")
    args = parser.parse_args()
    out = BENCHMARKS / "fp4.json"
    if args.table:
        saved = json.loads(out.read_text())
        (BENCHMARKS / "fp4.md").write_text(render(saved["meta"], saved["rows"]))
        return
    rows = load_rows(out, "case", args.merge)
    commands: list[str] = []
    if args.merge and out.exists():
        commands = json.loads(out.read_text())["meta"].get("commands", [])
    commands.append(shlex.join(["python", "scripts/bench_fp4.py", *sys.argv[1:]]))
    meta = {
        "model": MODEL,
        "calibration": CALIBRATION,
        "evaluate": EVALUATE,
        "machine": machine(),
        "cpu_flags": cpu_flags(),
        "commands": commands,
    }
    for name in args.cases:
        print(f"== {name}", flush=True)
        rows[name] = {**run_one(name), "date": datetime.date.today().isoformat()}
        print(json.dumps(rows[name], indent=1, default=str), flush=True)
        ordered = write_rows(out, meta, rows, CASES)
        (BENCHMARKS / "fp4.md").write_text(render(meta, ordered))


if __name__ == "__main__":
    main()
