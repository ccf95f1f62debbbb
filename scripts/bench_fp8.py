"""FP8 weight decoding on CPU: what each way of turning codes into a dense weight costs, against
the bf16 GEMV it would feed (one thread, one activation row).

    python scripts/bench_fp8.py            # 4096 x 4096, prints milliseconds per call

The reference kernel of :mod:`compress.formats.fp8.kernels` dequantizes the whole weight on every
call; this measures whether a torch-only decode could pay, before a fused native kernel exists.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from compress.formats.fp8 import FP8Format, quantize_fp8


def timed(fn: Callable[[], object], repeats: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats * 1e3


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    n = args.size
    fmt = FP8Format("e4m3", "channel")
    weight = torch.randn(n, n, generator=torch.Generator().manual_seed(0)) * 0.02
    codes, scales, _ = quantize_fp8(weight, fmt)
    dense = fmt.dequantize(codes, scales, None, torch.bfloat16)
    x = torch.randn(1, n).to(torch.bfloat16)
    table = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(fmt.torch_dtype).float()

    def bits_via_fp16() -> torch.Tensor:
        # E4M3 sign | exponent-mantissa << 7 is an fp16 bit pattern worth 2**-8 of the value
        h = codes.to(torch.int16)
        half = (((h & 0x80) << 8) | ((h & 0x7F) << 7)).view(torch.float16)
        return (half.to(torch.float32) * (scales * 256)).to(torch.bfloat16)

    def scaled_mm() -> torch.Tensor:
        one = torch.tensor(1.0)
        return torch._scaled_mm(
            x.to(torch.float8_e4m3fn),
            codes.view(fmt.torch_dtype).t(),
            scale_a=one,
            scale_b=one,
            out_dtype=torch.bfloat16,
        )

    rows: dict[str, float] = {
        "bf16 F.linear (GEMV, dense weight)": timed(lambda: F.linear(x, dense), args.repeats),
        "reference: fp8 cast -> fp32 x scale -> bf16": timed(
            lambda: fmt.dequantize(codes, scales, None, torch.bfloat16), args.repeats
        ),
        "reference kernel, whole call": timed(
            lambda: F.linear(x, fmt.dequantize(codes, scales, None, torch.bfloat16)),
            args.repeats,
        ),
        "decode through fp16 bit patterns (int16 ops)": timed(bits_via_fp16, args.repeats),
        "256-entry table gathered by int32 codes": timed(
            lambda: table[codes.to(torch.int32)], args.repeats
        ),
    }
    try:
        rows["torch._scaled_mm (fp8 x fp8, CPU)"] = timed(scaled_mm, 2)
    except RuntimeError as error:  # not every build has a CPU _scaled_mm
        rows["torch._scaled_mm (fp8 x fp8, CPU)"] = float("nan")
        print(f"_scaled_mm: {error}")
    assert torch.equal(bits_via_fp16(), dense)  # the same weight, bit for bit
    print(json.dumps({"size": n, "threads": 1, "ms": rows}, indent=1))


if __name__ == "__main__":
    main()
