"""What 2:4 sparsity buys once it is stored sparse: GEMV time and bytes of the N:M sparse int4
format against our dense int4 kernel and torch's bf16 GEMV, and the decoder bytes of an export.

``--gemv``: batch-1 GEMV (one activation row) on one thread, for each shape: torch
``F.linear`` in bf16, our dense int4 g64 ``cpu_gemv`` (``QuantLinear``) and the 2:4 int4 g64
``cpu_gemv`` (``NMLinear``) on the same codes (a random weight, magnitude 2:4, round to
nearest), interleaved, ``--runs`` rounds of ``--calls`` calls each; medians of the per-round
means. ``--isa`` repeats the int4 and 2:4 kernels with a lower native build (the AVX2 one, as on
CPUs without AVX-512), in the same process.

``--export DIR``: the decoder-layer bytes of an export written with ``sparse: true``, against the
dense int4 layout of the very same codes (each ``NMLinear``'s codes re-packed as the
``QuantLinear`` a ``sparse: false`` export stores).

    python scripts/bench_nm.py --gemv --isa avx2           # -> benchmarks/nm.json, nm.md
    python scripts/bench_nm.py --export out/smollm2-2of4-sparsegpt-w4 --merge
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

from benchrows import BENCHMARKS, cpu_flags, machine

SHAPES = [(4096, 4096), (11008, 4096), (1536, 576), (576, 1536)]
"""(out, in): the issue's 4096², a 7B MLP projection, SmolLM2's up/gate and down projections."""


def _timed(call: Any, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        call()
    return (time.perf_counter() - start) / calls


def gemv_rows(runs: int, calls: int, isas: list[str]) -> list[dict[str, Any]]:
    import torch
    import torch.nn.functional as F

    from compress.formats.int.linear import QuantLinear
    from compress.formats.nm.linear import NMLinear
    from compress.formats.nm.spec import NMIntFormat
    from compress.ir import QuantizedWeight

    torch.set_num_threads(1)
    rows = []
    for out_features, in_features in SHAPES:
        torch.manual_seed(0)
        linear = torch.nn.Linear(in_features, out_features, bias=False)
        sparse_fmt = NMIntFormat(2, 4, 4, 64)
        codes, scales, zeros = sparse_fmt.quantize(linear.weight.detach())
        sparse = NMLinear.from_record(linear, QuantizedWeight(codes, scales, zeros, sparse_fmt))
        dense = QuantLinear.from_record(
            linear, QuantizedWeight(codes, scales, zeros, sparse_fmt.values)
        )
        weight = linear.weight.detach().to(torch.bfloat16)
        x = torch.randn(1, in_features)
        xb = x.to(torch.bfloat16)
        torch.testing.assert_close(sparse(x), dense(x), rtol=1e-4, atol=1e-3)
        calls_of: dict[str, Any] = {"bf16": partial(F.linear, xb, weight)}
        for isa in ["native", *isas]:
            calls_of[f"int4/{isa}"] = (isa, partial(dense, x))
            calls_of[f"2:4/{isa}"] = (isa, partial(sparse, x))
        times: dict[str, list[float]] = {name: [] for name in calls_of}
        for _ in range(runs):
            for name, entry in calls_of.items():
                if isinstance(entry, tuple):
                    isa, call = entry
                    if isa == "native":
                        os.environ.pop("COMPRESS_CPU_ISA", None)
                    else:
                        os.environ["COMPRESS_CPU_ISA"] = isa
                    call()  # the kernel choice (and a build) happen outside the timing
                else:
                    call = entry
                    call()
                times[name].append(_timed(call, calls))
        os.environ.pop("COMPRESS_CPU_ISA", None)
        median = {name: statistics.median(values) * 1e3 for name, values in times.items()}
        bytes_of = {
            "int4": sum(b.numel() * b.element_size() for b in dense.buffers()),
            "2:4": sum(b.numel() * b.element_size() for b in sparse.buffers()),
            "bf16": weight.numel() * 2,
        }
        for isa in ["native", *isas]:
            rows.append(
                {
                    "shape": f"1x{in_features} · {out_features}x{in_features}",
                    "build": isa,
                    "bf16_ms": median["bf16"],
                    "int4_ms": median[f"int4/{isa}"],
                    "nm_ms": median[f"2:4/{isa}"],
                    "nm_vs_int4": median[f"int4/{isa}"] / median[f"2:4/{isa}"],
                    "nm_vs_bf16": median["bf16"] / median[f"2:4/{isa}"],
                    "int4_bytes": bytes_of["int4"],
                    "nm_bytes": bytes_of["2:4"],
                    "bytes_ratio": bytes_of["2:4"] / bytes_of["int4"],
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    return rows


def export_bytes(folder: Path) -> dict[str, Any]:
    """Decoder-layer bytes as stored, and as the dense int4 layout of the same codes."""
    import torch
    from transformers import AutoModelForCausalLM

    import compress  # noqa: F401  (our loader)
    from compress.formats.int.linear import QuantLinear
    from compress.formats.nm.linear import NMLinear
    from compress.ir import QuantizedWeight

    model = AutoModelForCausalLM.from_pretrained(folder)
    stored = dense = 0
    sparse_layers = 0
    for name, module in model.named_modules():
        if ".layers." not in name or list(module.children()):
            continue
        own = sum(t.numel() * t.element_size() for t in module.buffers(recurse=False))
        own += sum(p.numel() * p.element_size() for p in module.parameters(recurse=False))
        stored += own
        if isinstance(module, NMLinear):
            sparse_layers += 1
            w = module.packed()
            record = QuantizedWeight(w.codes(), w.scales, w.zeros(), module.fmt.values)
            linear = torch.nn.Linear(module.in_features, module.out_features, bias=False)
            packed = QuantLinear.from_record(linear, record)
            dense += sum(b.numel() * b.element_size() for b in packed.buffers())
        else:
            dense += own
    return {
        "export": str(folder),
        "sparse_layers": sparse_layers,
        "decoder_bytes": stored,
        "dense_int4_decoder_bytes": dense,
        "ratio": stored / dense,
        "safetensors_bytes": sum(p.stat().st_size for p in folder.glob("*.safetensors")),
    }


def write_markdown(data: dict[str, Any], out: Path) -> None:
    lines = [
        "# 2:4 sparse int4 (nm_int): GEMV and bytes",
        "",
        f"Machine: {data['machine']} ({data['cpu_flags']}); {data['date']}.",
        "",
    ]
    if data.get("gemv"):
        lines += [
            f"Command: `{data['gemv_command']}`",
            "",
            "Batch-1 GEMV, one thread, medians of interleaved rounds (ms). int4: our dense int4 "
            "g64 sym `cpu_gemv`; 2:4: the nm_int `cpu_gemv` on the same codes, kept half only. "
            "`build`: native = this CPU's own build; avx2 = the AVX2 build forced by "
            "COMPRESS_CPU_ISA (the path of CPUs without AVX-512). Bytes: the stored tensors.",
            "",
            "| shape | build | bf16 ms | int4 ms | 2:4 ms | 2:4 vs int4 | 2:4 vs bf16 "
            "| bytes 2:4 / int4 |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for row in data["gemv"]:
            lines.append(
                f"| {row['shape']} | {row['build']} | {row['bf16_ms']:.3f} | "
                f"{row['int4_ms']:.3f} | {row['nm_ms']:.3f} | **{row['nm_vs_int4']:.2f}x** | "
                f"{row['nm_vs_bf16']:.2f}x | {row['bytes_ratio']:.3f} |"
            )
        lines.append("")
    if data.get("export"):
        e = data["export"]
        lines += [
            f"Command: `{data['export_command']}`",
            "",
            f"Export `{e['export']}`: {e['sparse_layers']} layers stored 2:4. Decoder-layer "
            f"bytes {e['decoder_bytes']:,} against {e['dense_int4_decoder_bytes']:,} for the "
            f"dense int4 layout of the same codes: **{e['ratio']:.3f}**. Safetensors on disk: "
            f"{e['safetensors_bytes']:,} bytes.",
            "",
        ]
    out.write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gemv", action="store_true", help="time the GEMV kernels")
    parser.add_argument("--isa", nargs="*", default=[], help="also these lower native builds")
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--export", type=Path, help="bytes of a sparse export")
    parser.add_argument("--merge", action="store_true", help="keep the other saved part")
    args = parser.parse_args()
    out = BENCHMARKS / "nm.json"
    data: dict[str, Any] = json.loads(out.read_text()) if args.merge and out.exists() else {}
    data.update(machine=machine(), cpu_flags=cpu_flags(), date=datetime.date.today().isoformat())
    command = "python scripts/bench_nm.py " + " ".join(sys.argv[1:])
    if args.gemv:
        data["gemv"] = gemv_rows(args.runs, args.calls, args.isa)
        data["gemv_command"] = command
    if args.export:
        data["export"] = export_bytes(args.export)
        data["export_command"] = command
        print(json.dumps(data["export"]))
    out.write_text(json.dumps(data, indent=2) + "\n")
    write_markdown(data, BENCHMARKS / "nm.md")


if __name__ == "__main__":
    main()
