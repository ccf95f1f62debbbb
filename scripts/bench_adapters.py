"""Error-correcting adapters on SmolLM2-135M: QWHA against LoRA on the same quantized base.

GPTQ runs once per bit width; every variant then starts from a copy of that quantized model:
the adapters' training-free initialisations (``lora_correct``: EoRA's activation-weighted SVD;
``qwha``: adaptive coefficient selection with value refinement), then the same ``distill`` budget
training the adapters alone (``train: ["*.adapter_*"]``), at the same number of trainable
parameters (QWHA keeps rank·(in+out) coefficients per Linear, a rank-r LoRA's count). KL and
top-1 against the original on 32 windows x 512 tokens of the builtin:wiki evaluation split.

    python scripts/bench_adapters.py --bits 3          # -> benchmarks/adapters.json, a table
    python scripts/bench_adapters.py --bits 2 --merge
    python scripts/bench_adapters.py --table
    python scripts/bench_adapters.py --speed out/smollm2-w3-qwha   # decode overhead of an export

``--speed`` loads an export twice, with its adapter (as ``from_pretrained`` applies it) and
without (``compress_adapter=None``), and times greedy decoding of 64 tokens on one thread,
interleaved (the order flipped every repeat), 15 times each; the medians, their spread, the
adapter's method and trained parameters, the load average and the machine go to the ``speed``
entry of ``benchmarks/adapters.json``, keyed by the export's folder name.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import time
from pathlib import Path
from typing import Any

from benchrows import (
    BENCHMARKS,
    add_dtype_argument,
    cpu_flags,
    load_rows,
    machine,
    smollm2_and_eval_windows,
    write_rows,
)

EVAL_WINDOWS = 32
SEQ_LEN = 512
RANK = 8
DISTILL = {
    "samples": 512,
    "held_out": 8,
    "steps": 32,
    "gradient_accumulation": 4,
    "warmup_steps": 2,
    "eval_every": 16,
    "mixed_precision": "bf16",
    "train": ["*.adapter_*"],
}
VARIANTS = {
    "gptq": None,
    "lora-eora": ("lora_correct", {}),
    "qwha": ("qwha", {}),
    "lora-eora+distill": ("lora_correct", {}),
    "qwha+distill": ("qwha", {}),
}


def _quality(metrics: Any) -> dict[str, float]:
    return {"kl": float(metrics.kl_mean), "top1": float(metrics.top1_agreement)}


def run_bits(
    bits: int, variants: list[str], adapter_lr: float, steps: int, dtype: str
) -> list[dict[str, Any]]:
    from compress.adapters.runtime import adapter_hooks
    from compress.cli import RichProgress
    from compress.data import calibration_batch
    from compress.distill.distill import DistillConfig
    from compress.evaluate.quality import compare_to_reference
    from compress.quant.correct import LoraCorrectConfig, QWHAPassConfig
    from compress.quant.gptq import GPTQConfig
    from compress.registry import PassContext, config_for

    model, tokenizer, windows = smollm2_and_eval_windows(EVAL_WINDOWS, SEQ_LEN, dtype)
    reference = copy.deepcopy(model)
    rows = []
    with RichProgress() as progress:
        context = PassContext(
            progress=progress, tokenizer=tokenizer, teacher_loader=lambda: reference
        )
        context.calibration = calibration_batch(tokenizer, "builtin:wiki", 64, 512, 0)
        context.calibration_source = "builtin:wiki"
        gptq = GPTQConfig(bits=bits, group_size=64, symmetric=False, act_order=True, observer="mse")
        config_for(gptq).fn(model, gptq, context)
        initialised: dict[str, tuple[Any, dict[str, Any], float]] = {}  # pass -> model, row
        for variant in variants:
            spec = VARIANTS[variant]
            row: dict[str, Any] = {"case": f"w{bits}/{variant}", "bits": bits, "variant": variant}
            start = time.perf_counter()
            if spec is None:
                student = copy.deepcopy(model)
            else:
                name, extra = spec
                if name not in initialised:  # one initialisation, shared by its +distill row
                    student = copy.deepcopy(model)
                    cls = LoraCorrectConfig if name == "lora_correct" else QWHAPassConfig
                    config = cls(rank=RANK, **extra)
                    report = config_for(config).fn(student, config, context)
                    init = {
                        "trainable_params": report.metrics["trainable_params"],
                        "init_error_ratio": report.metrics["mean_error_ratio"],
                    }
                    initialised[name] = (student, init, time.perf_counter() - start)
                initial, init, seconds = initialised[name]
                student = copy.deepcopy(initial)
                row |= init
                start -= seconds  # the row's time includes its initialisation
            if variant.endswith("+distill"):
                distill = DistillConfig(**{**DISTILL, "steps": steps}, adapter_lr=adapter_lr)
                report = config_for(distill).fn(student, distill, context)
                row["distill"] = {k: float(v) for k, v in report.metrics.items()}
            row["seconds"] = time.perf_counter() - start
            with adapter_hooks() as hooks:
                hooks.attach_all(student)
                row |= _quality(
                    compare_to_reference(student, reference, windows, progress=progress)
                )
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def measure_speed(
    export: str, tokens: int = 64, repeats: int = 15, threads: int = 1
) -> dict[str, Any]:
    import os
    import statistics

    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import compress  # noqa: F401  (registers the loader)

    torch.set_num_threads(threads)
    load = os.getloadavg()[0]
    tokenizer = AutoTokenizer.from_pretrained(export)
    prompt = tokenizer("The history of the city begins", return_tensors="pt")
    models = {
        "with adapter": AutoModelForCausalLM.from_pretrained(export).eval(),
        "without": AutoModelForCausalLM.from_pretrained(export, compress_adapter=None).eval(),
    }
    adapter = models["with adapter"].config.compress_adapter
    weights = Path(export) / adapter["dir"] / "adapter_model.safetensors"
    # the trained numbers (LoRA's A and B, QWHA's values), not QWHA's integer indices and counts
    params = sum(t.numel() for t in load_file(weights).values() if t.is_floating_point())
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.inference_mode():
        for model in models.values():  # warm-up: kernels built, caches touched
            model.generate(**prompt, max_new_tokens=4, do_sample=False)
        for repeat in range(repeats):  # interleaved, the order flipped every repeat
            for name in list(models)[:: 1 if repeat % 2 else -1]:
                start = time.perf_counter()
                out = models[name].generate(
                    **prompt, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False
                )
                times[name].append(time.perf_counter() - start)
                assert out.shape[1] - prompt["input_ids"].shape[1] == tokens
    rates = {name: [tokens / t for t in ts] for name, ts in times.items()}
    medians = {name: statistics.median(r) for name, r in rates.items()}
    paired = [a / b for a, b in zip(rates["with adapter"], rates["without"], strict=True)]
    kernels = {str(m.kernel) for m in models["without"].modules() if hasattr(m, "kernel")}
    return {
        "export": export,
        "adapter": {**adapter, "params": params, "bytes": weights.stat().st_size},
        "tokens": tokens,
        "repeats": repeats,
        "tokens_per_s": medians,
        "tokens_per_s_range": {name: [min(r), max(r)] for name, r in rates.items()},
        "ratio": medians["with adapter"] / medians["without"],
        "paired_ratio": {"median": statistics.median(paired), "range": [min(paired), max(paired)]},
        "threads": threads,
        "kernels": sorted(kernels),
        "load_average": [load, os.getloadavg()[0]],
        "machine": f"{machine()} ({cpu_flags()})",
        "date": datetime.date.today().isoformat(),
    }


def render_speed(speeds: dict[str, Any]) -> str:
    lines = [
        "| export | adapter | adapter params | without: tokens/s (min-max) | with adapter | "
        "ratio | per-pair ratio (min-max) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, s in speeds.items():
        rate = {}
        for kind, median in s["tokens_per_s"].items():
            low, high = s["tokens_per_s_range"][kind]
            rate[kind] = f"{median:.1f} ({low:.1f}-{high:.1f})"
        pair, (low, high) = s["paired_ratio"]["median"], s["paired_ratio"]["range"]
        lines.append(
            f"| {name} | {s['adapter']['method']} on {s['adapter']['modules']} Linears | "
            f"{s['adapter']['params'] / 1e6:.2f}M | {rate['without']} | {rate['with adapter']} | "
            f"{s['ratio']:.3f} | {pair:.3f} ({low:.3f}-{high:.3f}) |"
        )
    return "\n".join(lines) + "\n"


def render(meta: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    lines = [
        "| bits | variant | trainable params | weighted error after init | distill steps | "
        "model dtype | KL | top-1 | seconds | date |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        params = f"{row['trainable_params'] / 1e6:.2f}M" if "trainable_params" in row else "-"
        ratio = f"{row['init_error_ratio']:.3f}" if "init_error_ratio" in row else "-"
        steps = row.get("steps", DISTILL["steps"]) if row["variant"].endswith("+distill") else "-"
        lines.append(
            f"| {row['bits']} | {row['case'].split('/', 1)[1]} | {params} | {ratio} | {steps} | "
            f"{row.get('dtype', 'auto')} | {row['kl']:.4f} | {100 * row['top1']:.1f}% | "
            f"{row['seconds']:.0f} | {row.get('date', '')} |"
        )
    lines += [
        "",
        f"Last run: {meta['machine']}, distill budget {meta['distill']} (each row's own "
        "machine and steps: adapters.json).",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--bits", type=int, default=3, choices=(2, 3, 4))
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--adapter-lr", type=float, default=2e-4)
    parser.add_argument("--steps", type=int, default=DISTILL["steps"], help="distill steps")
    add_dtype_argument(parser)
    parser.add_argument("--merge", action="store_true", help="keep rows of other bit widths")
    parser.add_argument(
        "--tag", default="", help="appended to the rows' names, so a rerun keeps the earlier rows"
    )
    parser.add_argument("--table", action="store_true", help="print the table of the JSON")
    parser.add_argument("--speed", metavar="EXPORT", help="decode speed with and without adapter")
    parser.add_argument("--repeats", type=int, default=15, help="--speed: timed runs of each")
    parser.add_argument("--tokens", type=int, default=64, help="--speed: tokens per run")
    parser.add_argument("--threads", type=int, default=1, help="--speed: torch threads")
    args = parser.parse_args()
    out = BENCHMARKS / "adapters.json"
    saved = json.loads(out.read_text()) if out.exists() else {}
    if args.speed:
        result = measure_speed(args.speed, args.tokens, args.repeats, args.threads)
        saved.setdefault("speed", {})[Path(args.speed).name] = result
        out.write_text(json.dumps(saved, indent=1) + "\n")
        print(json.dumps(result, indent=1))
        print(render_speed(saved["speed"]), end="")
        return
    if args.table:
        print(render(saved["meta"], saved["rows"]), end="")
        if "speed" in saved:
            print("\n" + render_speed(saved["speed"]), end="")
        return
    rows = load_rows(out, "case", args.merge)
    for row in run_bits(args.bits, args.variants, args.adapter_lr, args.steps, args.dtype):
        case = row["case"] + (f" {args.tag}" if args.tag else "")
        rows[case] = {
            **row,
            "case": case,
            "steps": args.steps,
            "dtype": args.dtype,
            "date": datetime.date.today().isoformat(),
            "machine": f"{machine()} ({cpu_flags()})",
        }
    meta = {
        "eval": f"builtin:wiki evaluation, {EVAL_WINDOWS} x {SEQ_LEN}",
        "machine": f"{machine()} ({cpu_flags()})",
        "distill": {**DISTILL, "adapter_lr": args.adapter_lr},
        "rank": RANK,
    }
    order = sorted(
        rows,
        key=lambda c: (rows[c]["bits"], list(VARIANTS).index(rows[c]["variant"]), c),
    )
    ordered = write_rows(out, meta, rows, order)
    if "speed" in saved:  # write_rows keeps meta and rows alone
        out.write_text(
            json.dumps({**json.loads(out.read_text()), "speed": saved["speed"]}, indent=1) + "\n"
        )
    # adapters.md is written by hand around these numbers (which run, which machine, what they
    # mean): print the table for it rather than overwrite it
    print(render(meta, ordered), flush=True)


if __name__ == "__main__":
    main()
