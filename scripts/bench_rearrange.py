"""What outlier channel rearrangement buys block formats on SmolLM2-135M.

Each block format is quantized twice with round-to-nearest, as loaded and after ``rearrange``
(mlp, values and residual channels sorted, ``block_size`` the format's block), and scored
against the original on 32 windows x 512 tokens of the builtin:wiki evaluation split (KL and
top-1). ``bfpB-bN`` is block floating point (``B``-bit mantissas, a power-of-two scale per
``N`` weights; ``mxint8`` and ``mxfp8`` are OCP's 8-bit formats, blocks of 32). ``--gptq``
adds MXFP4 and BFP4 through GPTQ with and without rearrangement (128 x 512 calibration windows
of the calibration split, act order). ``--variants shuffled`` adds the control: the same sites
permuted in a seeded random order, which changes which channels share a block without gathering
the outliers. The peer rows ``gguf/mxfp4`` quantize every
decoder Linear with llama.cpp's reference quantizer (the ``gguf`` package's ``quants``, which
mirror ggml's C code) and score the dequantized weights the same way. Rows are written after
every case.

    python scripts/bench_rearrange.py                  # -> benchmarks/rearrange.json
    python scripts/bench_rearrange.py --gptq --merge
    python scripts/bench_rearrange.py --variants shuffled --merge   # the random-order control
    python scripts/bench_rearrange.py --table
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import time
from collections.abc import Iterator
from typing import Any

from benchrows import (
    BENCHMARKS,
    cpu_flags,
    load_rows,
    machine,
    smollm2_and_eval_windows,
    write_rows,
)

EVAL_WINDOWS = 32
SEQ_LEN = 512
CALIBRATION = 128

# name -> (quantizer settings, block size the sort is reported for)
FORMATS: dict[str, tuple[dict[str, Any], int]] = {
    "int4-sym-g16": ({"bits": 4, "group_size": 16, "symmetric": True}, 16),
    "int4-sym-g32": ({"bits": 4, "group_size": 32, "symmetric": True}, 32),
    "int4-sym-g64": ({"bits": 4, "group_size": 64, "symmetric": True}, 64),
    "nf4-b16": ({"format": "nf4", "scale_block": 16}, 16),
    "nf4-b32": ({"format": "nf4", "scale_block": 32}, 32),
    "nf4-b64": ({"format": "nf4", "scale_block": 64}, 64),
    "mxfp4": ({"format": "mxfp4"}, 32),
    "nvfp4": ({"format": "nvfp4"}, 16),
    # block floating point: a power-of-two (E8M0) scale per block, signed b-bit mantissas
    "bfp4-b16": ({"bits": 4, "group_size": 16, "scale_dtype": "e8m0"}, 16),
    "bfp4-b32": ({"bits": 4, "group_size": 32, "scale_dtype": "e8m0"}, 32),
    "bfp4-b64": ({"bits": 4, "group_size": 64, "scale_dtype": "e8m0"}, 64),
    "bfp6-b32": ({"bits": 6, "group_size": 32, "scale_dtype": "e8m0"}, 32),
    "mxint8": ({"bits": 8, "group_size": 32, "scale_dtype": "e8m0"}, 32),
    "mxfp8": ({"format": "fp8_e4m3", "scaling": "mx"}, 32),
}
GPTQ_FORMATS = ("mxfp4", "bfp4-b32")
# llama.cpp's own quantizers (the gguf package's reference code) for the formats it has; its
# NVFP4 (gguf 0.19.0) dequantizes but does not quantize
GGUF_TYPES = {"mxfp4": "MXFP4"}


VARIANTS = ("plain", "rearranged", "shuffled")
"""As loaded; channels sorted (the method); channels in a seeded random order (the control)."""


def case_name(method: str, fmt: str, variant: str) -> str:
    return f"{method}/{fmt}/{variant}"


def quantize_gguf(model: Any, type_name: str) -> None:
    """Every decoder Linear through llama.cpp's quantizer and back (its rounding, its scales)."""
    import gguf
    import numpy as np
    import torch
    from gguf import quants

    qtype = getattr(gguf.GGMLQuantizationType, type_name)
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in name:
            weight = module.weight.detach().float().numpy()
            restored = quants.dequantize(quants.quantize(weight, qtype), qtype)
            module.weight.data.copy_(torch.from_numpy(np.ascontiguousarray(restored)))


