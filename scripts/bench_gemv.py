"""Batch-1 GEMV of every packed format's decode kernel against torch's bf16 GEMV, one thread.

For each shape, one random weight is packed in each format and called through its module's
forward (the path a decode step takes: ``QuantLinear``, ``NMLinear``, ``FP8Linear``,
``FP4Linear``) with one bf16 activation row; the calls are interleaved, ``--runs`` rounds of
``--calls`` calls each, and the medians of the per-round means are reported with the time ratio
to bf16 (above 1: faster than bf16) and to our dense int4 kernel. ``--isa avx2`` repeats the
native kernels with the AVX2 build forced by ``COMPRESS_CPU_ISA`` (the path of CPUs without
AVX-512), in the same process and rounds.

    python scripts/bench_gemv.py --isa avx2          # -> benchmarks/gemv.json, gemv.md
    python scripts/bench_gemv.py --out gemv_zen3     # another machine: its own files
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from typing import Any

from benchrows import BENCHMARKS, cpu_flags, machine

SHAPES = [(4096, 4096), (11008, 4096)]
"""(out, in): the issues' 4096², a 7B MLP projection."""

FORMATS: dict[str, dict[str, Any]] = {
    "int4 g64 sym": {"kind": "int", "bits": 4, "group_size": 64},
    "int4 g64 sym 2:4": {"kind": "nm_int", "n": 2, "m": 4, "bits": 4, "group_size": 64},
    "fp8 e4m3 channel": {"kind": "fp8", "variant": "e4m3", "scaling": "channel"},
    "fp8 e4m3 block 128": {"kind": "fp8", "variant": "e4m3", "scaling": "block", "block_size": 128},
    "mxfp8 e4m3": {"kind": "fp8", "variant": "e4m3", "scaling": "mx"},
    "nf4 b64": {"kind": "fp4", "variant": "nf4", "block_size": 64},
    "mxfp4": {"kind": "fp4", "variant": "mxfp4"},
    "nvfp4": {"kind": "fp4", "variant": "nvfp4"},
    # pruned, unquantized: the weight magnitude-pruned per row, stored as bf16 values + bitmask
    "bf16 50% bitmask": {"kind": "bitmask", "pruned": 0.5},
}


