"""Contextual sparsity (TEAL) and Sirius correction on SmolLM2-135M: quality, decode speed, and
agreement of greedy continuations with the dense model.

1. KL: the ``contextual`` pass through the Pipeline API (the path of ``compress apply``) at each
   sparsity, scored teacher-forced on 32 windows x 512 tokens of the builtin:wiki evaluation
   split against the original model (perplexity, KL(original || sparse), top-1).
2. Speed: batch-1 greedy decode, one thread, of the dense bf16 model (stock ``nn.Linear``), the
   sparse model (the 50% thresholds on the same bf16 weights; the native decode kernel) and the
   sparse model with Sirius correction, and as a control the dense model through the same
   kernel keeping every entry (``dense-kernel``); each a plain loop over a ``DynamicCache``
   (the same loop for dense and sparse), runs interleaved, medians reported as tokens/s and
   ratios.
3. Generation: 64-token greedy continuations of prompts cut from the evaluation windows; the
   fraction of positions equal to the dense model's tokens for sparse and Sirius, the share of
   the sparse model's loss that Sirius recovers, and Sirius's cost relative to the sparse model
   (measured time, and its full-model checks).

    OMP_NUM_THREADS=1 python scripts/bench_contextual.py      # -> benchmarks/contextual.{json,md}
    python scripts/bench_contextual.py --table                # the markdown of the JSON
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import statistics
import time
from typing import Any

import torch
from benchrows import BENCHMARKS, cpu_flags, machine, smollm2_and_eval_windows
from transformers import DynamicCache

MODEL = "smollm2-135m"
CALIBRATION = {"dataset": "builtin:wiki", "samples": 32, "seq_len": 512, "seed": 0}
EVALUATE = {"perplexity": ["builtin:wiki"], "seq_len": 512, "max_windows": 32, "kl": True}


def run_kl(sparsity: float, score: str, allocation: str, dtype: str) -> tuple[dict[str, Any], Any]:
    from compress.pipeline import Pipeline
    from compress.recipe import parse_recipe

    settings = {"sparsity": sparsity, "score": score, "allocation": allocation}
    recipe = parse_recipe(
        {
            "model": {"name": MODEL, "dtype": dtype},
            "calibration": CALIBRATION,
            "passes": [{"pass": "contextual", **settings}],
            "evaluate": {**EVALUATE, "batch_size": 4},
        },
        source=f"contextual-{sparsity}",
    )
    start = time.perf_counter()
    result = Pipeline.from_recipe(recipe).run()
    quality = result.report["quality"]
    entry = quality[0] if isinstance(quality, list) else quality
    report = result.report["passes"][0]
    row = {
        **settings,
        "dtype": dtype,
        "calibration_sparsity": report["metrics"]["calibration_sparsity"],
        "quality": entry,
        "run_seconds": time.perf_counter() - start,
    }
    return row, result


def run_scores(variants: list[str], windows: int) -> list[dict[str, Any]]:
    """The ``scores`` phase: each SCORE:ALLOCATION[:SPARSITY] variant calibrated in-process on the
    float32 model (the same calibration as the kl phase) and scored teacher-forced against it on
    ``windows`` evaluation windows: a cheaper comparison of the pass's options than the kl phase
    (no export, no bf16, which CPUs without bf16 arithmetic emulate slowly)."""
    from compress.data.corpora import calibration_batch
    from compress.evaluate.quality import compare_to_reference
    from compress.prune.contextual import ContextualConfig, contextual
    from compress.registry import PassContext

    model, tokenizer, eval_windows = smollm2_and_eval_windows(windows, 512, "float32")
    settings = {k: v for k, v in CALIBRATION.items() if k != "dataset"}
    ids = calibration_batch(tokenizer, str(CALIBRATION["dataset"]), **settings)
    rows = []
    for variant in variants:
        score, allocation, *rest = variant.split(":")
        sparsity = float(rest[0]) if rest else 0.5
        sparse = copy.deepcopy(model)
        config = ContextualConfig(sparsity=sparsity, score=score, allocation=allocation)
        context = PassContext(calibration=ids)
        start = time.perf_counter()
        contextual(sparse, config, context)
        seconds = time.perf_counter() - start
        quality = compare_to_reference(sparse, model, eval_windows)
        row = {
            "score": score,
            "allocation": allocation,
            "sparsity": sparsity,
            "windows": windows,
            "kl": float(quality.kl_mean),
            "top1": float(quality.top1_agreement),
            "calibration_seconds": seconds,
        }
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


@torch.no_grad()
def greedy(model: Any, ids: torch.Tensor, new: int) -> torch.Tensor:
    """Plain greedy decode over a DynamicCache: ``new`` tokens after ``ids`` (1, prompt)."""
    cache = DynamicCache()
    out = model(input_ids=ids, past_key_values=cache, use_cache=True)
    tokens = [int(out.logits[0, -1].argmax())]
    while len(tokens) < new:
        step = torch.tensor([[tokens[-1]]])
        out = model(input_ids=step, past_key_values=cache, use_cache=True)
        tokens.append(int(out.logits[0, -1].argmax()))
    return torch.tensor(tokens)


def timed(fn: Any) -> tuple[float, Any]:
    start = time.perf_counter()
    value = fn()
    return time.perf_counter() - start, value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sparsities", nargs="*", type=float, default=[0.3, 0.4, 0.5])
    parser.add_argument(
        "--scores", nargs="*", default=["magnitude"], choices=["magnitude", "weighted"],
        help="kl phase: the pass's score(s); speed and generation use the first",
    )  # fmt: skip
    parser.add_argument("--allocation", default="uniform", choices=["uniform", "greedy"])
    parser.add_argument(
        "--kl-dtype", default="bfloat16", choices=["bfloat16", "float32"],
        help="kl phase: the model's dtype (float32 on CPUs without bf16 arithmetic)",
    )  # fmt: skip
    parser.add_argument("--prompts", type=int, default=30)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--speed-runs", type=int, default=5)
    parser.add_argument("--periods", nargs="*", type=int, default=[8])
    parser.add_argument(
        "--variants",
        nargs="*",
        default=["2", "4", "8:0.1", "16:0.05"],
        help="Sirius variants of the generation phase: PERIOD, with :MIN_PROB (lenient "
        "acceptance) and/or /CONFIDENCE (check early after an unsure draft), e.g. 8/0.5",
    )
    parser.add_argument(
        "--phases", nargs="*", default=["kl", "speed", "generation"],
        choices=["kl", "speed", "generation", "scores"],
    )  # fmt: skip
    parser.add_argument(
        "--score-variants", nargs="*",
        default=["magnitude:uniform", "weighted:uniform", "magnitude:greedy", "weighted:greedy"],
        help="scores phase: SCORE:ALLOCATION[:SPARSITY] (sparsity 0.5 when left out)",
    )  # fmt: skip
    parser.add_argument("--score-windows", type=int, default=16, help="scores phase: windows")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument(
        "--merge", action="store_true", help="keep the saved results of phases not rerun"
    )
    parser.add_argument("--table", action="store_true", help="print the JSON's table, run nothing")
    args = parser.parse_args()
    out = BENCHMARKS / "contextual.json"
    if args.table:
        print(render(json.loads(out.read_text())), end="")
        return

    from compress.data.corpora import calibration_batch, load_texts, token_windows
    from compress.models import load_model
    from compress.prune.contextual import (
        CONFIG_KEY,
        ContextualConfig,
        contextual,
        install_from_config_,
    )
    from compress.prune.contextual_kernel import native
    from compress.registry import PassContext

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    data: dict[str, Any] = {
        "meta": {
            "model": MODEL,
            "calibration": CALIBRATION,
            "evaluate": EVALUATE,
            "machine": machine(),
            "cpu_flags": cpu_flags(),
            "threads": torch.get_num_threads(),
            "native_kernel": native() is not None,
            "date": datetime.date.today().isoformat(),
            "command": command(args),
        },
        "kl": [],
    }
    if args.merge and out.exists():
        saved = json.loads(out.read_text())
        commands = saved["meta"].get("commands") or {"earlier phases": saved["meta"]["command"]}
        machines = saved["meta"].get("machines") or dict.fromkeys(commands, where(saved["meta"]))
        data = {**saved, "meta": {**saved["meta"], **data["meta"]}}
        phases = " ".join(args.phases) + (f" ({args.dtype})" if args.dtype != "bfloat16" else "")
        data["meta"]["commands"] = {**commands, phases: command(args) + " --merge"}
        data["meta"]["machines"] = {**machines, phases: where(data["meta"])}
    if "scores" in args.phases:
        data["scores"] = run_scores(args.score_variants, args.score_windows)
        write(out, data)
    spec = None
    for score in args.scores if "kl" in args.phases else []:
        for sparsity in args.sparsities:
            print(f"== KL at {sparsity} ({score}, {args.allocation})", flush=True)
            row, result = run_kl(sparsity, score, args.allocation, args.kl_dtype)
            data["kl"] = [r for r in data["kl"] if kl_key(r) != kl_key(row)] + [row]
            data["kl"].sort(key=kl_key)
            print(json.dumps(row, default=str), flush=True)
            if sparsity == max(args.sparsities) and score == args.scores[0]:
                spec = getattr(result.model.config, CONFIG_KEY)
                data["meta"]["speed_sparsity"] = sparsity
            del result
            write(out, data)
    if not {"speed", "generation"} & set(args.phases):
        return
    dense, tokenizer = load_model(MODEL, dtype=args.dtype)
    sparse = copy.deepcopy(dense)
    if spec is None:  # no KL phase: calibrate the thresholds here (the same pass and data)
        sparsity = max(args.sparsities)
        settings = {k: v for k, v in CALIBRATION.items() if k != "dataset"}
        ids = calibration_batch(tokenizer, str(CALIBRATION["dataset"]), **settings)
        config = ContextualConfig(
            sparsity=sparsity, score=args.scores[0], allocation=args.allocation
        )
        contextual(sparse, config, PassContext(calibration=ids))
        spec = getattr(sparse.config, CONFIG_KEY)
        data["meta"]["speed_sparsity"] = sparsity
    else:
        install_from_config_(sparse, spec)
    # the control: the same kernel keeping every input entry (|x| > -1), so the speed that comes
    # from the kernel itself is told apart from the speed that comes from sparsity
    kernel_dense = copy.deepcopy(dense)
    everything = [dict.fromkeys(entry, -1.0) for entry in spec["thresholds"]]
    install_from_config_(kernel_dense, {**spec, "thresholds": everything})
    windows = token_windows(tokenizer, load_texts("builtin:wiki", "evaluation"), 512, 64)
    prompts = [w[: args.prompt_len][None] for w in windows[: args.prompts]]

    if "speed" in args.phases:
        measure_speed(args, data, dense, kernel_dense, sparse, prompts[0])
        write(out, data)
    if "generation" in args.phases:
        measure_generation(args, data, dense, sparse, prompts)
        write(out, data)


def measure_speed(
    args: Any, data: dict[str, Any], dense: Any, kernel_dense: Any, sparse: Any, ids: Any
) -> None:
    """Interleaved runs on one prompt; medians."""
    from compress.prune.sirius import sirius_generate

    print("== speed", flush=True)
    cases: dict[str, Any] = {
        "dense": lambda: greedy(dense, ids, args.new),
        "dense-kernel": lambda: greedy(kernel_dense, ids, args.new),
        "sparse": lambda: greedy(sparse, ids, args.new),
    }
    for period in args.periods:
        cases[f"sirius-p{period}"] = lambda p=period: sirius_generate(
            sparse, ids, max_new_tokens=args.new, period=p
        )
    for fn in cases.values():
        fn()  # warm-up (and the kernel build)
    seconds: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.speed_runs):
        for name, fn in cases.items():
            seconds[name].append(timed(fn)[0])
    speed = {
        name: {"tokens_per_s": args.new / statistics.median(s), "seconds": s}
        for name, s in seconds.items()
    }
    for name in speed:
        speed[name]["vs_dense"] = speed[name]["tokens_per_s"] / speed["dense"]["tokens_per_s"]
    data["speed"] = speed
    print(json.dumps(speed, indent=1), flush=True)


def measure_generation(
    args: Any, data: dict[str, Any], dense: Any, sparse: Any, prompts: list[Any]
) -> None:
    """Greedy continuations of every prompt: agreement with the dense model, and cost."""
    from compress.prune.sirius import sirius_generate

    print("== generation", flush=True)
    from compress.prune.contextual import dense_mode

    # "dense-path": the dense model again, through the sparse model's modules run dense: how
    # often two numerically different dense paths agree (the ceiling for Sirius's agreement)
    variants: dict[str, dict[str, Any]] = {"sparse": {}, "dense-path": {}}
    for variant in args.variants:
        rest, _, confidence = variant.partition("/")
        period, _, min_prob = rest.partition(":")
        settings: dict[str, Any] = {"period": int(period)}
        if min_prob:
            settings["min_prob"] = float(min_prob)
        if confidence:
            settings["draft_confidence"] = float(confidence)
        name = f"sirius-p{period}" + (f"-min{min_prob}" if min_prob else "")
        variants[name + (f"-conf{confidence}" if confidence else "")] = settings
    totals = {name: {"agree": 0, "seconds": 0.0, "checks": 0, "steps": 0} for name in variants}
    dense_seconds = 0.0
    for index, prompt in enumerate(prompts):
        took, reference = timed(lambda prompt=prompt: greedy(dense, prompt, args.new))
        dense_seconds += took
        for name, settings in variants.items():
            if name == "sparse":
                took, tokens = timed(lambda prompt=prompt: greedy(sparse, prompt, args.new))
            elif name == "dense-path":
                with dense_mode(sparse):
                    took, tokens = timed(lambda prompt=prompt: greedy(sparse, prompt, args.new))
            else:
                took, (sequence, stats) = timed(
                    lambda prompt=prompt, s=settings: sirius_generate(
                        sparse, prompt, max_new_tokens=args.new, **s
                    )
                )
                tokens = sequence[0, prompt.shape[1] :]
                totals[name]["checks"] += stats.dense_checks
                totals[name]["steps"] += stats.sparse_steps
            totals[name]["agree"] += int((tokens == reference).sum())
            totals[name]["seconds"] += took
        print(f"prompt {index + 1}/{len(prompts)}", flush=True)
    count = len(prompts) * args.new
    generation: dict[str, Any] = {"prompts": len(prompts), "new_tokens": args.new}
    base = totals["sparse"]
    lost = 1 - base["agree"] / count
    for name, total in totals.items():
        agreement = total["agree"] / count
        generation[name] = {
            "agreement": agreement,
            "recovered": None if name == "sparse" or lost == 0 else (agreement - (1 - lost)) / lost,
            "cost_vs_sparse": total["seconds"] / base["seconds"],
            "cost_vs_dense": total["seconds"] / dense_seconds,
            "dense_checks_per_token": total["checks"] / count,
            "sparse_steps_per_token": total["steps"] / count,
            **variants[name],
        }
    generation["dtype"] = args.dtype
    data["generation" if args.dtype == "bfloat16" else f"generation_{args.dtype}"] = generation
    print(json.dumps(generation, indent=1), flush=True)


def kl_key(row: dict[str, Any]) -> tuple[str, str, str, float]:
    """Rows of the quality table are one per score, allocation, dtype and sparsity (rows from
    before the weighted score and the dtype option are magnitude, uniform, bf16)."""
    return (
        row.get("score", "magnitude"),
        row.get("allocation", "uniform"),
        row.get("dtype", "bfloat16"),
        row["sparsity"],
    )


def command(args: Any) -> str:
    """The command line that reproduces this run (every option spelled out)."""
    parts = ["OMP_NUM_THREADS=1 python scripts/bench_contextual.py"]
    for key, value in vars(args).items():
        if key in ("table", "merge") or value is False:
            continue
        flag = f"--{key.replace('_', '-')}"
        shown = " ".join(map(str, value)) if isinstance(value, list) else str(value)
        parts.append(flag if value is True else f"{flag} {shown}")
    return " ".join(parts)


def where(meta: dict[str, Any]) -> str:
    """The machine line of a run's meta."""
    return f"{meta['machine']} ({meta['cpu_flags']})"


