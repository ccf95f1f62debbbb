"""Int8 activations for prefill on a CPU without AMX: what they would buy, what they cost.

On an AVX-512-BF16 CPU without AMX (Zen 4), torch's bf16 GEMM is compute-bound from a few dozen
rows, and our prefill path (weights dequantized to bf16 tiles for that same GEMM) pays the
dequantization on top of it, so it cannot pass 1.0x bf16 by construction. Integer dot products
(VNNI ``vpdpbusd``: four int8 products per 32-bit lane, against two for ``vdpbf16ps``) are the
only faster arithmetic such a CPU has, and they need int8 activations. This measures both sides
in one run:

- speed (one thread, 4096x4096, medians): bf16 ``F.linear``; ``torch._int_mm`` (int8 x int8 ->
  int32, oneDNN's VNNI GEMM) alone; and with what an int8 route adds in torch ops (per-token
  activation quantization, the int32 -> float rescale). Weights re-expanded from int4 codes to an
  int8 per-channel grid are not timed: no kernel for that exists; this is the ceiling.
- cost: KL of the fp32 SmolLM2 against itself with every decoder Linear's input rounded to bf16,
  to int8 per token, and to int8 per group of 32 / 64 inputs (the evaluation windows).

    python scripts/bench_int8_prefill.py            # -> benchmarks/int8_prefill.{json,md}
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from benchrows import BENCHMARKS, cpu_flags, machine, smollm2_and_eval_windows

from compress.utils.activations import quantize_activations

ROWS = (8, 32, 128, 512)
SIZE = 4096


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()
    samples = []
    for _ in range(repeats):
        start = time.process_time()
        fn()
        samples.append(time.process_time() - start)
    return 1e3 * statistics.median(samples)


def quantize_rows_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = x.abs().amax(-1, keepdim=True).float().clamp_min(1e-8) / 127
    return torch.round(x.float() / scale).to(torch.int8), scale


def speed_rows(repeats: int) -> list[dict[str, Any]]:
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(SIZE, SIZE, generator=gen).bfloat16()
    weight_int8 = torch.randint(-127, 128, (SIZE, SIZE), generator=gen, dtype=torch.int8)
    weight_kn = weight_int8.t().contiguous()  # (K, N): the layout _int_mm runs fastest on
    channel_scale = torch.rand(SIZE, generator=gen) / 127
    rows = []
    for count in ROWS:
        x = torch.randn(count, SIZE, generator=gen).bfloat16()
        x_int8, _ = quantize_rows_int8(x)

        def int8_route(x: torch.Tensor = x) -> torch.Tensor:
            codes, scale = quantize_rows_int8(x)
            return (torch._int_mm(codes, weight_kn).float() * scale * channel_scale).bfloat16()

        bf16 = median_ms(lambda x=x: F.linear(x, weight), repeats)
        int_mm = median_ms(lambda x8=x_int8: torch._int_mm(x8, weight_kn), repeats)
        route = median_ms(int8_route, repeats)
        row = {"rows": count, "bf16_ms": bf16, "int_mm_ms": int_mm, "int8_route_ms": route}
        row["int_mm_x_bf16"] = bf16 / int_mm
        row["int8_route_x_bf16"] = bf16 / route
        print(json.dumps(row))
        rows.append(row)
    return rows


def rounded_input(mode: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The activation rounding of ``mode``: bf16, int8 per token (the ``act_quant`` pass's own
    rounding), or int8 per group of N inputs (the same rounding, each group its own scale)."""
    if mode == "bf16":
        return lambda x: x.bfloat16().to(x.dtype)
    if mode == "int8 per token":
        return lambda x: quantize_activations(x, "int8")
    group = int(mode.rsplit(" ", 1)[1])

    def rounded(x: torch.Tensor) -> torch.Tensor:
        blocks = x.reshape(*x.shape[:-1], x.shape[-1] // group, group)
        return quantize_activations(blocks, "int8").reshape(x.shape)

    return rounded


def quality_rows(windows: int) -> list[dict[str, Any]]:
    from compress.evaluate.quality import compare_to_reference

    model, _, token_windows = smollm2_and_eval_windows(windows, dtype="float32")
    rows = []
    for mode in ("bf16", "int8 per token", "int8 per group 64", "int8 per group 32"):
        student = copy.deepcopy(model)
        rounding = rounded_input(mode)
        for module in student.model.layers.modules():
            if isinstance(module, torch.nn.Linear):
                module.register_forward_pre_hook(lambda _m, args, r=rounding: (r(args[0]),))
        metrics = compare_to_reference(student, model, token_windows, batch_size=4)
        row = {"activations": mode, "kl": metrics.kl_mean, "top1": metrics.top1_agreement}
        print(json.dumps(row))
        rows.append(row)
    return rows


def write_markdown(out: Path, data: dict[str, Any]) -> None:
    meta = data["meta"]
    lines = [
        "# Int8 activations for prefill: what they would buy and cost",
        "",
        f"Command: `{meta['command']}`  ",
        f"Machine: {meta['machine']} ({meta['cpu']}); {meta['date']}.",
        "",
        "## Speed, 4096x4096, one thread (process CPU time, medians)",
        "",
        "| rows | bf16 F.linear ms | _int_mm ms | x bf16 | int8 route ms | x bf16 |",
        "|---|---|---|---|---|---|",
    ]
    for r in data["speed"]:
        lines.append(
            f"| {r['rows']} | {r['bf16_ms']:.2f} | {r['int_mm_ms']:.2f} | "
            f"{r['int_mm_x_bf16']:.2f} | {r['int8_route_ms']:.2f} | {r['int8_route_x_bf16']:.2f} |"
        )
    lines += [
        "",
        "`int8 route`: per-token int8 activations, `_int_mm`, the float rescale (torch ops); a "
        "weight re-expanded from packed codes to int8 each call would add to it.",
        "",
        f"## Cost: fp32 SmolLM2-135M, decoder Linear inputs rounded, {meta['windows']} x 512 "
        "evaluation tokens",
        "",
        "| activations | KL vs fp32 | top-1 |",
        "|---|---|---|",
    ]
    for r in data["quality"]:
        lines.append(f"| {r['activations']} | {r['kl']:.5f} | {100 * r['top1']:.1f}% |")
    out.write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--windows", type=int, default=32)
    parser.add_argument("--out", type=Path, default=BENCHMARKS / "int8_prefill")
    args = parser.parse_args()
    meta = {
        "command": "python scripts/bench_int8_prefill.py",
        "machine": machine(),
        "cpu": cpu_flags(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "windows": args.windows,
    }
    threads = torch.get_num_threads()
    speed = speed_rows(args.repeats)
    torch.set_num_threads(threads)
    data = {"meta": meta, "speed": speed, "quality": quality_rows(args.windows)}
    args.out.with_suffix(".json").write_text(json.dumps(data, indent=1) + "\n")
    write_markdown(args.out.with_suffix(".md"), data)


if __name__ == "__main__":
    main()
