"""4-bit table formats on SmolLM2-135M: NF4 (bitsandbytes, blocks of 64), MXFP4 and NVFP4, each
by round-to-nearest and by GPTQ onto the format's grid.

Each case runs through the Pipeline API (the same path as ``compress apply``) with the settings
of ``recipes/smollm2-{nf4,mxfp4,nvfp4}-gptq.yaml`` (GPTQ) or the same format under ``rtn``, and
is scored on 32 windows x 512 tokens of the builtin:wiki evaluation split against the original
model: perplexity, KL(original || quantized), top-1 agreement.

    python scripts/bench_fp4.py                        # all -> benchmarks/fp4.{json,md}
    python scripts/bench_fp4.py --cases nf4-gptq --merge
    python scripts/bench_fp4.py --table                # the markdown table of the JSON
    python scripts/bench_fp4.py --speed                # + batch-1 GEMV at 4096^2, one thread

``--speed`` times one activation row against a 4096 x 4096 weight, one thread: the bf16
``F.linear`` of the dense weight beside each variant's kernels (:mod:`compress.formats.fp4.kernels`)
in the same run, and stores the milliseconds in the JSON's ``meta.speed``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import resource
import shlex
import sys
import time
from collections.abc import Callable
from functools import partial
from typing import Any

from benchrows import (
    BENCHMARKS,
    add_dtype_argument,
    cpu_flags,
    load_rows,
    machine,
    run_peer_script,
    score_decoder_weights,
    write_rows,
)

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
    # observer: mse: each block's scale searched for the least rounding error
    "nf4-rtn-mse": {"pass": "rtn", "format": "nf4", "scale_block": 64, "observer": "mse"},
    "nf4-gptq-mse": {
        "pass": "gptq",
        "format": "nf4",
        "scale_block": 64,
        "observer": "mse",
        **GPTQ,
    },
    "mxfp4-rtn-mse": {"pass": "rtn", "format": "mxfp4", "observer": "mse"},
    "mxfp4-gptq-mse": {"pass": "gptq", "format": "mxfp4", "observer": "mse", **GPTQ},
    "nvfp4-rtn-mse": {"pass": "rtn", "format": "nvfp4", "observer": "mse"},
    "nvfp4-gptq-mse": {"pass": "gptq", "format": "nvfp4", "observer": "mse", **GPTQ},
    # AWQ's column scaling searched on the NF4 grid, then the GPTQ above
    "nf4-awq-gptq-mse": {
        "passes": [
            {"pass": "awq", "format": "nf4", "scale_block": 64},
            {"pass": "gptq", "format": "nf4", "scale_block": 64, "observer": "mse", **GPTQ},
        ]
    },
}
# Peers, each scored on the same windows: bitsandbytes' own 4-bit quantizer (what
# `BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=...)` does to a bf16 checkpoint),
# and llm-compressor's round-to-nearest presets in its own venv (scripts/peers/llmc_scheme.py).
PEERS: dict[str, dict[str, Any]] = {
    "bnb-nf4": {"peer": "bitsandbytes", "format": "nf4", "scale_block": 64},
    "llmc-nvfp4": {"peer": "llm-compressor", "format": "nvfp4", "scheme": "NVFP4A16"},
    "llmc-mxfp4": {"peer": "llm-compressor", "format": "mxfp4", "scheme": "MXFP4A16"},
}


def bnb_weights(block: int, quant_type: str) -> dict[str, Any]:
    """Every decoder Linear of SmolLM2 through bitsandbytes' quantize_4bit / dequantize_4bit."""
    import torch
    from bitsandbytes import functional as bnbf

    from compress.models import load_model

    model, _ = load_model(MODEL)
    weights = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in name:
            packed, state = bnbf.quantize_4bit(
                module.weight.data, blocksize=block, quant_type=quant_type
            )
            weights[f"{name}.weight"] = bnbf.dequantize_4bit(packed, state)
    return weights


