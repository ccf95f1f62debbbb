"""Speed of the Triton kernels against a dense fp16 matmul on the same GPU, in the same run.

For each shape, bit width and row count: the median time of the kernel ``QuantLinear`` would
pick on CUDA (split-K GEMV up to ``GEMV_MAX_ROWS`` rows, dequant-GEMM beyond), of both kernels
explicitly, and of ``torch.nn.functional.linear`` with a dense fp16 weight; the speed-up over
fp16; and the achieved bandwidth (packed weight + scales + activations read, output written)
against the device's measured copy bandwidth. Every kernel's output is checked against the fp16
matmul of the dequantized weight before it is timed.

    python scripts/bench_triton.py                 # -> benchmarks/triton.json + .md
    python scripts/bench_triton.py --bits 4 8 --rows 1 --out /tmp/triton

Needs a CUDA GPU and the ``gpu`` extra (triton); it refuses to run otherwise, since the CPU
interpreter says nothing about speed.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import statistics
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
SHAPES = [(4096, 4096), (11008, 4096), (1536, 576)]  # (out_features, in_features)
ROWS = [1, 8, 32, 512]
BITS = [2, 3, 4, 5, 6, 8]
GROUP = 64


def refuse(message: str) -> None:
    print(f"bench_triton: {message}", file=sys.stderr)
    raise SystemExit(2)


def median_ms(fn: Any, *, warmup: int = 10, reps: int = 50) -> float:
    """Median of ``reps`` CUDA-event timings of ``fn`` after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(stop))
    return statistics.median(times)


def copy_bandwidth_gbs() -> float:
    """Device-to-device copy of 1 GiB: bytes read + written per second."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), warmup=3, reps=10)
    return 2 * src.numel() / (ms * 1e-3) / 1e9


def packed_module(out_features: int, in_features: int, bits: int) -> Any:
    from compress.formats.int import IntFormat, quantize_int
    from compress.formats.int.linear import QuantLinear
    from compress.ir import QuantizedWeight

    torch.manual_seed(0)
    linear = nn.Linear(in_features, out_features, bias=False)
    fmt = IntFormat(bits=bits, group_size=GROUP, symmetric=True)
    codes, scales, zeros = quantize_int(linear.weight, fmt)
    return QuantLinear.from_record(linear, QuantizedWeight(codes, scales, zeros, fmt)).cuda()


def bench_case(module: Any, rows: int, tk: Any) -> dict[str, Any]:
    x = torch.randn(rows, module.in_features, dtype=torch.float16, device="cuda")
    dense = module.dequantize(torch.float16)
    want = F.linear(x, dense)
    kernels = {"gemv": tk.splitk_gemv, "gemm": tk.dequant_gemm}
    result: dict[str, Any] = {}
    for name, kernel in kernels.items():
        got = kernel(module.packed(), x)
        error = float((got.float() - want.float()).abs().max() / want.float().abs().max())
        if error > 2e-2:
            raise RuntimeError(f"{name} disagrees with fp16 matmul: relative error {error:.3g}")
        result[f"{name}_ms"] = median_ms(lambda kernel=kernel: kernel(module.packed(), x))
        result[f"{name}_error"] = error
    result["fp16_ms"] = median_ms(lambda: F.linear(x, dense))
    chosen = "gemv" if rows <= tk.GEMV_MAX_ROWS else "gemm"
    result["chosen"] = chosen
    result["chosen_ms"] = result[f"{chosen}_ms"]
    result["speedup_vs_fp16"] = result["fp16_ms"] / result["chosen_ms"]
    weight_bytes = sum(b.numel() * b.element_size() for b in module.buffers())
    moved = weight_bytes + x.numel() * 2 + rows * module.out_features * 2
    result["weight_bytes"] = weight_bytes
    result["achieved_gbs"] = moved / (result["chosen_ms"] * 1e-3) / 1e9
    return result


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "# Triton kernels vs dense fp16 matmul",
        "",
        f"Machine: {report['device']}; torch {report['torch']}, triton {report['triton']}; "
        f"{report['created']}.",
        f"Command: `{report['command']}`",
        f"Measured device copy bandwidth: {report['copy_gbs']:.0f} GB/s. Weights: codes of"
        f" `bits` bits, group {GROUP}, symmetric; fp16 activations; medians of CUDA-event timings;"
        " `kernel` is the one `QuantLinear` picks for that row count.",
        "",
        "| shape (N x K) | rows | bits | kernel | ms | fp16 ms | speed-up | GB/s | % of copy |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for case in report["cases"]:
        lines.append(
            f"| {case['out_features']}x{case['in_features']} | {case['rows']} | {case['bits']} "
            f"| {case['chosen']} | {case['chosen_ms']:.4f} | {case['fp16_ms']:.4f} "
            f"| {case['speedup_vs_fp16']:.2f}x | {case['achieved_gbs']:.0f} "
            f"| {100 * case['achieved_gbs'] / report['copy_gbs']:.0f}% |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bits", type=int, nargs="+", default=BITS)
    parser.add_argument("--rows", type=int, nargs="+", default=ROWS)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "triton")
    args = parser.parse_args(argv)

    if not torch.cuda.is_available():
        refuse("no CUDA device: Triton kernel timings need a GPU (nothing was measured)")
    try:
        import triton
    except ImportError:
        refuse("triton is not installed: pip install -e '.[gpu]'")
    from compress.formats.int import triton_kernels as tk

    if tk.INTERPRETED:
        refuse("TRITON_INTERPRET is set: unset it to time compiled kernels")

    given = sys.argv[1:] if argv is None else argv
    report: dict[str, Any] = {
        "device": f"{torch.cuda.get_device_name()} ({platform.node()})",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": "python scripts/bench_triton.py " + shlex.join(given),
        "copy_gbs": copy_bandwidth_gbs(),
        "cases": [],
    }
    for out_features, in_features in SHAPES:
        for bits in args.bits:
            module = packed_module(out_features, in_features, bits)
            for rows in args.rows:
                case = bench_case(module, rows, tk)
                case.update(out_features=out_features, in_features=in_features)
                case.update(bits=bits, rows=rows)
                report["cases"].append(case)
                print(
                    f"{out_features}x{in_features} rows={rows} int{bits}: {case['chosen']} "
                    f"{case['chosen_ms']:.4f} ms, fp16 {case['fp16_ms']:.4f} ms "
                    f"({case['speedup_vs_fp16']:.2f}x)",
                    flush=True,
                )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2))
    args.out.with_suffix(".md").write_text(markdown(report))


if __name__ == "__main__":
    main()