def run(methods: list[str], formats: list[str], variants: list[str]) -> Iterator[dict[str, Any]]:
    """One row per (method, format, variant), as each finishes."""
    from compress.cli import RichProgress
    from compress.data import calibration_batch
    from compress.evaluate.quality import compare_to_reference
    from compress.quant.gptq import GPTQConfig
    from compress.quant.rearrange import RearrangeConfig, rearrange
    from compress.quant.rtn import RTNConfig
    from compress.registry import PassContext, config_for

    original, tokenizer, windows = smollm2_and_eval_windows(EVAL_WINDOWS, SEQ_LEN)
    with RichProgress() as progress:
        context = PassContext(progress=progress, tokenizer=tokenizer)
        if "gptq" in methods:
            context.calibration = calibration_batch(
                tokenizer, "builtin:wiki", CALIBRATION, SEQ_LEN, 0
            )
            context.calibration_source = "builtin:wiki"
        for method in methods:
            for fmt in formats:
                if (method == "gptq" and fmt not in GPTQ_FORMATS) or (
                    method == "gguf" and fmt not in GGUF_TYPES
                ):
                    continue
                settings, block = FORMATS[fmt]
                for variant in variants:
                    student = copy.deepcopy(original)
                    start = time.perf_counter()
                    metrics: dict[str, float] = {}
                    if variant != "plain":
                        order = "random" if variant == "shuffled" else "magnitude"
                        config_ = RearrangeConfig(block_size=block, order=order)
                        metrics = dict(rearrange(student, config_, context).metrics)
                    if method == "gguf":
                        quantize_gguf(student, GGUF_TYPES[fmt])
                    else:
                        config: Any = (
                            GPTQConfig(**settings, act_order=True)
                            if method == "gptq"
                            else RTNConfig(**settings)
                        )
                        config_for(config).fn(student, config, context)
                    seconds = time.perf_counter() - start
                    quality = compare_to_reference(student, original, windows, progress=progress)
                    row = {
                        "case": case_name(method, fmt, variant),
                        "method": method,
                        "format": fmt,
                        "block": block,
                        "rearranged": variant != "plain",
                        "variant": variant,
                        "kl": float(quality.kl_mean),
                        "top1": float(quality.top1_agreement),
                        "crest": metrics,
                        "seconds": seconds,
                    }
                    print(json.dumps(row), flush=True)
                    yield row
                    del student


def render(meta: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    by_case = {row["case"]: row for row in rows}
    lines = [
        "| method | format | block | KL plain (top-1) | KL rearranged (top-1) | change | "
        "KL shuffled (control) | block crest mlp / values / residual, before → after |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for method in ("gguf", "rtn", "gptq"):
        for fmt in FORMATS:
            plain = by_case.get(case_name(method, fmt, "plain"))
            ordered = by_case.get(case_name(method, fmt, "rearranged"))
            shuffled = by_case.get(case_name(method, fmt, "shuffled"))
            if not (plain and ordered):
                continue
            control = (
                f"{shuffled['kl']:.4f} ({100 * (shuffled['kl'] / plain['kl'] - 1):+.0f}%)"
                if shuffled
                else "—"
            )
            crest = ordered["crest"]
            crests = " / ".join(
                f"{crest[site + '_block_crest_before']:.2f} → "
                f"{crest[site + '_block_crest_after']:.2f}"
                for site in ("mlp", "values", "residual")
                if f"{site}_block_crest_before" in crest
            )
            change = 100 * (ordered["kl"] / plain["kl"] - 1)
            lines.append(
                f"| {method} | {fmt} | {plain['block']} | {plain['kl']:.4f} "
                f"({100 * plain['top1']:.1f}%) | {ordered['kl']:.4f} "
                f"({100 * ordered['top1']:.1f}%) | {change:+.0f}% | {control} | {crests} |"
            )
    lines += ["", f"Machine: {meta['machine']}; {meta['date']}."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--formats", nargs="*", default=list(FORMATS), choices=list(FORMATS))
    parser.add_argument(
        "--gptq", action="store_true", help="also GPTQ on " + ", ".join(GPTQ_FORMATS)
    )
    parser.add_argument("--no-rtn", action="store_true", help="skip the round-to-nearest rows")
    parser.add_argument(
        "--variants",
        nargs="*",
        default=["plain", "rearranged"],
        choices=VARIANTS,
        help="shuffled: channels in a seeded random order, the control for the sort",
    )
    parser.add_argument("--merge", action="store_true", help="keep the other saved rows")
    parser.add_argument("--table", action="store_true", help="print the table of the JSON")
    args = parser.parse_args()
    out = BENCHMARKS / "rearrange.json"
    if args.table:
        saved = json.loads(out.read_text())
        print(render(saved["meta"], saved["rows"]), end="")
        return
    methods = ["gguf"] + ([] if args.no_rtn else ["rtn"]) + (["gptq"] if args.gptq else [])
    rows = load_rows(out, "case", args.merge)
    meta = {
        "machine": f"{machine()} ({cpu_flags()})",
        "date": datetime.date.today().isoformat(),
        "evaluation": f"{EVAL_WINDOWS} x {SEQ_LEN}",
        "calibration (gptq)": f"{CALIBRATION} x {SEQ_LEN}",
    }
    order = [case_name(m, f, v) for m in ("gguf", "rtn", "gptq") for f in FORMATS for v in VARIANTS]
    for row in run(methods, args.formats, args.variants):
        rows[row["case"]] = {**row, "date": meta["date"]}
        write_rows(out, meta, rows, order)
    print(render(meta, write_rows(out, meta, rows, order)), end="")


if __name__ == "__main__":
    main()
