"""Speed of the packed-weight CPU kernels against bf16 torch matmul, and end-to-end decode.

Kernels: per bit width and shape, the median time of ``QuantLinear``'s selected CPU kernel and
of a dense bf16 (and fp32) ``F.linear`` measured in the same run, the ratio, and the GB/s the
kernel achieves on its packed bytes against the machine's measured copy bandwidth. Each timed
call reads a different copy of the weights (enough copies to overflow the last-level cache),
as decode does: no shape is timed out of cache. Run at all cores and at one thread (the
single-thread ratio is the steadier one on a shared machine).

End-to-end: tokens/s of ``generate`` (64 new tokens, greedy, batch 1) for SmolLM2-135M
exported at int8 / int4 / int3 (RTN, group 64, symmetric) against the bf16 model, the resident
memory of each (own process), and where the int4 model's decode time goes.

    python scripts/bench_kernels.py                  # all -> benchmarks/kernels.{json,md}
    python scripts/bench_kernels.py --skip-e2e --reps 15
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
MODEL = "smollm2-135m"
NEW_TOKENS = 64
LLC_BYTES = 32 * 2**20  # this machine's L3; copies of the weights add up to 3x this

# (label, rows, out_features N, in_features K)
SHAPES = [
    ("1x4096 · 4096x4096", 1, 4096, 4096),
    ("1x4096 · 11008x4096", 1, 11008, 4096),
    ("1x576 · 1536x576", 1, 1536, 576),
    ("8x4096 · 4096x4096", 8, 4096, 4096),
    ("32x4096 · 4096x4096", 32, 4096, 4096),
]
BITS = [2, 3, 4, 5, 6, 8]
E2E_BITS = [8, 4, 3]
NOTES = [
    "- bf16/fp16 activations take `cpu_gemv`'s int16 path: x is rounded to int16 per chunk of "
    "64-128 inputs (finer than bf16 itself, but for elements far below the chunk's largest) and "
    "one `vpmaddwd` multiplies 16 codes with 16 activations, so a 64-code block costs about 16 "
    "vector instructions where the exact fp32 path (fp32 activations, and 7-bit codes) needs "
    "about 40: shift, mask, int->float convert and FMA per 8 codes.",
    "- On a CPU shared with other jobs, multi-threaded timings snap to scheduler time slices "
    "(medians of exactly 4, 8, 12 ms): a 2-thread parallel region waits for a descheduled "
    "thread. The one-thread tables are the steadier comparison there.",
    "- torch's bf16 matmul on this CPU (AVX2, no native bf16) is slower than its fp32 one, "
    "which flatters ratios against bf16; the fp32 columns are given for that reason.",
    "- SmolLM2's own shapes (K=576, group 64) gain less than 4096x4096: each row has only nine "
    "64-code blocks, so the per-row work (scales, the reduction of chunk sums) weighs more, and "
    "a 1536x576 matrix is too small to split over two threads.",
]


def timed(fn: Callable[[], Any], reps: int) -> tuple[float, float]:
    """(median, min) seconds of ``reps`` calls after two warm-up calls."""
    fn()
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), min(times)


def rotating(make: Callable[[], Any], nbytes: int) -> Callable[[], Any]:
    """A callable returning one of enough copies to overflow the last-level cache."""
    copies = [make() for _ in range(max(2, min(64, math.ceil(3 * LLC_BYTES / nbytes))))]
    state = {"i": 0}

    def next_copy() -> Any:
        state["i"] = (state["i"] + 1) % len(copies)
        return copies[state["i"]]

    return next_copy


def machine_bandwidth() -> dict[str, float]:
    """Copy (read + write bytes) and read-only GB/s over 256 MiB buffers, all cores; and the
    read GB/s of one thread, the bound of the one-thread kernel tables."""
    src = torch.ones(64 * 2**20, dtype=torch.float32)
    dst = torch.empty_like(src)
    copy_s, _ = timed(lambda: dst.copy_(src), 10)
    read_s, _ = timed(lambda: src.sum(), 10)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    read_1t_s, _ = timed(lambda: src.sum(), 10)
    torch.set_num_threads(threads)
    nbytes = src.numel() * 4
    return {
        "copy_gbs": 2 * nbytes / copy_s / 1e9,
        "read_gbs": nbytes / read_s / 1e9,
        "read_gbs_1t": nbytes / read_1t_s / 1e9,
    }


# Issue targets at batch 1, 4096x4096: speed-up over bf16 torch matmul in the same run.
TARGETS = {4: 3.0, 8: 1.8, 2: 4.0, 3: 3.0}
E2E_TARGET = 1.3  # int4 export over the bf16 model, tokens/s


def packed_module(bits: int, n: int, k: int, symmetric: bool = True) -> Any:
    """A QuantLinear with random codes (every byte pattern is a valid stream)."""
    from compress.export.qlinear import QuantLinear
    from compress.formats import IntFormat

    group = 128 if k % 128 == 0 else 64
    module = QuantLinear(k, n, IntFormat(bits, group, symmetric), dtype=torch.bfloat16)
    module.qweight.copy_(torch.randint(0, 256, module.qweight.shape, dtype=torch.uint8))
    module.scales.copy_(torch.rand(module.scales.shape) * 0.01 + 0.001)
    if module.qzeros is not None:
        module.qzeros.copy_(torch.randint(0, 256, module.qzeros.shape, dtype=torch.uint8))
    return module


def module_bytes(module: Any) -> int:
    return sum(b.numel() * b.element_size() for b in module.buffers())


def bench_kernels(reps: int, threads: int, symmetric: bool = True) -> list[dict[str, Any]]:
    from compress.export import kernels

    torch.set_num_threads(threads)
    rows_out = []
    for label, rows, n, k in SHAPES:
        x16 = torch.randn(rows, k, dtype=torch.bfloat16)
        dense: dict[str, float] = {}
        for dtype in (torch.bfloat16, torch.float32):
            weight = rotating(lambda d=dtype, n=n, k=k: torch.randn(n, k, dtype=d), n * k * 2)
            x = x16.to(dtype)
            dense[str(dtype).removeprefix("torch.")] = timed(
                lambda x=x, weight=weight: F.linear(x, weight()), reps
            )[0]
        for bits in BITS:
            probe = packed_module(bits, n, k, symmetric)
            nbytes = module_bytes(probe)
            kernel = probe._select(rows=rows, dtype=torch.bfloat16)
            module = rotating(lambda b=bits, n=n, k=k: packed_module(b, n, k, symmetric), nbytes)
            median, best = timed(
                lambda m=module, name=kernel, x=x16: kernels.run(name, m(), x), reps
            )
            rows_out.append(
                {
                    "shape": label,
                    "rows": rows,
                    "N": n,
                    "K": k,
                    "bits": bits,
                    "format": f"int{bits} g{probe.fmt.group_size} "
                    + ("sym" if symmetric else "asym"),
                    "threads": threads,
                    "kernel": kernel,
                    "packed_bytes": nbytes,
                    "median_ms": 1e3 * median,
                    "min_ms": 1e3 * best,
                    "bf16_ms": 1e3 * dense["bfloat16"],
                    "fp32_ms": 1e3 * dense["float32"],
                    "speedup_vs_bf16": dense["bfloat16"] / median,
                    "speedup_vs_fp32": dense["float32"] / median,
                    "achieved_gbs": nbytes / median / 1e9,
                }
            )
            print(
                f"[{threads}t] {label:22s} int{bits}: {1e3 * median:7.3f} ms "
                f"(bf16 {1e3 * dense['bfloat16']:7.3f}) x{dense['bfloat16'] / median:5.2f} "
                f"{nbytes / median / 1e9:5.1f} GB/s [{kernel}]",
                file=sys.stderr,
            )
    return rows_out


# ---------------------------------------------------------------------------- end to end


def make_exports(root: Path) -> dict[int, Path]:
    """RTN exports of SmolLM2 (group 64 symmetric), reused when already in ``root``."""
    from compress.models import load_model
    from compress.pipeline import Pipeline
    from compress.recipe import parse_recipe

    folders = {}
    for bits in E2E_BITS:
        folder = root / f"smollm2-rtn-w{bits}"
        if not (folder / "config.json").exists():
            # from the bf16 model: the unquantized tensors (embeddings, norms) are stored in
            # bf16 as in the baseline, not in the embedded checkpoint's fp32
            recipe = parse_recipe(
                {"model": MODEL, "passes": [{"pass": "rtn", "bits": bits, "group_size": 64}]}
            )
            model, tokenizer = load_model(MODEL, dtype="bfloat16")
            Pipeline(model, recipe.passes, tokenizer=tokenizer, export=folder).run()
        folders[bits] = folder
    return folders


def run_e2e(variant: str, folder: str | None, runs: int, threads: int) -> dict[str, Any]:
    """One model in this process: load, generate 64 tokens ``runs`` times, RSS, profile."""
    import psutil

    if threads:
        torch.set_num_threads(threads)

    import compress  # noqa: F401  (registers the transformers plug-in)
    from compress.data import load_texts
    from compress.export.qlinear import QuantLinear
    from compress.models import load_tokenizer, model_folder

    process = psutil.Process()
    rss_start = process.memory_info().rss
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(MODEL)
    dtype = torch.float32 if variant == "fp32" else torch.bfloat16
    # straight into the measured dtype: no dense fp32 copy inflates the resident memory
    model: Any = AutoModelForCausalLM.from_pretrained(folder or model_folder(MODEL), dtype=dtype)
    model.eval()
    text = load_texts("builtin:wiki", "evaluation")[0]["text"][:4000]
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :32]

    def generate(tokens: int = NEW_TOKENS) -> None:
        with torch.inference_mode():
            out = model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
        assert out.shape[1] == ids.shape[1] + tokens

    generate(4)  # warm-up (first-call kernel builds, allocator)
    times = []
    for _ in range(runs):  # timed without hooks: they cost microseconds per call
        start = time.perf_counter()
        generate()
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)

    # Where the time goes, from one more run: hooks time every QuantLinear and the (dense)
    # lm_head call (their own overhead lands in those buckets).
    buckets = {"quantized linears": 0.0, "lm_head": 0.0}
    starts: dict[int, float] = {}
    handles = []
    for module in model.modules():
        bucket = "quantized linears" if isinstance(module, QuantLinear) else None
        if module is model.get_output_embeddings():
            bucket = "lm_head"
        if bucket is None:
            continue

        def pre(mod: Any, args: Any) -> None:
            starts[id(mod)] = time.perf_counter()

        def post(mod: Any, args: Any, out: Any, bucket: str = bucket) -> None:
            buckets[bucket] += time.perf_counter() - starts.pop(id(mod))

        handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    start = time.perf_counter()
    generate()
    total = time.perf_counter() - start
    for handle in handles:
        handle.remove()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        generate(8)
    top_ops = [
        {"op": e.key, "self_cpu_ms": e.self_cpu_time_total / 1e3, "calls": e.count}
        for e in sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:8]
    ]
    kernels_used = sorted({m.kernel for m in model.modules() if isinstance(m, QuantLinear)})
    return {
        "variant": variant,
        "tokens_per_s": NEW_TOKENS / seconds,
        "seconds": seconds,
        "runs": times,
        "rss_mb": process.memory_info().rss / 2**20,
        "rss_model_mb": (process.memory_info().rss - rss_start) / 2**20,
        # rss without file-backed pages (the mmapped safetensors file the loader read)
        "anon_mb": (process.memory_info().rss - process.memory_info().shared) / 2**20,
        "model_tensor_mb": sum(
            t.numel() * t.element_size()
            for t in [*model.parameters(), *model.buffers()]
            if t.device.type != "meta"
        )
        / 2**20,
        "profile": {k: v / total for k, v in buckets.items()}
        | {"other (attention, norms, generate loop)": 1 - sum(buckets.values()) / total},
        "top_ops_8_tokens": top_ops,
        "kernels": kernels_used,
        "threads": torch.get_num_threads(),
    }


def bench_e2e(export_root: Path, runs: int, threads: int) -> list[dict[str, Any]]:
    folders = make_exports(export_root)
    variants: list[tuple[str, str | None]] = [("bf16", None), ("fp32", None)]
    variants += [(f"int{bits} g64 (rtn)", str(folders[bits])) for bits in E2E_BITS]
    results = []
    for variant, folder in variants:
        command = [sys.executable, __file__, "--one-e2e", variant, "--runs", str(runs)]
        command += ["--threads", str(threads)]
        if folder:
            command += ["--folder", folder]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode:
            raise RuntimeError(f"{variant} failed:\n{done.stderr[-3000:]}")
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(f"{variant}: {results[-1]['tokens_per_s']:.1f} tok/s", file=sys.stderr)
    base = results[0]["tokens_per_s"]
    for row in results:
        row["speedup_vs_bf16"] = row["tokens_per_s"] / base
        row["speedup_vs_fp32"] = row["tokens_per_s"] / results[1]["tokens_per_s"]
    return results


# ---------------------------------------------------------------------------- report


def render(data: dict[str, Any]) -> str:
    meta = data["meta"]
    lines = [
        "# Packed-weight CPU kernels and end-to-end decode",
        "",
        f"Command: `{meta['command']}`  ",
        f"Machine: {meta['machine']}; {meta['date']}; load average at start "
        f"{meta['load_start']}, at end {meta['load_end']}"
        + (
            " (the CPU was shared with other jobs: absolute times are noisy, ratios within one "
            "run less so).  "
            if _busy(meta)
            else " (quiet).  "
        ),
        f"Measured bandwidth (256 MiB buffers): all cores copy {meta['copy_gbs']:.1f} GB/s "
        f"(read + write bytes), read {meta['read_gbs']:.1f} GB/s; one thread read "
        f"{meta.get('read_gbs_1t', float('nan')):.1f} GB/s.",
        "",
        f"Formats: {_symmetry(data)}, group 128 (group 64 at K=576, where 128 does not "
        "divide), fp16 scales; activations bf16, so `cpu_gemv` takes its int16-activation path. "
        "`bf16 ms` is `F.linear` on a dense bf16 weight in the same run; `x bf16` its time over "
        "ours. GB/s = packed bytes (codes + scales + zero points) / median time. Every call reads "
        "a different copy of the weights (3x the L3 in total).",
        "",
        *_targets(data),
    ]
    for threads in sorted({r["threads"] for r in data["kernels"]}, reverse=True):
        lines += [
            f"## Kernels, {threads} thread{'s' if threads > 1 else ''}",
            "",
            "| shape | format | kernel | median ms | bf16 ms | x bf16 | fp32 ms | x fp32 | GB/s |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in data["kernels"]:
            if r["threads"] != threads:
                continue
            lines.append(
                f"| {r['shape']} | {r['format']} | {r['kernel']} | {r['median_ms']:.3f} | "
                f"{r['bf16_ms']:.3f} | **{r['speedup_vs_bf16']:.2f}** | {r['fp32_ms']:.3f} | "
                f"{r['speedup_vs_fp32']:.2f} | {r['achieved_gbs']:.1f} |"
            )
        lines.append("")
    if data.get("e2e"):
        lines += [
            f"## End to end: `generate`, {NEW_TOKENS} new tokens, greedy, batch 1, SmolLM2-135M",
            "",
            "Each model in its own process; resident memory after generating (`rss MB`), its "
            "growth over the bare process (`+MB`), rss without file-backed pages (`anon MB`) "
            "and the bytes of the model's parameters and buffers (`tensors MB`; tied "
            "embeddings counted once). Tokens/s: median of the timed runs (no hooks); the "
            "decode-time split comes from forward hooks on one more run.",
            "",
            "| model | threads | tokens/s | x bf16 | x fp32 | rss MB | +MB | anon MB | tensors MB "
            "| kernels | quantized linears | lm_head | other |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in data["e2e"]:
            prof = r["profile"]
            lines.append(
                f"| {r['variant']} | {r['threads']} | {r['tokens_per_s']:.2f} | "
                f"**{r['speedup_vs_bf16']:.2f}** | {r['speedup_vs_fp32']:.2f} | "
                f"{r['rss_mb']:.0f} | {r['rss_model_mb']:.0f} | {r['anon_mb']:.0f} | "
                f"{r['model_tensor_mb']:.0f} | {', '.join(r['kernels']) or '-'} | "
                f"{prof['quantized linears']:.0%} | {prof['lm_head']:.0%} | "
                f"{prof['other (attention, norms, generate loop)']:.0%} |"
            )
        lines += [
            "",
            "Top ops by self CPU time (torch profiler, 8 new tokens; the native kernels are "
            "extension calls, not aten ops, so they appear only in the hook split above: "
            "`aten::mm` in the quantized models is the dense lm_head):",
            "",
        ]
        for r in data["e2e"]:
            ops = ", ".join(
                f"{op['op']} {op['self_cpu_ms']:.0f} ms" for op in r["top_ops_8_tokens"][:6]
            )
            lines.append(f"- {r['variant']}: {ops}")
        lines.append("")
    if meta.get("kernels_from"):
        lines += [
            f"Kernel rows from `{meta['kernels_from']['command']}` at "
            f"{meta['kernels_from']['date']} (load average {meta['kernels_from']['load_start']}; "
            f"measured then: copy {meta['kernels_from']['copy_gbs']:.1f} GB/s, read "
            f"{meta['kernels_from']['read_gbs']:.1f} GB/s); end-to-end rows from the command "
            "above.",
            "",
        ]
    lines += ["## Reading these numbers", "", *_bound_notes(data), *NOTES, ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=25)
    parser.add_argument("--runs", type=int, default=3, help="timed generate runs per model")
    parser.add_argument("--skip-e2e", action="store_true")
    parser.add_argument(
        "--asymmetric",
        action="store_true",
        help="kernel rows with packed zero points (as GPTQ/AWQ exports have) instead of symmetric",
    )
    parser.add_argument("--skip-kernels", action="store_true")
    parser.add_argument("--exports", type=Path, help="folder to keep the SmolLM2 exports in")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "kernels.json")
    parser.add_argument(
        "--threads",
        type=int,
        nargs="+",
        default=[0],
        help="thread counts for end to end, each its own set of rows (0: torch's default)",
    )
    parser.add_argument("--one-e2e", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one_e2e:
        print(json.dumps(run_e2e(args.one_e2e, args.folder, args.runs, args.threads[0])))
        return

    from compress.export import cpu

    cpu.native()  # build before timing anything
    meta: dict[str, Any] = {
        "command": "python scripts/bench_kernels.py " + " ".join(sys.argv[1:]),
        "machine": f"{_cpu_name()}, {platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}, native kernels vectorized={cpu.vectorized()}",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "load_start": _load(),
        **machine_bandwidth(),
    }
    data: dict[str, Any] = {"meta": meta, "kernels": [], "e2e": []}
    out_json = args.out.with_suffix(".json")
    if args.skip_kernels and out_json.exists():  # keep the kernel rows of the last full run
        previous = json.loads(out_json.read_text())
        data["kernels"] = previous["kernels"]
        meta["kernels_from"] = previous["meta"].get("kernels_from", previous["meta"])
    if not args.skip_kernels:
        threads = torch.get_num_threads()
        for count in sorted({threads, 1}, reverse=True):
            data["kernels"] += bench_kernels(args.reps, count, not args.asymmetric)
        torch.set_num_threads(threads)
    if not args.skip_e2e:
        with tempfile.TemporaryDirectory() as tmp:
            for count in args.threads:
                data["e2e"] += bench_e2e(args.exports or Path(tmp), args.runs, count)
    meta["load_end"] = _load()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(data, indent=2))
    args.out.with_suffix(".md").write_text(render(data))


def _symmetry(data: dict[str, Any]) -> str:
    asym = any(r["format"].endswith("asym") for r in data["kernels"])
    return "asymmetric (packed zero points)" if asym else "symmetric"


def _busy(meta: dict[str, Any]) -> bool:
    """Whether other work ran: a 1-minute load average over one at the start (by the end, the
    benchmark's own threads count in it)."""
    return float(meta.get("load_start", "0").split()[0]) > 1.0


def _targets(data: dict[str, Any]) -> list[str]:
    """The issue's batch-1 4096x4096 targets against this run, per thread count."""
    rows = [r for r in data["kernels"] if r["rows"] == 1 and r["N"] == 4096 and r["K"] == 4096]
    if not rows:
        return []
    threads = sorted({r["threads"] for r in rows}, reverse=True)
    lines = [
        "## Targets: batch 1, 4096x4096, speed-up over bf16 torch matmul",
        "",
        "| format | target | "
        + " | ".join(f"{t} thread{'s' if t > 1 else ''}" for t in threads)
        + " |",
        "|---|---|" + "---|" * len(threads),
    ]
    for bits, target in sorted(TARGETS.items()):
        got = {r["threads"]: r["speedup_vs_bf16"] for r in rows if r["bits"] == bits}
        cells = [
            f"{got[t]:.2f} ({'met' if got[t] >= target else 'missed'})" if t in got else "-"
            for t in threads
        ]
        lines.append(f"| int{bits} | ≥ {target} | " + " | ".join(cells) + " |")
    e2e = data.get("e2e", [])
    for count in sorted({r["threads"] for r in e2e}, reverse=True):
        by_name = {r["variant"]: r for r in e2e if r["threads"] == count}
        int4 = next((r for name, r in by_name.items() if name.startswith("int4")), None)
        if int4 is None or "bf16" not in by_name:
            continue
        verdict = "met" if int4["speedup_vs_bf16"] >= E2E_TARGET else "missed"
        lines += [
            "",
            f"End to end (SmolLM2-135M, {count} thread{'s' if count > 1 else ''}): int4 export "
            f"{int4['speedup_vs_bf16']:.2f}x the bf16 model's tokens/s, target ≥ {E2E_TARGET} "
            f"({verdict}); resident memory {int4['rss_mb']:.0f} MB against "
            f"{by_name['bf16']['rss_mb']:.0f} MB.",
        ]
    return [*lines, ""]


def _bound_notes(data: dict[str, Any]) -> list[str]:
    """What bounds the batch-1 4096x4096 kernels: their GB/s against the measured read GB/s."""
    meta = data.get("meta", {})
    ceilings = {1: meta.get("read_gbs_1t"), max(os.cpu_count() or 1, 1): meta.get("read_gbs")}
    rows = [r for r in data["kernels"] if r["rows"] == 1 and r["N"] == 4096 and r["K"] == 4096]
    notes = []
    for threads, ceiling in sorted(ceilings.items()):
        mine = sorted((r for r in rows if r["threads"] == threads), key=lambda r: r["bits"])
        if not ceiling or not mine:
            continue
        shares = ", ".join(
            f"int{r['bits']} {r['achieved_gbs']:.1f} GB/s ({r['achieved_gbs'] / ceiling:.0%})"
            for r in mine
        )
        notes.append(
            f"- What bounds batch 1 at {threads} thread{'s' if threads > 1 else ''} "
            f"(4096x4096): packed bytes read per second against the measured read bandwidth of "
            f"{ceiling:.1f} GB/s: {shares}. The widest codes come closest to the bandwidth; "
            "narrow codes do the same unpack and multiply-add work per weight over fewer bytes, "
            "so they stay bounded by instructions."
        )
    return notes


def _load() -> str:
    return " ".join(f"{v:.1f}" for v in os.getloadavg())


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


if __name__ == "__main__":
    main()