def run_peer(name: str, llmc_python: str | None, dtype: str) -> dict[str, Any]:
    """A peer's weights, scored like our cases."""
    from compress.data import calibration_batch
    from compress.formats.fp4 import FP4Format
    from compress.models import load_model

    entry = PEERS[name]
    start = time.perf_counter()
    measured: dict[str, Any] = {}
    if entry["peer"] == "bitsandbytes":
        weights = bnb_weights(entry["scale_block"], entry["format"])
        measured["seconds"] = time.perf_counter() - start
    else:
        if not llmc_python:
            raise SystemExit(f"{name} needs --llmc-python (see scripts/peers/llmc_gptq.py)")
        _, tokenizer = load_model(MODEL)
        ids = calibration_batch(
            tokenizer, CALIBRATION["dataset"], CALIBRATION["samples"], CALIBRATION["seq_len"], 0
        )
        options = ["--scheme", entry["scheme"]]
        weights, measured = run_peer_script(llmc_python, "llmc_scheme.py", options, ids)
    quality = score_decoder_weights(weights, EVALUATE["max_windows"], EVALUATE["seq_len"], dtype)
    return {
        "case": name,
        "entry": entry,
        "bits_per_weight": FP4Format(entry["format"], entry.get("scale_block")).bits_per_weight(
            576
        ),
        "quality": {"builtin:wiki": quality},
        "timings": {"passes_s": measured["seconds"]},
        "run_seconds": time.perf_counter() - start,
        "peak_rss_mb": measured.get(
            "peak_rss_mb", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        ),
    }


def run_one(name: str, dtype: str) -> dict[str, Any]:
    from compress.formats.fp4 import FP4Format
    from compress.pipeline import Pipeline
    from compress.recipe import parse_recipe

    entry = CASES[name]
    passes = entry.get("passes", [entry])
    model = {"name": MODEL, "dtype": dtype}
    recipe: dict[str, Any] = {"model": model, "passes": passes, "evaluate": EVALUATE}
    if any(step["pass"] != "rtn" for step in passes):
        recipe["calibration"] = CALIBRATION
    parsed = parse_recipe(recipe, source=name)
    last = passes[-1]
    bits = FP4Format(last["format"], last.get("scale_block")).bits_per_weight(576)
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
        "pass_metrics": result.report["passes"][-1]["metrics"],
        "timings": result.report.get("timings", {}),
        "run_seconds": seconds,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def timed(fn: Callable[[], object], repeats: int) -> float:
    """Milliseconds per call, after one warm-up call."""
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats * 1e3


