"""Does allocate_bits' proxy rank layers as quantizing them does? The Fisher-weighted rounding
cost of each Linear of SmolLM2-135M against the KL of rounding that Linear alone.

For every ``--stride``-th decoder Linear (by name order), the layer alone is rounded to
``--bits`` (RTN, group 64 asymmetric, MSE ranges: what allocate_bits measures) and the KL of the
model against the original is measured on ``--windows`` x 512 evaluation tokens; the proxy
``sum F (W - Q(W))**2`` (F: the diagonal Fisher of 32 calibration sequences) and, as a control,
the plain squared error ``sum (W - Q(W))**2`` are computed for the same layers. Reported: the
Spearman rank correlation of each with the KL, and how many of the KL's top quarter each finds.

    python scripts/bench_allocation.py              # -> benchmarks/allocation_proxy.{json,md}
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from typing import Any

from benchrows import (
    BENCHMARKS,
    add_dtype_argument,
    cpu_flags,
    machine,
    smollm2_and_eval_windows,
)


def ranks(values: list[float]) -> list[float]:
    order = sorted(range(len(values)), key=values.__getitem__)
    out = [0.0] * len(values)
    for rank, index in enumerate(order):
        out[index] = float(rank)
    return out


def spearman(a: list[float], b: list[float]) -> float:
    ra, rb = ranks(a), ranks(b)
    n = len(a)
    mean = (n - 1) / 2
    cov = sum((x - mean) * (y - mean) for x, y in zip(ra, rb, strict=True))
    var = sum((x - mean) ** 2 for x in ra)
    return cov / var


def top_overlap(proxy: list[float], truth: list[float]) -> tuple[int, int]:
    k = max(1, len(truth) // 4)
    best = set(sorted(range(len(truth)), key=truth.__getitem__)[-k:])
    found = set(sorted(range(len(proxy)), key=proxy.__getitem__)[-k:])
    return len(best & found), k


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bits", type=int, default=3)
    parser.add_argument("--stride", type=int, default=5, help="every n-th decoder Linear")
    parser.add_argument("--windows", type=int, default=8, help="evaluation windows of the KL")
    parser.add_argument("--fisher-samples", type=int, default=32)
    parser.add_argument("--out", default="allocation_proxy")
    add_dtype_argument(parser)
    args = parser.parse_args()

    import torch

    from compress.data import load_texts, token_windows
    from compress.evaluate.quality import token_kl
    from compress.formats.int import IntFormat
    from compress.quant.allocate import fisher_diagonal, rounding_cost
    from compress.quant.observers import choose_clip
    from compress.utils.modules import select_decoder_linears

    torch.set_num_threads(2)
    model, tokenizer, windows = smollm2_and_eval_windows(args.windows, dtype=args.dtype)
    model.eval()
    dtype = str(model.dtype).removeprefix("torch.")
    calibration = token_windows(
        tokenizer, load_texts("builtin:wiki", "calibration"), 512, args.fisher_samples
    )
    modules, _ = select_decoder_linears(model, None, [], pass_name="bench", why="")
    names = list(modules)[:: args.stride]
    started = time.perf_counter()
    fisher = fisher_diagonal(model, {n: modules[n].weight for n in names}, calibration)
    fisher_s = time.perf_counter() - started
    fmt = IntFormat(args.bits, 64, False)
    with torch.no_grad():
        reference = [model(w.unsqueeze(0)).logits for w in windows]
    rows = []
    for name in names:
        weight = modules[name].weight
        original = weight.detach().clone()
        proxy = rounding_cost(weight, fisher[name], fmt, "mse")
        plain = rounding_cost(weight, torch.ones_like(fisher[name]), fmt, "mse")
        codes, scales, zeros = fmt.quantize(original, clip_ratio=choose_clip(original, fmt, "mse"))
        with torch.no_grad():
            weight.copy_(fmt.dequantize(codes, scales, zeros, weight.dtype))
            kl = sum(
                float(token_kl(ref, model(w.unsqueeze(0)).logits).mean())
                for ref, w in zip(reference, windows, strict=True)
            ) / len(windows)
            weight.copy_(original)
        rows.append({"layer": name, "kl": kl, "fisher_cost": proxy, "squared_error": plain})
        print(json.dumps(rows[-1]), flush=True)
    truth = [r["kl"] for r in rows]
    summary = {
        "spearman_fisher": spearman([r["fisher_cost"] for r in rows], truth),
        "spearman_squared_error": spearman([r["squared_error"] for r in rows], truth),
        "top_quarter_fisher": top_overlap([r["fisher_cost"] for r in rows], truth),
        "top_quarter_squared_error": top_overlap([r["squared_error"] for r in rows], truth),
        "fisher_seconds": fisher_s,
    }
    data: dict[str, Any] = {
        "machine": machine(),
        "cpu_flags": cpu_flags(),
        "date": datetime.date.today().isoformat(),
        "command": "python scripts/bench_allocation.py " + " ".join(sys.argv[1:]),
        "bits": args.bits,
        "dtype": dtype,
        "summary": summary,
        "rows": rows,
    }
    (BENCHMARKS / f"{args.out}.json").write_text(json.dumps(data, indent=1) + "\n")
    fisher_hits, k = summary["top_quarter_fisher"]
    plain_hits, _ = summary["top_quarter_squared_error"]
    lines = [
        "# allocate_bits' sensitivity proxy against the KL of quantizing one layer alone",
        "",
        f"Machine: {data['machine']} ({data['cpu_flags']}); {data['date']}.",
        f"Command: `{data['command']}`",
        "",
        f"SmolLM2-135M ({dtype}), every {args.stride}th "
        f"decoder Linear ({len(rows)} layers) rounded "
        f"alone to int{args.bits} g64 asymmetric (MSE ranges); KL on {args.windows} x 512 "
        f"evaluation tokens; Fisher from {args.fisher_samples} x 512 calibration tokens "
        f"({fisher_s:.0f} s).",
        "",
        "| proxy | Spearman vs KL | of the KL's top quarter, found in the proxy's |",
        "|---|---|---|",
        f"| Fisher-weighted squared error (allocate_bits) | {summary['spearman_fisher']:.3f} | "
        f"{fisher_hits} of {k} |",
        f"| plain squared error | {summary['spearman_squared_error']:.3f} | {plain_hits} of {k} |",
        "",
        "| layer | KL | Fisher cost | squared error |",
        "|---|---|---|---|",
    ]
    for row in sorted(rows, key=lambda r: -r["kl"]):
        lines.append(
            f"| {row['layer']} | {row['kl']:.5f} | {row['fisher_cost']:.4g} | "
            f"{row['squared_error']:.4g} |"
        )
    (BENCHMARKS / f"{args.out}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
