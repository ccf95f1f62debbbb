"""What rotation buys before weight quantization on SmolLM2-135M, and what the online transform
costs at decode time.

``--quality`` rotates the model three ways (none; ``rotate``: residual stream and values fused
into the weights; ``rotate`` with ``online_down``: also the Hadamard transform of every
down_proj input, run online) and quantizes each with RTN and GPTQ at 4, 3 and 2 bits (group 64;
4-bit symmetric as the rotation issue's acceptance asks, 3 and 2 bits asymmetric as the shipped
recipes). Calibration: 128 windows x 512 tokens of the builtin:wiki calibration split (GPTQ, act
order, MSE group scales; RTN uses the same MSE observer). KL and top-1 against the original on
32 windows x 512 tokens of the evaluation split. Rows are written after every case.

    python scripts/bench_rotation.py --quality                 # -> benchmarks/rotation.json
    python scripts/bench_rotation.py --quality --methods rtn --merge
    python scripts/bench_rotation.py --table
    python scripts/bench_rotation.py --speed out/smollm2-w4-rotate-gptq

``--speed`` loads an export with an online transform and times greedy decoding of 64 tokens on
one thread with the transform and with it removed (the same packed weights: the difference is
the transform alone), alternating, five times each; medians go to
``benchmarks/rotation_speed.json``.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import statistics
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from benchrows import (
    BENCHMARKS,
    cpu_flags,
    load_rows,
    machine,
    save_keyed,
    smollm2_and_eval_windows,
    write_rows,
)

EVAL_WINDOWS = 32
SEQ_LEN = 512
CALIBRATION = 128
ROTATIONS = {
    "none": None,
    "rotate": {"method": "hadamard", "seed": 0},
    "rotate+online": {"method": "hadamard", "seed": 0, "online_down": True},
}
METHODS = ("rtn", "gptq")
BITS = (4, 3, 2)


def _format(bits: int) -> dict[str, Any]:
    return {"bits": bits, "group_size": 64, "symmetric": bits == 4, "observer": "mse"}


def case_name(method: str, bits: int, rotation: str) -> str:
    return f"{method}-w{bits}/{rotation}"


def run_quality(
    methods: list[str], bits: list[int], rotations: list[str]
) -> Iterator[dict[str, Any]]:
    """One row per (rotation, method, bits), as each finishes."""
    import torch

    from compress.cli import RichProgress
    from compress.data import calibration_batch
    from compress.evaluate.quality import compare_to_reference
    from compress.quant.gptq import GPTQConfig
    from compress.quant.rotate import RotateConfig, rotate
    from compress.quant.rtn import RTNConfig
    from compress.registry import PassContext, config_for

    torch.manual_seed(0)
    original, tokenizer, windows = smollm2_and_eval_windows(EVAL_WINDOWS, SEQ_LEN)
    with RichProgress() as progress:
        context = PassContext(progress=progress, tokenizer=tokenizer)
        context.calibration = calibration_batch(tokenizer, "builtin:wiki", CALIBRATION, SEQ_LEN, 0)
        context.calibration_source = "builtin:wiki"
        for rotation in rotations:
            base = copy.deepcopy(original)
            if ROTATIONS[rotation] is not None:
                rotate(base, RotateConfig.model_validate(ROTATIONS[rotation]), context)
            for method in methods:
                for width in bits:
                    student = copy.deepcopy(base)
                    config: Any = (
                        GPTQConfig(**_format(width), act_order=True)
                        if method == "gptq"
                        else RTNConfig(**_format(width))
                    )
                    start = time.perf_counter()
                    config_for(config).fn(student, config, context)
                    seconds = time.perf_counter() - start
                    metrics = compare_to_reference(student, original, windows, progress=progress)
                    row = {
                        "case": case_name(method, width, rotation),
                        "method": method,
                        "bits": width,
                        "symmetric": width == 4,
                        "rotation": rotation,
                        "kl": float(metrics.kl_mean),
                        "top1": float(metrics.top1_agreement),
                        "quantize_seconds": seconds,
                    }
                    print(json.dumps(row), flush=True)
                    yield row
                    del student


def measure_speed(export: str, tokens: int = 64, repeats: int = 5) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import compress  # noqa: F401  (registers the loader)
    from compress.utils.hadamard import ONLINE_HADAMARD_KEY, install_online_hadamards

    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(export)
    prompt = tokenizer("The history of the city begins", return_tensors="pt")
    model = AutoModelForCausalLM.from_pretrained(export).eval()
    names = list(getattr(model.config, ONLINE_HADAMARD_KEY, {}).get("modules", []))
    if not names:
        raise SystemExit(f"{export}: its config lists no online transform ({ONLINE_HADAMARD_KEY})")

    def set_transform(on: bool) -> None:
        if on:
            install_online_hadamards(model)
        else:
            for name in names:
                model.get_submodule(name)._forward_pre_hooks.clear()

    times: dict[str, list[float]] = {"with transform": [], "without": []}
    with torch.inference_mode():
        model.generate(**prompt, max_new_tokens=4, do_sample=False)  # warm-up
        for _ in range(repeats):
            for name in times:
                set_transform(name == "with transform")
                start = time.perf_counter()
                model.generate(
                    **prompt, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False
                )
                times[name].append(time.perf_counter() - start)
    rates = {name: tokens / statistics.median(t) for name, t in times.items()}
    return {
        "export": export,
        "transformed_modules": len(names),
        "tokens_per_s": rates,
        "ratio": rates["with transform"] / rates["without"],
        "threads": 1,
        "machine": f"{machine()} ({cpu_flags()})",
        "date": datetime.date.today().isoformat(),
    }


def render(meta: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    by_case = {row["case"]: row for row in rows}
    lines = [
        "| method | bits | none: KL (top-1) | rotate | rotate+online | best vs none |",
        "|---|---|---|---|---|---|",
    ]
    for method in METHODS:
        for bits in BITS:
            cells = [by_case.get(case_name(method, bits, r)) for r in ROTATIONS]
            if not any(cells):
                continue
            text = [f"{c['kl']:.4f} ({100 * c['top1']:.1f}%)" if c else "-" for c in cells]
            change = "-"
            if cells[0] and any(cells[1:]):
                best = min(c["kl"] for c in cells[1:] if c)
                change = f"{100 * (best / cells[0]['kl'] - 1):+.0f}%"
            kind = "sym" if bits == 4 else "asym"
            lines.append(
                f"| {method} | int{bits} g64 {kind} | " + " | ".join(text) + f" | {change} |"
            )
    lines += ["", f"Machine: {meta['machine']}; {meta['date']}."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quality", action="store_true", help="rotation x method x bits")
    parser.add_argument("--methods", nargs="*", default=list(METHODS), choices=METHODS)
    parser.add_argument("--bits", nargs="*", type=int, default=list(BITS), choices=BITS)
    parser.add_argument("--rotations", nargs="*", default=list(ROTATIONS), choices=list(ROTATIONS))
    parser.add_argument("--merge", action="store_true", help="keep the other saved rows")
    parser.add_argument("--table", action="store_true", help="print the table of the JSON")
    parser.add_argument("--speed", metavar="EXPORT", help="decode speed of the online transform")
    args = parser.parse_args()
    if args.speed:
        speeds = BENCHMARKS / "rotation_speed.json"
        save_keyed(speeds, Path(args.speed).name, measure_speed(args.speed))
        return
    out = BENCHMARKS / "rotation.json"
    if args.table:
        saved = json.loads(out.read_text())
        print(render(saved["meta"], saved["rows"]), end="")
        return
    if not args.quality:
        parser.error("one of --quality, --table, --speed")
    rows = load_rows(out, "case", args.merge)
    meta = {
        "machine": f"{machine()} ({cpu_flags()})",
        "date": datetime.date.today().isoformat(),
        "calibration": f"{CALIBRATION} x {SEQ_LEN}",
        "evaluation": f"{EVAL_WINDOWS} x {SEQ_LEN}",
    }
    order = [case_name(m, b, r) for r in ROTATIONS for m in METHODS for b in BITS]
    for row in run_quality(args.methods, args.bits, args.rotations):
        rows[row["case"]] = {**row, "date": meta["date"]}
        write_rows(out, meta, rows, order)  # after every case: an interrupted run keeps its rows
    print(render(meta, write_rows(out, meta, rows, order)), end="")


if __name__ == "__main__":
    main()
