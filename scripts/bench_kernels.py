"""Speed of the packed-weight CPU kernels against bf16 torch matmul: decode, prefill, end to end.

Kernels: per instruction-set build (``--isa``: this CPU's own and, forced by
``COMPRESS_CPU_ISA``, lower ones such as AVX2), bit width and shape, the median time of
``QuantLinear``'s selected CPU kernel and of a dense bf16 (and fp32) ``F.linear`` measured in the
same run, the ratio, and the GB/s the kernel achieves on its packed bytes against the machine's
measured read bandwidth. Shapes: batch 1 (decode) and 8 / 32 / 128 / 512 rows of 4096x4096
(prefill). Each timed call reads a different copy of the weights (enough copies to overflow the
last-level cache), as decode does. Run at all cores and at one thread (the single-thread ratio
is the steadier one on a shared machine). ``--baseline REV`` times the kernels of an earlier
commit as one more build, in the same run.

Prefill end to end: a 512-token prompt through SmolLM2-135M exported at int4 (RTN, group 64,
symmetric) against the bf16 model, at one and two threads: the forward ``generate`` runs first
(logits of the last token only) and one with every token's logits (what evaluation pays).

Decode end to end: tokens/s of ``generate`` (64 new tokens, greedy, batch 1) for SmolLM2-135M
exported at int8 / int4 / int3 against the bf16 model, the resident memory of each (own
process), and where the int4 model's decode time goes.

    python scripts/bench_kernels.py --threads 1 2    # all -> benchmarks/kernels.{json,md}
    python scripts/bench_kernels.py --skip-e2e --skip-prefill --reps 15
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
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
MODEL = "smollm2-135m"
NEW_TOKENS = 64
PROMPT_TOKENS = 512

# (label, rows, out_features N, in_features K)
SHAPES = [
    ("1x4096 · 4096x4096", 1, 4096, 4096),
    ("1x4096 · 11008x4096", 1, 11008, 4096),
    ("1x576 · 1536x576", 1, 1536, 576),
    ("8x4096 · 4096x4096", 8, 4096, 4096),
    ("32x4096 · 4096x4096", 32, 4096, 4096),
    ("128x4096 · 4096x4096", 128, 4096, 4096),
    ("512x4096 · 4096x4096", 512, 4096, 4096),
]
BITS = [2, 3, 4, 5, 6, 8]
E2E_BITS = [8, 4, 3]
PREFILL_BITS = 4
NOTES = [
    "- bf16/fp16 activations take `cpu_gemv`'s int16 path: x is rounded to int16 per chunk of "
    "64-128 inputs (finer than bf16 itself, but for elements far below the chunk's largest) and "
    "integer multiply-adds meet 16 codes at a time (AVX2 `vpmaddwd`) or 32 with the accumulation "
    "fused (AVX-512 VNNI `vpdpwssd`), where the exact fp32 path (fp32 activations, and 7-bit "
    "codes) needs a shift, mask, int->float convert and FMA per 8 codes.",
    "- Prefill (`cpu_gemm`) with bf16 activations: on an AMX build a GEMM of our own (weight "
    "panels dequantized by lookup table straight into AMX tile blocks, 2x2 tiles); on an AVX-512 "
    "build whose CPU has AVX512-BF16 (Zen 4) the same panels multiplied by `vdpbf16ps`, sixteen "
    "accumulators a 16-row block, up to 1024 rows; otherwise tiles dequantized to bf16 for "
    "torch's bf16 GEMM where the CPU has bf16 hardware (else fp32 tiles for its fp32 GEMM). A "
    "forced lower build is still measured against torch's bf16 GEMM on the CPU's own hardware "
    "(AMX, AVX512-BF16): it pays our dequantization on top of the same GEMM, so its prefill "
    "ratios are below what that build gets on its own kind of CPU.",
    "- On a CPU shared with other jobs, multi-threaded timings snap to scheduler time slices "
    "(medians of exactly 4, 8, 12 ms): a 2-thread parallel region waits for a descheduled "
    "thread. The one-thread tables are the steadier comparison there.",
    "- SmolLM2's own shapes (K=576, group 64) gain less than 4096x4096 at batch 1: each row has "
    "only nine 64-code blocks, so the per-row work (scales, the reduction of chunk sums) weighs "
    "more, and a 1536x576 matrix is too small to split over two threads.",
]


def clock(threads: int, cpu_time: bool) -> Callable[[], float]:
    """The clock of a measurement: with ``cpu_time``, one-thread runs count the process's CPU
    time (a shared machine's other jobs then cost a run cache and memory bandwidth, not the
    seconds it waited for a core); everything else counts wall time."""
    return time.process_time if cpu_time and threads == 1 else time.perf_counter


def timed(
    fn: Callable[[], Any], reps: int, now: Callable[[], float] = time.perf_counter
) -> tuple[float, float]:
    """(median, min) seconds of ``reps`` calls after two warm-up calls."""
    fn()
    fn()
    times = []
    for _ in range(reps):
        start = now()
        fn()
        times.append(now() - start)
    return statistics.median(times), min(times)


def llc_bytes() -> int:
    """The last-level cache to overflow: sysfs's L3 (a VM may report the host's whole L3, so at
    most 64 MiB: beyond that the measured read bandwidth no longer falls), else 32 MiB."""
    try:
        text = Path("/sys/devices/system/cpu/cpu0/cache/index3/size").read_text().strip()
        size = int(text.rstrip("KMG")) * {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1], 1)
    except (OSError, ValueError):
        size = 32 * 2**20
    return min(size, 64 * 2**20)


def rotating(make: Callable[[], Any], nbytes: int) -> Callable[[], Any]:
    """A callable returning one of enough copies to overflow the last-level cache (3x)."""
    copies = [make() for _ in range(max(2, min(64, math.ceil(3 * llc_bytes() / nbytes))))]
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
PREFILL_ROWS_TARGET = {32: 1.0, 512: 1.0}  # GEMM at 4096x4096 over bf16, every width and build
PREFILL_TARGET = 1.0  # 512-token prompt, int4 export over the bf16 model


def packed_module(bits: int, n: int, k: int, symmetric: bool = True) -> Any:
    """A QuantLinear with random codes (every byte pattern is a valid stream)."""
    from compress.formats.int import IntFormat
    from compress.formats.int.linear import QuantLinear

    group = 128 if k % 128 == 0 else 64
    module = QuantLinear(k, n, IntFormat(bits, group, symmetric), dtype=torch.bfloat16)
    module.qweight.copy_(torch.randint(0, 256, module.qweight.shape, dtype=torch.uint8))
    module.scales.copy_(torch.rand(module.scales.shape) * 0.01 + 0.001)
    if module.qzeros is not None:
        module.qzeros.copy_(torch.randint(0, 256, module.qzeros.shape, dtype=torch.uint8))
    return module


def module_bytes(module: Any) -> int:
    return sum(b.numel() * b.element_size() for b in module.buffers())


def _isa_env(isa: str) -> None:
    """Make ``isa`` the build the kernels run (``native``: this CPU's own)."""
    if isa == "native":
        os.environ.pop("COMPRESS_CPU_ISA", None)
    else:
        os.environ["COMPRESS_CPU_ISA"] = isa


def baseline_kernel(rev: str) -> Callable[[Any, torch.Tensor, int], torch.Tensor]:
    """The CPU kernels of commit ``rev`` (its one-file qmatmul.cpp, built for this CPU's level):
    a callable (module, x, rows) that picks GEMV or GEMM as that commit did (8 rows)."""
    from compress.utils.native import cpu_isa, load_native

    source = subprocess.run(
        ["git", "-C", str(ROOT), "show", f"{rev}:compress/formats/int/cpu/qmatmul.cpp"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    ext = load_native(f"qmatmul_{rev[:10]}", source, ["gemv", "gemm"], isa=cpu_isa())
    if ext is None:
        raise RuntimeError(f"the kernels of {rev} did not build")
    empty_u8, empty_f = torch.empty(0, dtype=torch.uint8), torch.empty(0)

    def run(module: Any, x: torch.Tensor, rows: int) -> torch.Tensor:
        zeros = empty_u8 if module.qzeros is None else module.qzeros
        args = (module.qweight, module.scales, zeros, module.fmt.bits, module.fmt.group_size or 0)
        if rows <= 8:
            return ext.gemv(x, *args, empty_f, x.dtype != torch.float32)
        return ext.gemm(x, *args, empty_f, 256)

    return run


def _dense(x: torch.Tensor, weight: Callable[[], torch.Tensor]) -> torch.Tensor:
    return F.linear(x, weight())


def bench_kernels(
    reps: int,
    threads: int,
    isa: str,
    symmetric: bool = True,
    baseline: str | None = None,
    cpu_time: bool = False,
) -> list[dict[str, Any]]:
    """One build's rows (``baseline``: commit ``baseline``'s kernels instead)."""
    now = clock(threads, cpu_time)
    from compress.formats.int import cpu, kernels

    _isa_env("native" if baseline else isa)
    old = baseline_kernel(baseline) if baseline else None
    build = f"{baseline[:10]} (before)" if baseline else str(cpu.isa())
    torch.set_num_threads(threads)
    rows_out = []
    for label, rows, n, k in SHAPES:
        shape_reps = reps if rows <= 32 else max(5, reps // 3)
        x16 = torch.randn(rows, k, dtype=torch.bfloat16)
        dense: dict[str, float] = {}
        for dtype in (torch.bfloat16, torch.float32):
            weight = rotating(partial(torch.randn, n, k, dtype=dtype), n * k * 2)
            x = x16.to(dtype)
            dense[str(dtype).removeprefix("torch.")] = timed(
                partial(_dense, x, weight), shape_reps, now
            )[0]
        for bits in BITS:
            probe = packed_module(bits, n, k, symmetric)
            nbytes = module_bytes(probe)
            kernel = probe._select(rows=rows, dtype=torch.bfloat16)
            module = rotating(partial(packed_module, bits, n, k, symmetric), nbytes)

            def call(m: Any = module, name: str = kernel, x: Any = x16, r: int = rows) -> Any:
                return kernels.run(name, x, m().packed()) if old is None else old(m(), x, r)

            if old is not None:
                kernel = "cpu_gemv" if rows <= 8 else "cpu_gemm"
            median, best = timed(call, shape_reps, now)
            if kernel == "cpu_gemm" and old is None:
                kernel += f" ({cpu.gemm_path(torch.bfloat16, probe.fmt.group_size, k, rows)})"
            rows_out.append(
                {
                    "isa": build,
                    "shape": label,
                    "rows": rows,
                    "N": n,
                    "K": k,
                    "bits": bits,
                    "format": f"int{bits} g{probe.fmt.group_size} "
                    + ("sym" if symmetric else "asym"),
                    "threads": threads,
                    "clock": "cpu" if now is time.process_time else "wall",
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
                f"[{build} {threads}t] {label:22s} int{bits}: {1e3 * median:7.3f} ms "
                f"(bf16 {1e3 * dense['bfloat16']:7.3f}) x{dense['bfloat16'] / median:5.2f} "
                f"{nbytes / median / 1e9:5.1f} GB/s [{kernel}]",
                file=sys.stderr,
            )
    _isa_env("native")
    return rows_out


# ---------------------------------------------------------------------------- end to end


def make_exports(root: Path, bits_list: list[int] = E2E_BITS) -> dict[int, Path]:
    """RTN exports of SmolLM2 (group 64 symmetric), reused when already in ``root``.

    Made here, not from a shipped recipe (recipes/quickstart.yaml changes with the project):
    every linear of the decoder layers at ``bits``, embeddings and lm_head kept in bf16."""
    from compress.models import load_model
    from compress.pipeline import Pipeline
    from compress.recipe import parse_recipe

    folders = {}
    for bits in bits_list:
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
    from compress.formats.int.linear import QuantLinear
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


# ---------------------------------------------------------------------------- prefill


def prompt_ids(tokenizer: Any) -> torch.Tensor:
    """The first PROMPT_TOKENS tokens of the builtin evaluation text: (1, PROMPT_TOKENS)."""
    from compress.data import load_texts

    texts = load_texts("builtin:wiki", "evaluation")["text"]
    text, i = "", 0
    while len(tokenizer(text).input_ids) < PROMPT_TOKENS and i < len(texts):
        text += texts[i] + "\n"
        i += 1
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :PROMPT_TOKENS]
    if ids.shape[1] != PROMPT_TOKENS:
        raise RuntimeError(f"the evaluation text has fewer than {PROMPT_TOKENS} tokens")
    return ids


def run_prefill(
    variant: str, folder: str | None, runs: int, threads: int, cpu_time: bool
) -> dict[str, Any]:
    """One model in this process: the 512-token prompt's forward, ``runs`` times each way."""
    torch.set_num_threads(threads)
    now = clock(threads, cpu_time)

    from transformers import AutoModelForCausalLM

    import compress  # noqa: F401  (registers the transformers plug-in)
    from compress.formats.int import cpu
    from compress.formats.int.linear import QuantLinear
    from compress.models import load_tokenizer, model_folder

    tokenizer = load_tokenizer(MODEL)
    model: Any = AutoModelForCausalLM.from_pretrained(
        folder or model_folder(MODEL), dtype=torch.bfloat16
    )
    model.eval()
    ids = prompt_ids(tokenizer)

    def forward(keep: int) -> None:
        with torch.inference_mode():
            model(ids, logits_to_keep=keep)  # keep 0: every token's logits

    times = {}
    for name, keep, count in (("first_token", 1, runs), ("all_logits", 0, max(3, runs // 2))):
        forward(keep)
        forward(keep)
        samples = []
        for _ in range(count):
            start = now()
            forward(keep)
            samples.append(now() - start)
        times[name] = samples
    quantized = [m for m in model.modules() if isinstance(m, QuantLinear)]
    prefill_kernels = sorted(
        {m._select(rows=PROMPT_TOKENS, dtype=torch.bfloat16) for m in quantized}
    )
    return {
        "variant": variant,
        "threads": torch.get_num_threads(),
        "isa": cpu.isa() if quantized else "-",
        "clock": "cpu" if now is time.process_time else "wall",
        "kernels": prefill_kernels,
        "first_token_ms": 1e3 * statistics.median(times["first_token"]),
        "all_logits_ms": 1e3 * statistics.median(times["all_logits"]),
        "runs_ms": {k: [round(1e3 * t, 1) for t in v] for k, v in times.items()},
    }


def bench_prefill(
    export_root: Path,
    runs: int,
    threads: list[int],
    isas: list[str],
    cpu_time: bool,
    extra: dict[str, Path] | None = None,
) -> list[dict[str, Any]]:
    """bf16 model and int4 export (per build in ``isas``) at each thread count, own processes;
    ``extra``: more exports (label -> folder, e.g. the quickstart's) on this CPU's build."""
    folder = make_exports(export_root, [PREFILL_BITS])[PREFILL_BITS]
    results = []
    for count in threads:
        rows = []
        variants: list[tuple[str, str | None, str]] = [("bf16", None, "native")]
        variants += [(f"int{PREFILL_BITS} g64 (rtn)", str(folder), isa) for isa in isas]
        variants += [(label, str(path), "native") for label, path in (extra or {}).items()]
        for variant, path, isa in variants:
            command = [sys.executable, __file__, "--one-prefill", variant, "--runs", str(runs)]
            command += ["--threads", str(count)] + (["--folder", path] if path else [])
            command += ["--cpu-time"] if cpu_time else []
            env = dict(os.environ)
            env.pop("COMPRESS_CPU_ISA", None)
            if isa != "native":
                env["COMPRESS_CPU_ISA"] = isa
            done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
            if done.returncode:
                raise RuntimeError(f"{variant} prefill failed:\n{done.stderr[-3000:]}")
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(
                f"prefill {variant} [{rows[-1]['isa']}] {count}t: "
                f"{rows[-1]['first_token_ms']:.1f} ms",
                file=sys.stderr,
            )
        base = rows[0]
        for row in rows:
            row["speedup_vs_bf16"] = base["first_token_ms"] / row["first_token_ms"]
            row["all_logits_speedup_vs_bf16"] = base["all_logits_ms"] / row["all_logits_ms"]
        results += rows
    return results


# ---------------------------------------------------------------------------- report


def render(data: dict[str, Any]) -> str:
    meta = data["meta"]
    lines = [
        "# Packed-weight CPU kernels: decode, prefill and end to end",
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
        "divide), fp16 scales; activations bf16. `build`: the instruction set the kernels were "
        "built for (this CPU's own, or a lower one forced with `COMPRESS_CPU_ISA`). `bf16 ms` is "
        "`F.linear` on a dense bf16 weight in the same run; `x bf16` its time over ours. GB/s = "
        "packed bytes (codes + scales + zero points) / median time. Every call reads a different "
        "copy of the weights (3x the last-level cache in total)." + _clock_note(data),
        "",
        *_targets(data),
    ]
    builds = list(dict.fromkeys(r.get("isa", "-") for r in data["kernels"]))
    for build in builds:
        for threads in sorted({r["threads"] for r in data["kernels"]}, reverse=True):
            mine = [r for r in data["kernels"] if r.get("isa", "-") == build]
            mine = [r for r in mine if r["threads"] == threads]
            if not mine:
                continue
            lines += [
                f"## Kernels, {build} build, {threads} thread{'s' if threads > 1 else ''}",
                "",
                "| shape | format | kernel | median ms | bf16 ms | x bf16 | fp32 ms | x fp32 "
                "| GB/s |",
                "|---|---|---|---|---|---|---|---|---|",
            ]
            for r in mine:
                lines.append(
                    f"| {r['shape']} | {r['format']} | {r['kernel']} | {r['median_ms']:.3f} | "
                    f"{r['bf16_ms']:.3f} | **{r['speedup_vs_bf16']:.2f}** | {r['fp32_ms']:.3f} | "
                    f"{r['speedup_vs_fp32']:.2f} | {r['achieved_gbs']:.1f} |"
                )
            lines.append("")
    if data.get("prefill"):
        lines += [
            f"## End to end: a {PROMPT_TOKENS}-token prompt, SmolLM2-135M",
            "",
            "Each model in its own process, bf16 activations. `first token`: the forward "
            "`generate` runs on the prompt (logits of the last position only), median of the "
            "timed runs; `all logits`: the same forward with every position's logits (what "
            "evaluation pays; the bf16 lm_head, 49152x576 at 512 rows, is the same in both "
            "models).",
            "",
            "| model | build | threads | clock | kernels | first token ms | x bf16 "
            "| all logits ms | x bf16 |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in data["prefill"]:
            lines.append(
                f"| {r['variant']} | {r['isa']} | {r['threads']} | {r.get('clock', 'wall')} | "
                f"{', '.join(r['kernels']) or '-'} | {r['first_token_ms']:.1f} | "
                f"**{r['speedup_vs_bf16']:.2f}** | {r['all_logits_ms']:.1f} | "
                f"{r['all_logits_speedup_vs_bf16']:.2f} |"
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
            lines.append(f"- {r['variant']} ({r['threads']}t): {ops}")
        lines.append("")
    for src in meta.get("merged_from", []):
        lines += [
            f"Rows this command did not measure again are from `{src['command']}` at "
            f"{src['date']} (load average {src.get('load_start', '?')} at its start).",
            "",
        ]
    for key, what in (("kernels_from", "Kernel rows"), ("e2e_from", "Decode end-to-end rows")):
        if meta.get(key):
            src = meta[key]
            lines += [
                f"{what} from `{src['command']}` at {src['date']} (load average "
                f"{src['load_start']}); the rest from the command above.",
                "",
            ]
    lines += _other_machines(data)
    crossover = "; ".join(
        f"{build} build: " + ", ".join(f"{dtype} ≤ {rows}" for dtype, rows in by_dtype.items())
        for build, by_dtype in meta.get("gemv_max_rows", {}).items()
    )
    notes = _bound_notes(data)
    if crossover:
        notes.append(
            "- Rows up to which `cpu_gemv` runs before `cpu_gemm` takes over (per build and "
            f"activation dtype, chosen at run time, measured): {crossover}."
        )
    lines += ["## Reading these numbers", "", *notes, *NOTES, ""]
    return "\n".join(lines)


def _other_machines(data: dict[str, Any]) -> list[str]:
    """Ratios of earlier runs on other CPUs, kept from their JSON."""
    others = data.get("other_machines", [])
    if not others:
        return []
    lines = [
        "## Other machines",
        "",
        "Earlier runs of this benchmark on other CPUs, against their own bf16 matmul, with the "
        "kernels of their day, kept so each kind of machine keeps a measured row.",
        "",
    ]
    for other in others:
        lines += [
            f"{other['machine']}; {other['date']}:",
            "",
            "| build | threads | shape | format | kernel | median ms | bf16 ms | x bf16 |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in other["kernels"]:
            lines.append(
                f"| {r.get('isa', 'avx2')} | {r['threads']} | {r['shape']} | {r['format']} | "
                f"{r['kernel']} | {r['median_ms']:.3f} | {r['bf16_ms']:.3f} | "
                f"{r['speedup_vs_bf16']:.2f} |"
            )
        lines.append("")
    return lines


def _carry_over(previous: dict[str, Any], machine: str) -> list[dict[str, Any]]:
    """The previous JSON's other machines, plus its own run if it was on another CPU (only the
    rows that give a 4096x4096 ratio at 1, 8 and 32 rows: the comparison points)."""
    others = list(previous.get("other_machines", []))
    meta = previous.get("meta", {})
    if meta.get("machine") and meta["machine"].split(",")[0] != machine.split(",")[0]:
        keep = [
            r
            for r in previous.get("kernels", [])
            if r["N"] == 4096
            and r["K"] == 4096
            and r["rows"] in (1, 8, 32)
            and r["bits"] in (2, 4, 8)
        ]
        if keep:
            others.append({"machine": meta["machine"], "date": meta["date"], "kernels": keep})
    return others


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=25)
    parser.add_argument("--runs", type=int, default=3, help="timed generate runs per model")
    parser.add_argument("--prefill-runs", type=int, default=7, help="timed prompt forwards")
    parser.add_argument("--skip-e2e", action="store_true", help="no decode end to end")
    parser.add_argument("--skip-prefill", action="store_true", help="no prefill end to end")
    parser.add_argument(
        "--asymmetric",
        action="store_true",
        help="kernel rows with packed zero points (as GPTQ/AWQ exports have) instead of symmetric",
    )
    parser.add_argument("--skip-kernels", action="store_true")
    parser.add_argument(
        "--isa",
        nargs="+",
        default=["native", "avx2"],
        help="builds for the kernel tables and the prefill rows: native (this CPU's) and lower "
        "levels to force (generic, avx2, avx512)",
    )
    parser.add_argument("--baseline", help="a commit whose kernels are timed as one more build")
    parser.add_argument("--exports", type=Path, help="folder to keep the SmolLM2 exports in")
    parser.add_argument(
        "--prefill-export",
        action="append",
        default=[],
        metavar="LABEL=DIR",
        help="one more SmolLM2 export for the prefill rows, e.g. quickstart=out/quickstart",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "kernels.json")
    parser.add_argument(
        "--threads",
        type=int,
        nargs="+",
        default=[0],
        help="thread counts for decode end to end, each its own set of rows (0: torch's default)",
    )
    parser.add_argument(
        "--prefill-threads", type=int, nargs="+", default=[1, 2], help="thread counts for prefill"
    )
    parser.add_argument(
        "--kernel-threads",
        type=int,
        nargs="+",
        help="thread counts for the kernel tables (default: all cores and one)",
    )
    parser.add_argument(
        "--cpu-time",
        action="store_true",
        help="time one-thread kernel and prefill rows by process CPU time (for a shared machine)",
    )
    parser.add_argument(
        "--merge",
        action="store_true",
        help="keep the previous JSON's rows (same machine) that this run does not measure again: "
        "to redo the rows a busy spell spoiled",
    )
    parser.add_argument("--one-e2e", help=argparse.SUPPRESS)
    parser.add_argument("--one-prefill", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one_e2e:
        print(json.dumps(run_e2e(args.one_e2e, args.folder, args.runs, args.threads[0])))
        return
    if args.one_prefill:
        one = run_prefill(args.one_prefill, args.folder, args.runs, args.threads[0], args.cpu_time)
        print(json.dumps(one))
        return

    from compress.formats.int import cpu
    from compress.utils.native import cpu_flags, cpu_isa

    for isa in args.isa:  # build before timing anything
        _isa_env(isa)
        cpu.native()
    _isa_env("native")
    extras = sorted({"avx512_bf16", "amx_bf16", "avx_vnni"} & cpu_flags())
    meta: dict[str, Any] = {
        "command": "python scripts/bench_kernels.py " + " ".join(sys.argv[1:]),
        "machine": f"{_cpu_name()}, {platform.machine()}, {os.cpu_count()} cores, "
        f"instruction set {cpu_isa()}"
        + (f" ({', '.join(extras)})" if extras else "")
        + f", torch {torch.__version__}",
        "cpu_isa": cpu_isa(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "load_start": _load(),
        **machine_bandwidth(),
    }
    crossover = {}
    for isa in args.isa:
        _isa_env(isa)
        crossover[str(cpu.isa())] = {
            str(dtype).removeprefix("torch."): cpu.gemv_max_rows(dtype)
            for dtype in (torch.bfloat16, torch.float16, torch.float32)
        }
    _isa_env("native")
    meta["gemv_max_rows"] = crossover
    data: dict[str, Any] = {"meta": meta, "kernels": [], "prefill": [], "e2e": []}
    out_json = args.out.with_suffix(".json")
    previous = json.loads(out_json.read_text()) if out_json.exists() else {}
    data["other_machines"] = _carry_over(previous, meta["machine"])
    same_machine = previous.get("meta", {}).get("machine") == meta["machine"]
    if args.skip_kernels and same_machine:  # keep the kernel rows of the last full run
        data["kernels"] = previous["kernels"]
        meta["kernels_from"] = previous["meta"].get("kernels_from", previous["meta"])
    if args.skip_e2e and same_machine and previous.get("e2e"):
        data["e2e"] = previous["e2e"]
        meta["e2e_from"] = previous["meta"].get("e2e_from", previous["meta"])
    if not args.skip_kernels:
        threads = torch.get_num_threads()
        for count in sorted(set(args.kernel_threads or {threads, 1}), reverse=True):
            for isa in args.isa:
                data["kernels"] += bench_kernels(
                    args.reps, count, isa, not args.asymmetric, cpu_time=args.cpu_time
                )
            if args.baseline:
                data["kernels"] += bench_kernels(
                    args.reps,
                    count,
                    "native",
                    not args.asymmetric,
                    baseline=args.baseline,
                    cpu_time=args.cpu_time,
                )
        torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        exports = args.exports or Path(tmp)
        if not args.skip_prefill:
            data["prefill"] = bench_prefill(
                exports,
                args.prefill_runs,
                args.prefill_threads,
                args.isa,
                args.cpu_time,
                dict(_labelled(item) for item in args.prefill_export),
            )
        if not args.skip_e2e:
            for count in args.threads:
                data["e2e"] += bench_e2e(exports, args.runs, count)
    meta["load_end"] = _load()
    if args.merge and same_machine:
        _merge(data, previous)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(data, indent=2))
    args.out.with_suffix(".md").write_text(render(data))


def _clock_note(data: dict[str, Any]) -> str:
    rows = data.get("kernels", []) + data.get("prefill", [])
    if not any(r.get("clock") == "cpu" for r in rows):
        return ""
    return (
        " One-thread rows (kernels and prefill) are timed by the process's CPU time, not wall "
        "time: on this shared machine other jobs then cost a run cache and memory bandwidth but "
        "not the seconds it waited for a core. Multi-threaded rows are wall time."
    )


def _labelled(item: str) -> tuple[str, Path]:
    label, sep, folder = item.partition("=")
    if not sep or not label or not Path(folder, "config.json").is_file():
        raise SystemExit(f"--prefill-export {item!r}: expected LABEL=DIR of an export")
    return label, Path(folder)


def _merge(data: dict[str, Any], previous: dict[str, Any]) -> None:
    """Add the previous run's rows whose build and thread count (and model) this run did not
    measure; the rendered page names both runs."""
    keys = {
        "kernels": lambda r: (r.get("isa"), r["threads"]),
        "prefill": lambda r: (r["variant"], r["isa"], r["threads"]),
        "e2e": lambda r: (r["variant"], r["threads"]),
    }
    kept = 0
    for table, key in keys.items():
        measured = {key(r) for r in data.get(table, [])}
        old = [r for r in previous.get(table, []) if key(r) not in measured]
        kept += len(old)
        data[table] = old + data.get(table, [])
    if kept:
        earlier = previous["meta"]
        data["meta"]["merged_from"] = [
            *earlier.get("merged_from", []),
            {k: earlier[k] for k in ("command", "date", "load_start", "load_end") if k in earlier},
        ]


def _symmetry(data: dict[str, Any]) -> str:
    asym = any(r["format"].endswith("asym") for r in data["kernels"])
    return "asymmetric (packed zero points)" if asym else "symmetric"


def _busy(meta: dict[str, Any]) -> bool:
    """Whether other work ran: a 1-minute load average over one at the start (by the end, the
    benchmark's own threads count in it)."""
    return float(meta.get("load_start", "0").split()[0]) > 1.0


def _targets(data: dict[str, Any]) -> list[str]:
    """The issue's targets against this run: batch 1 and GEMM rows at 4096x4096 per build and
    thread count, prefill and decode end to end."""
    square = [r for r in data["kernels"] if r["N"] == 4096 and r["K"] == 4096]
    columns = sorted(
        {(r.get("isa", "-"), r["threads"]) for r in square}, key=lambda c: (c[0], -c[1])
    )
    lines: list[str] = []
    if columns:
        head = " | ".join(f"{isa}, {t} thread{'s' if t > 1 else ''}" for isa, t in columns)
        lines += [
            "## Targets: 4096x4096, speed-up over bf16 torch matmul in the same run",
            "",
            f"| rows | format | target | {head} |",
            "|---|---|---|" + "---|" * len(columns),
        ]
        checks = [(1, bits, target) for bits, target in sorted(TARGETS.items())]
        checks += [(rows, bits, t) for rows, t in PREFILL_ROWS_TARGET.items() for bits in BITS]
        for rows, bits, target in checks:
            got = {
                (r.get("isa", "-"), r["threads"]): r["speedup_vs_bf16"]
                for r in square
                if r["bits"] == bits and r["rows"] == rows
            }
            if not got:
                continue
            cells = [
                f"{got[c]:.2f} ({'met' if got[c] >= target else 'missed'})" if c in got else "-"
                for c in columns
            ]
            lines.append(f"| {rows} | int{bits} | ≥ {target} | " + " | ".join(cells) + " |")
    for r in data.get("prefill", []):
        if r["variant"] == "bf16":
            continue
        verdict = "met" if r["speedup_vs_bf16"] >= PREFILL_TARGET else "missed"
        lines += [
            "",
            f"Prefill ({PROMPT_TOKENS}-token prompt, SmolLM2-135M, {r['isa']} build, "
            f"{r['threads']} thread{'s' if r['threads'] > 1 else ''}): {r['variant']} export "
            f"{r['speedup_vs_bf16']:.2f}x the bf16 model's speed (first token: "
            f"{r['first_token_ms']:.0f} ms), target ≥ {PREFILL_TARGET} ({verdict}).",
        ]
    e2e = data.get("e2e", [])
    for count in sorted({r["threads"] for r in e2e}, reverse=True):
        by_name = {r["variant"]: r for r in e2e if r["threads"] == count}
        int4 = next((r for name, r in by_name.items() if name.startswith("int4")), None)
        if int4 is None or "bf16" not in by_name:
            continue
        verdict = "met" if int4["speedup_vs_bf16"] >= E2E_TARGET else "missed"
        lines += [
            "",
            f"Decode (SmolLM2-135M, {count} thread{'s' if count > 1 else ''}): int4 export "
            f"{int4['speedup_vs_bf16']:.2f}x the bf16 model's tokens/s, target ≥ {E2E_TARGET} "
            f"({verdict}); resident memory {int4['rss_mb']:.0f} MB against "
            f"{by_name['bf16']['rss_mb']:.0f} MB.",
        ]
    return [*lines, ""] if lines else []


def _bound_notes(data: dict[str, Any]) -> list[str]:
    """What bounds the batch-1 4096x4096 kernels: their GB/s against the measured read GB/s."""
    meta = data.get("meta", {})
    ceilings = {1: meta.get("read_gbs_1t"), max(os.cpu_count() or 1, 1): meta.get("read_gbs")}
    rows = [r for r in data["kernels"] if r["rows"] == 1 and r["N"] == 4096 and r["K"] == 4096]
    notes = []
    for build in dict.fromkeys(r.get("isa", "-") for r in rows):
        for threads, ceiling in sorted(ceilings.items()):
            mine = [r for r in rows if r["threads"] == threads and r.get("isa", "-") == build]
            if not ceiling or not mine:
                continue
            shares = ", ".join(
                f"int{r['bits']} {r['achieved_gbs']:.1f} GB/s ({r['achieved_gbs'] / ceiling:.0%})"
                for r in sorted(mine, key=lambda r: r["bits"])
            )
            notes.append(
                f"- Batch 1, {build} build, {threads} thread{'s' if threads > 1 else ''} "
                f"(4096x4096): packed bytes read per second against the measured read bandwidth "
                f"of {ceiling:.1f} GB/s: {shares}."
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