def measure_speed(size: int = 4096, repeats: int = 5) -> dict[str, Any]:
    """Batch-1 GEMV milliseconds: bf16 dense against every variant's kernels, one thread."""
    import torch
    import torch.nn.functional as F

    from compress.formats.fp4 import FP4Format, quantize_fp4
    from compress.formats.fp4 import cpu as fp4_cpu
    from compress.formats.fp4 import kernels as fp4_kernels
    from compress.formats.fp4.packed import pack_fp4_codes
    from compress.formats.fp4.table import PackedTable

    torch.set_num_threads(1)
    weight = torch.randn(size, size, generator=torch.Generator().manual_seed(0)) * 0.02
    x = torch.randn(1, size, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    dense = weight.to(torch.bfloat16)
    ms: dict[str, float] = {"bf16 F.linear": timed(lambda: F.linear(x, dense), repeats)}
    for variant in ("nf4", "mxfp4", "nvfp4"):
        fmt = FP4Format(variant)
        codes, scales, tensor_scale = quantize_fp4(weight, fmt)
        packed = PackedTable(pack_fp4_codes(codes), scales, tensor_scale, None, fmt, size)
        for name in ("reference", "cpu_tiled", "cpu_gemv"):  # the CPU's kernels
            kernel = fp4_kernels.KERNELS[name]

            def call(k: fp4_kernels.Kernel = kernel, p: PackedTable = packed) -> object:
                return k(x, p)

            ms[f"{variant} {name}"] = timed(call, repeats)
        if fp4_cpu.native() is not None:
            ms[f"{variant} cpu_gemv fp32"] = timed(
                partial(fp4_cpu.gemv, x, packed, int16_acts=False), repeats
            )
    return {"size": size, "threads": 1, "activation": "bfloat16", "rows": 1, "ms": ms}


def peer_notes(kl: dict[str, float]) -> list[str]:
    """Our best case of each format against its peer, as the issue's targets put it."""
    notes = []
    ours = {
        "nf4": ["nf4-gptq", "nf4-gptq-mse", "nf4-awq-gptq-mse"],
        "nvfp4": ["nvfp4-gptq", "nvfp4-gptq-mse"],
        "mxfp4": ["mxfp4-gptq", "mxfp4-gptq-mse"],
    }
    for peer, fmt, target in (
        ("bnb-nf4", "nf4", "≤ 0.5"),
        ("llmc-nvfp4", "nvfp4", "< 1"),
        ("llmc-mxfp4", "mxfp4", None),
    ):
        run = [case for case in ours[fmt] if case in kl]
        if peer not in kl or not run:
            notes.append(f"- Peer {peer} or our {fmt} GPTQ cases not run: not compared.")
            continue
        best = min(run, key=kl.__getitem__)
        ratio = kl[best] / kl[peer]
        verdict = ""
        if target is not None:
            met = ratio <= 0.5 if target == "≤ 0.5" else ratio < 1.0
            verdict = f" (issue target {target}: {'met' if met else 'not met'})"
        notes.append(
            f"- {peer} KL {kl[peer]:.4f}; our best {fmt} ({best}) {kl[best]:.4f} = "
            f"{ratio:.2f} of it{verdict}."
        )
        rounded = [case for case in (f"{fmt}-rtn", f"{fmt}-rtn-mse") if case in kl]
        if rounded:  # the peers round to nearest: like against like
            nearest = min(rounded, key=kl.__getitem__)
            relation = "below" if kl[nearest] < kl[peer] else "above"
            notes.append(
                f"  Round-to-nearest against it: our best ({nearest}) {kl[nearest]:.4f}, "
                f"{relation} the peer's."
            )
    return notes


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
        "with static block scales, dampening 0.01; `-mse` rows search each block's scale "
        "(ratios 0.7-1.3 of its absmax) for the least rounding error. Evaluation: "
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
    here = meta.get("machine")
    elsewhere: dict[str, list[str]] = {}
    for row in rows:
        if row.get("machine", here) != here:
            elsewhere.setdefault(row["machine"], []).append(row["case"])
    if elsewhere:
        lines += [
            "",
            "Rows run on another machine (KL is comparable; seconds are not): "
            + "; ".join(f"{', '.join(cases)} on {where}" for where, cases in elsewhere.items())
            + ".",
        ]
    in_float32 = [row["case"] for row in rows if row.get("dtype") == "float32"]
    if in_float32:
        lines += [
            "",
            "Rows scored with the model in float32 (`--dtype float32`; the others in its "
            f"published bf16): {', '.join(in_float32)}.",
        ]
    kl = {row["case"]: next(iter(row["quality"].values()))["kl_mean"] for row in rows}

    def pair(a: str, b: str) -> str:
        return f"{kl[a]:.3f} -> {kl[b]:.3f}" if a in kl and b in kl else "not run"

    lines += [
        "",
        "Notes:",
        "",
        "- GPTQ onto each grid against round-to-nearest (minmax scales, KL): NF4 "
        f"{pair('nf4-rtn', 'nf4-gptq')}, MXFP4 {pair('mxfp4-rtn', 'mxfp4-gptq')}, NVFP4 "
        f"{pair('nvfp4-rtn', 'nvfp4-gptq')}. MSE-searched block scales (`-mse`), RTN -> GPTQ: "
        f"NF4 {pair('nf4-rtn-mse', 'nf4-gptq-mse')}, MXFP4 "
        f"{pair('mxfp4-rtn-mse', 'mxfp4-gptq-mse')}, NVFP4 "
        f"{pair('nvfp4-rtn-mse', 'nvfp4-gptq-mse')}. The search minimises each block's weight "
        "error, which is not the output error: it lowers KL for RTN on MXFP4 and NVFP4 but "
        "raises it for NF4; after GPTQ it helps NF4 and NVFP4 and not MXFP4, whose "
        "power-of-two scales leave it little to choose.",
        *peer_notes(kl),
        "- The builtin SmolLM2 weights went through GGUF Q4_1 (blocks of 32, asymmetric) before "
        "we got them, which favours formats like it; compare these rows with each other.",
    ]
    speed = meta.get("speed")
    if speed:
        bf16 = speed["ms"]["bf16 F.linear"]
        lines += [
            "",
            f"## Batch-1 GEMV, {speed['size']}x{speed['size']} weight, one thread, "
            f"{speed['activation']} activations",
            "",
            f"Command: `{speed['command']}`. Ratios are against the bf16 dense GEMV of the same "
            "run (above 1: slower than bf16). `reference` and `cpu_tiled` decode the codes with "
            "torch ops into a dense weight (whole, or a slab of rows at a time) and multiply it; "
            "`cpu_gemv` is the native fused kernel, what decode rows take: for bf16 rows it "
            "rounds the activations to int16 per 64 columns and runs integer multiply-adds "
            "against int16 table values (E2M1 doubled exactly, NF4 in 1/4096 steps of its "
            "largest); `cpu_gemv fp32` is its other path (fp32 table values, products and "
            "sums), which fp32 rows and layouts without whole 64-column steps take. "
            f"Machine: {speed.get('machine', '?')}; CPU flags: {speed.get('cpu_flags', '?')}.",
            "",
            "| kernel | ms | x bf16 time |",
            "|---|---|---|",
            *(f"| {name} | {ms:.1f} | {ms / bf16:.1f} |" for name, ms in speed["ms"].items()),
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cases", nargs="*", default=list(CASES), choices=[*CASES, *PEERS])
    parser.add_argument("--llmc-python", help="python of llm-compressor's venv (llmc-* peers)")
    parser.add_argument("--merge", action="store_true", help="keep rows of cases not rerun")
    add_dtype_argument(parser)
    parser.add_argument("--table", action="store_true", help="write the table of the JSON only")
    parser.add_argument(
        "--speed", action="store_true", help="time the kernels (kept in the JSON), run no case"
    )
    args = parser.parse_args()
    out = BENCHMARKS / "fp4.json"
    command = shlex.join(["python", "scripts/bench_fp4.py", *sys.argv[1:]])
    saved = json.loads(out.read_text()) if out.exists() else None
    if args.table or args.speed:
        if saved is None:
            raise SystemExit(f"{out} does not exist yet: run the cases first")
        if args.speed:
            saved["meta"]["speed"] = {**measure_speed(), "command": command}
            saved["meta"]["speed"]["machine"] = machine()
            saved["meta"]["speed"]["cpu_flags"] = cpu_flags()
            out.write_text(json.dumps(saved, indent=1, default=str) + "\n")
        (BENCHMARKS / "fp4.md").write_text(render(saved["meta"], saved["rows"]))
        return
    rows = load_rows(out, "case", args.merge)
    commands: list[str] = []
    if args.merge and saved is not None:
        commands = saved["meta"].get("commands", [])
    commands.append(command)
    meta = {
        "model": MODEL,
        "calibration": CALIBRATION,
        "evaluate": EVALUATE,
        "machine": machine(),
        "cpu_flags": cpu_flags(),
        "commands": commands,
    }
    if args.merge and saved is not None and "speed" in saved["meta"]:
        meta["speed"] = saved["meta"]["speed"]
    if args.merge and saved is not None:  # kept rows name the machine that ran them
        for kept in rows.values():
            kept.setdefault("machine", saved["meta"].get("machine"))
    for name in args.cases:
        print(f"== {name}", flush=True)
        row = (
            run_peer(name, args.llmc_python, args.dtype)
            if name in PEERS
            else run_one(name, args.dtype)
        )
        today = datetime.date.today().isoformat()
        rows[name] = {**row, "machine": machine(), "date": today, "dtype": args.dtype}
        print(json.dumps(rows[name], indent=1, default=str), flush=True)
        ordered = write_rows(out, meta, rows, [*CASES, *PEERS])
        (BENCHMARKS / "fp4.md").write_text(render(meta, ordered))


if __name__ == "__main__":
    main()