def _mean_seconds(call: Callable[[], object], calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        call()
    return (time.perf_counter() - start) / calls


def modules_for(out_features: int, in_features: int, selected: list[str]) -> dict[str, Any]:
    """Each format's packed Linear of one random weight (the 2:4 one magnitude-pruned; the
    bitmask one magnitude-pruned per row to its ``pruned`` fraction, in bf16)."""
    import torch

    from compress.formats import format_from_dict, runtime_for
    from compress.formats.bitmask.spec import BitmaskFormat
    from compress.ir import QuantizedWeight

    torch.manual_seed(0)
    linear = torch.nn.Linear(in_features, out_features, bias=False)
    modules = {}
    for name, spec in FORMATS.items():
        if name not in selected:
            continue
        weight = linear.weight.detach()
        if spec["kind"] == "bitmask":
            drop = round(spec["pruned"] * in_features)
            order = weight.abs().argsort(dim=1)[:, :drop]
            weight = weight.scatter(1, order, 0.0).to(torch.bfloat16)
            fmt = BitmaskFormat.for_weight(weight)
        else:
            fmt = format_from_dict(spec)
        codes, scales, zeros = fmt.quantize(weight)
        record = QuantizedWeight(codes, scales, zeros, fmt)
        modules[name] = runtime_for(fmt).linear_from_record(linear, record).eval()
    return {"bf16": linear.weight.detach().to(torch.bfloat16), **modules}


def gemv_rows(
    runs: int, calls: int, isas: list[str], dtype_name: str, selected: list[str]
) -> list[dict[str, Any]]:
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(1)
    rows = []
    for out_features, in_features in SHAPES:
        modules = modules_for(out_features, in_features, selected)
        dtype = getattr(torch, dtype_name)
        x = torch.randn(1, in_features).to(dtype)
        weight = modules.pop("bf16")
        xb = x.to(torch.bfloat16)  # the bf16 baseline always multiplies bf16
        cases: dict[str, tuple[str | None, Callable[[], object]]] = {
            "bf16": (None, partial(F.linear, xb, weight))
        }
        for isa in ["native", *isas]:
            for name, module in modules.items():
                cases[f"{name}/{isa}"] = (isa, partial(module, x))
        times: dict[str, list[float]] = {name: [] for name in cases}
        kernels: dict[str, str] = {}
        with torch.inference_mode():
            for _ in range(runs):
                for name, (isa, call) in cases.items():
                    if isa in (None, "native"):
                        os.environ.pop("COMPRESS_CPU_ISA", None)
                    else:
                        os.environ["COMPRESS_CPU_ISA"] = isa
                    call()  # a first call builds and picks its kernel, outside the timing
                    times[name].append(_mean_seconds(call, calls))
                    module = modules.get(name.rsplit("/", 1)[0])
                    if module is not None:
                        kernels[name] = module.kernel
        os.environ.pop("COMPRESS_CPU_ISA", None)
        ms = {name: statistics.median(values) * 1e3 for name, values in times.items()}
        for isa in ["native", *isas]:
            for name, module in modules.items():
                key = f"{name}/{isa}"
                stored = sum(b.numel() * b.element_size() for b in module.buffers())
                rows.append(
                    {
                        "shape": f"1x{in_features} · {out_features}x{in_features}",
                        "activations": dtype_name,
                        "format": name,
                        "build": isa,
                        "kernel": kernels[key],
                        "ms": ms[key],
                        "bf16_ms": ms["bf16"],
                        "vs_bf16": ms["bf16"] / ms[key],
                        "vs_int4": ms[f"int4 g64 sym/{isa}"] / ms[key],
                        "bytes_vs_bf16": stored / (weight.numel() * 2),
                    }
                )
                print(json.dumps(rows[-1]), flush=True)
    return rows


def write_markdown(data: dict[str, Any], stem: str) -> None:
    lines = [
        "# Batch-1 GEMV of the packed formats against bf16, one thread",
        "",
        f"Machine: {data['machine']} ({data['cpu_flags']}); {data['date']}.",
        "",
        f"Command: `{data['command']}`",
        "",
        "One activation row (bf16, or fp32 where the table says) through each format's module "
        "(its decode kernel), interleaved "
        "with torch's bf16 `F.linear` on the same weight; medians of per-round means. `vs bf16` "
        "and `vs int4`: time ratios (above 1: faster). `build`: native = this CPU's build; avx2 "
        "= the AVX2 build forced by COMPRESS_CPU_ISA. `bytes`: stored tensors over bf16's.",
        "",
        "| shape | activations | format | build | kernel | ms | bf16 ms | vs bf16 | vs int4 "
        "| bytes |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in data["rows"]:
        lines.append(
            f"| {row['shape']} | {row['activations']} | {row['format']} | {row['build']} | "
            f"{row['kernel']} | "
            f"{row['ms']:.3f} | {row['bf16_ms']:.3f} | **{row['vs_bf16']:.2f}x** | "
            f"{row['vs_int4']:.2f}x | {row['bytes_vs_bf16']:.3f} |"
        )
    (BENCHMARKS / f"{stem}.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--isa", nargs="*", default=[], help="also these lower native builds")
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--calls", type=int, default=10)
    parser.add_argument(
        "--dtype",
        nargs="*",
        default=["bfloat16"],
        choices=["bfloat16", "float32"],
        help="activation dtypes of the packed kernels (bf16's GEMV is always bf16)",
    )
    parser.add_argument(
        "--formats",
        nargs="*",
        default=list(FORMATS),
        choices=list(FORMATS),
        help="formats to time (int4 g64 sym, the ratios' reference, is always timed)",
    )
    parser.add_argument(
        "--out", default="gemv", help="file stem under benchmarks/ (one per machine kept)"
    )
    args = parser.parse_args()
    selected = ["int4 g64 sym", *(name for name in args.formats if name != "int4 g64 sym")]
    data = {
        "machine": machine(),
        "cpu_flags": cpu_flags(),
        "date": datetime.date.today().isoformat(),
        "command": "python scripts/bench_gemv.py " + " ".join(sys.argv[1:]),
        "rows": [
            row
            for name in args.dtype
            for row in gemv_rows(args.runs, args.calls, args.isa, name, selected)
        ],
    }
    (BENCHMARKS / f"{args.out}.json").write_text(json.dumps(data, indent=2) + "\n")
    write_markdown(data, args.out)


if __name__ == "__main__":
    main()