def write(out: Any, data: dict[str, Any]) -> None:
    out.write_text(json.dumps(data, indent=1, default=str) + "\n")
    (out.parent / "contextual.md").write_text(render(data))


def render(data: dict[str, Any]) -> str:
    meta = data["meta"]
    lines = ["# Contextual sparsity (TEAL) and Sirius correction: SmolLM2-135M", ""]
    machines = meta.get("machines") or {"all phases": where(meta)}
    lines += [f"Machine ({phases}): {line}" for phases, line in machines.items()]
    lines += [
        "",
        f"{meta['threads']} thread(s); native decode kernel: "
        f"{'built' if meta.get('native_kernel') else 'unavailable'}.",
        "",
    ]
    commands = meta.get("commands") or {"all phases": meta["command"]}
    lines += [f"Command ({phases}): `{line}`" for phases, line in commands.items()]
    lines += [
        "",
        "## Quality (teacher-forced, 32 x 512 tokens of builtin:wiki evaluation split)",
        "",
        "| score | allocation | dtype | sparsity | calibration sparsity | ppl | KL | top-1 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    reference = None
    for row in data["kl"]:
        q = next(iter(row["quality"].values()))
        reference = q.get("reference_perplexity", reference)
        score, allocation, dtype, _ = kl_key(row)
        lines.append(
            f"| {score} | {allocation} | {dtype} | {row['sparsity']:.2f} | "
            f"{row['calibration_sparsity']:.3f} | {q['perplexity']:.2f} | {q['kl_mean']:.3f} | "
            f"{100 * q['top1_agreement']:.1f}% |"
        )
    if reference is not None:
        lines += ["", f"Original model perplexity on the same windows: {reference:.2f}."]
    if data.get("scores"):
        rows = data["scores"]
        lines += [
            "",
            f"## The pass's options compared (float32, in-process, {rows[0]['windows']} x 512 "
            "evaluation tokens)",
            "",
            "| score | allocation | sparsity | KL | top-1 |",
            "|---|---|---|---|---|",
        ]
        lines += [
            f"| {r['score']} | {r['allocation']} | {r['sparsity']:.2f} | {r['kl']:.3f} | "
            f"{100 * r['top1']:.1f}% |"
            for r in rows
        ]
        lines += [
            "",
            "`weighted`: an entry's score is |x| times the norm of the weight column it reads "
            "(WINA); `greedy`: per-site sparsities of each layer chosen on the output-error model "
            "of `error_curve`, their mean by weight count at the target.",
        ]
    if "speed" in data:
        lines += [
            "",
            f"## Decode speed (batch 1, bf16 weights, greedy, sparsity "
            f"{meta.get('speed_sparsity')}, medians of interleaved runs)",
            "",
            "| model | tokens/s | vs dense |",
            "|---|---|---|",
        ]
        for name, row in data["speed"].items():
            lines.append(f"| {name} | {row['tokens_per_s']:.1f} | {row['vs_dense']:.2f}x |")
        lines += [
            "",
            "`dense`: stock `nn.Linear` (torch's bf16 GEMV). `dense-kernel`: the same weights "
            "through our decode kernel keeping every entry, the share of the speed-up that is "
            "the kernel rather than sparsity. `sirius-pN`: exact (greedy) acceptance, a "
            "full-model check every N drafts. The whole decode step is timed (embeddings, "
            "attention, the 49152 x 576 `lm_head`, which stays dense).",
        ]
    for key in ("generation", "generation_float32"):
        if key not in data:
            continue
        gen = data[key]
        lines += [
            "",
            f"## Greedy continuations ({gen['prompts']} prompts x {gen['new_tokens']} tokens, "
            f"{gen.get('dtype', 'bfloat16')}): agreement with the dense model",
            "",
            "| variant | agreement | loss recovered | time vs sparse | time vs dense | "
            "full checks / token |",
            "|---|---|---|---|---|---|",
        ]
        for name, row in gen.items():
            if not isinstance(row, dict):
                continue
            recovered = "" if row["recovered"] is None else f"{100 * row['recovered']:.0f}%"
            notes = []
            if "min_prob" in row:
                notes.append(f"keep p >= {row['min_prob']}")
            if "draft_confidence" in row:
                notes.append(f"check after a draft of p < {row['draft_confidence']}")
            label = name + (f" ({'; '.join(notes)})" if notes else "")
            lines.append(
                f"| {label} | {100 * row['agreement']:.1f}% | {recovered} | "
                f"{row['cost_vs_sparse']:.2f}x | {row['cost_vs_dense']:.2f}x | "
                f"{row['dense_checks_per_token']:.3f} |"
            )
        lines += [
            "",
            "Agreement: the share of the continuation positions whose token equals the dense "
            "model's greedy token. Loss recovered: (Sirius - sparse) / (100% - sparse). Time: "
            "wall time of the whole continuation, summed over prompts, in this run.",
        ]
    if meta.get("summary"):
        lines += ["", "## Reading", ""] + [f"- {line}" for line in meta["summary"]]
    if meta.get("note"):
        lines += ["", f"Note: {meta['note']}."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
