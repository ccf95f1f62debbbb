"""Quality of weight quantization on SmolLM2-135M: our RTN and GPTQ recipes against peers.

Every method quantizes the Linear layers of the decoder blocks (embeddings and lm_head kept) and
is scored on the same evaluation windows of ``builtin:wiki`` against the original model:
perplexity, KL(original ‖ quantized) per token, top-1 agreement. Stored bits per weight count
codes plus scales and zero points. Each method runs in its own process so that its quantization
wall time and peak RSS are its own.

    python scripts/bench_quality.py                      # all methods -> benchmarks/quality.*
    python scripts/bench_quality.py --methods rtn-w4 gptq-w4 --windows 8

Peers: GGUF legacy types through the ``gguf`` package (k-quants cannot be produced from Python),
HQQ (``pip install --no-deps --target DIR hqq termcolor``; pass ``--peers-path DIR``). The
smollm2-135m weights went through GGUF Q4_1 (blocks of 32, asymmetric) before we got them, so
Q4_1-like formats look unrealistically good; we compare at group 64 symmetric and say so.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
MODEL = "smollm2-135m"

# name -> (kind, options)
METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "rtn-w8": ("recipe", {"passes": [{"pass": "rtn", "bits": 8, "group_size": 64}]}),
    "rtn-w4": ("recipe", {"passes": [{"pass": "rtn", "bits": 4, "group_size": 64}]}),
    "rtn-w3": ("recipe", {"passes": [{"pass": "rtn", "bits": 3, "group_size": 64}]}),
    "rtn-w2": ("recipe", {"passes": [{"pass": "rtn", "bits": 2, "group_size": 64}]}),
    "gptq-w4": ("recipe", {"file": "recipes/smollm2-w4-gptq.yaml"}),
    "gptq-w3": ("recipe", {"file": "recipes/smollm2-w3-gptq.yaml"}),
    "gptq-w2": ("recipe", {"file": "recipes/smollm2-w2-gptq.yaml"}),
    # the w4 recipe made symmetric: 4.25 bits/weight, the same as llm-compressor's W4A16
    "gptq-w4-sym": (
        "recipe",
        {"file": "recipes/smollm2-w4-gptq.yaml", "pass_options": {"symmetric": True}},
    ),
    # AWQ scaling before the same GPTQ (rows of 2026-11-23 were run as the gptq recipes with
    # the awq pass put first: the same passes as these files)
    **{
        f"awq-gptq-w{bits}": ("recipe", {"file": f"recipes/smollm2-w{bits}-awq-gptq.yaml"})
        for bits in (4, 3, 2)
    },
    "gguf-q8_0": ("gguf", {"type": "Q8_0"}),
    "gguf-q5_0": ("gguf", {"type": "Q5_0"}),
    "gguf-q4_0": ("gguf", {"type": "Q4_0"}),
    "hqq-w4": ("hqq", {"bits": 4, "group_size": 64}),
    "hqq-w3": ("hqq", {"bits": 3, "group_size": 64}),
    "hqq-w2": ("hqq", {"bits": 2, "group_size": 64}),
    "llmc-gptq-w4-sym": ("llmc", {"bits": 4, "group_size": 64, "symmetric": True}),
    "llmc-gptq-w4": ("llmc", {"bits": 4, "group_size": 64, "symmetric": False}),
    "llmc-gptq-w3": ("llmc", {"bits": 3, "group_size": 64, "symmetric": False}),
    "llmc-gptq-w2": ("llmc", {"bits": 2, "group_size": 64, "symmetric": False}),
}
# llm-compressor runs in its own venv (see scripts/peers/llmc_gptq.py); main() passes its python.
LLMC_PYTHON_ENV = "COMPRESS_BENCH_LLMC_PYTHON"


@dataclass
class Quantized:
    """What a quantizer reports: stored bits per weight and, for peers timed in their own
    process, that process's quantization wall time and peak RSS."""

    bits_per_weight: float
    seconds: float | None = None
    peak_rss_mb: float | None = None


def decoder_linears(model: nn.Module) -> dict[str, nn.Linear]:
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and ".layers." in name
    }


def quantize_recipe(model: nn.Module, tokenizer: Any, options: dict[str, Any]) -> Quantized:
    """Run our passes through the Pipeline, export, and return the stored bits per weight."""
    from compress.export.summary import summarize_export
    from compress.pipeline import Pipeline
    from compress.recipe import load_recipe, parse_recipe

    if "file" in options:
        recipe = load_recipe(ROOT / options["file"])
        if "pass_options" in options:  # the recipe with these options set on its passes
            data = yaml.safe_load((ROOT / options["file"]).read_text())
            passes = [{**step, **options["pass_options"]} for step in data["passes"]]
            recipe = parse_recipe({**data, "passes": passes})
    else:
        recipe = parse_recipe({"model": MODEL, "passes": options["passes"]})
    with tempfile.TemporaryDirectory() as tmp:
        pipeline = Pipeline(
            model,
            recipe.passes,
            tokenizer=tokenizer,
            calibration=recipe.calibration,
            export=Path(tmp) / "export",
        )
        export_dir = pipeline.run().export_dir
        assert export_dir is not None  # the pipeline was given an export folder
        bits = summarize_export(export_dir).quantized_bits_per_weight
        assert bits is not None  # every method here quantizes something
        return Quantized(bits)


def quantize_gguf(model: nn.Module, tokenizer: Any, options: dict[str, Any]) -> Quantized:
    import gguf
    import numpy as np
    from gguf import quants

    qtype = getattr(gguf.GGMLQuantizationType, options["type"])
    block, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    for module in decoder_linears(model).values():
        weight = module.weight.detach().float().numpy()
        restored = quants.dequantize(quants.quantize(weight, qtype), qtype)
        module.weight.data.copy_(torch.from_numpy(np.ascontiguousarray(restored)))
    return Quantized(8 * block_bytes / block)


def quantize_hqq(model: nn.Module, tokenizer: Any, options: dict[str, Any]) -> Quantized:
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    config = BaseQuantizeConfig(nbits=options["bits"], group_size=options["group_size"])
    for module in decoder_linears(model).values():
        clone = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
        clone.weight.data.copy_(module.weight.data)
        packed = HQQLinear(clone, config, compute_dtype=torch.float32, device="cpu")
        module.weight.data.copy_(packed.dequantize().reshape(module.weight.shape).float())
    # HQQ stores an fp16 scale and a zero point rounded to the code grid per group: counted at
    # `bits` bits (the cheapest it could be stored), which favours HQQ.
    return Quantized(options["bits"] + (16 + options["bits"]) / options["group_size"])


def quantize_llmc(model: nn.Module, tokenizer: Any, options: dict[str, Any]) -> Quantized:
    """llm-compressor's GPTQ in its own venv, on the calibration windows our GPTQ recipes use."""
    from safetensors.torch import load_file

    from compress.data import calibration_batch
    from compress.models import model_folder
    from compress.recipe import load_recipe

    python = os.environ.get(LLMC_PYTHON_ENV)
    if not python:
        raise SystemExit(
            "llm-compressor methods need --llmc-python (see scripts/peers/llmc_gptq.py)"
        )
    spec = load_recipe(ROOT / "recipes" / "smollm2-w4-gptq.yaml").calibration
    ids = calibration_batch(tokenizer, spec.dataset, spec.samples, spec.seq_len, spec.seed)
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(ids, Path(tmp) / "calibration.pt")
        command = [
            python, str(ROOT / "scripts" / "peers" / "llmc_gptq.py"),
            "--model-dir", str(model_folder(MODEL)), "--calibration", f"{tmp}/calibration.pt",
            "--bits", str(options["bits"]), "--group-size", str(options["group_size"]),
            "--out", f"{tmp}/weights.safetensors",
        ] + (["--symmetric"] if options["symmetric"] else [])  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
        if done.returncode != 0:
            raise RuntimeError(f"llm-compressor failed: {done.stderr.strip()[-2000:]}")
        measured = json.loads(done.stdout.strip().splitlines()[-1])
        weights = load_file(f"{tmp}/weights.safetensors")
    linears = decoder_linears(model)
    if set(weights) != {f"{name}.weight" for name in linears}:
        raise RuntimeError("llm-compressor returned weights for other modules than ours")
    for name, module in linears.items():
        module.weight.data.copy_(weights[f"{name}.weight"])
    # fp16 scale per group, plus a zero point at `bits` bits when asymmetric (as for ours)
    overhead = 16 + (0 if options["symmetric"] else options["bits"])
    return Quantized(
        options["bits"] + overhead / options["group_size"],
        seconds=measured["seconds"],
        peak_rss_mb=measured["peak_rss_mb"],
    )


PEERS_NOT_RUN = {
    "optimum-quanto 0.2.7": "installs, but its import fails against transformers 5.23 "
    "(ModuleNotFoundError for PreTrainedModel).",
    "GGUF k-quants (Q4_K, Q3_K, Q2_K)": "the gguf package can only dequantize them; producing "
    "them needs llama.cpp's C code.",
}

QUANTIZERS: dict[str, Callable[[nn.Module, Any, dict[str, Any]], Quantized]] = {
    "recipe": quantize_recipe,
    "gguf": quantize_gguf,
    "hqq": quantize_hqq,
    "llmc": quantize_llmc,
}


def run_one(name: str, windows: int, seq_len: int) -> dict[str, Any]:
    """Quantize with one method and evaluate it (in this process)."""
    import compress  # noqa: F401
    from compress.data import load_texts, token_windows
    from compress.evaluate.quality import compare_to_reference
    from compress.models import load_model

    kind, options = METHODS[name]
    model, tokenizer = load_model(MODEL)
    start = time.perf_counter()
    quantized = QUANTIZERS[kind](model, tokenizer, options)
    seconds = time.perf_counter() - start
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if quantized.seconds is not None and quantized.peak_rss_mb is not None:
        seconds, peak_rss_mb = quantized.seconds, quantized.peak_rss_mb  # the peer's own process
    reference, _ = load_model(MODEL)
    ids = token_windows(tokenizer, load_texts("builtin:wiki", "evaluation"), seq_len, windows)
    metrics = compare_to_reference(model, reference, ids, batch_size=4)
    return {
        "method": name,
        "kind": kind,
        "options": options,
        "bits_per_weight": quantized.bits_per_weight,
        "perplexity": metrics.perplexity,
        "reference_perplexity": metrics.reference_perplexity,
        "kl_mean": metrics.kl_mean,
        "top1_agreement": metrics.top1_agreement,
        "tokens": metrics.tokens,
        "quantize_seconds": seconds,
        "peak_rss_mb_during_quantization": peak_rss_mb,
    }


def render(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [
        "# Weight quantization quality on SmolLM2-135M",
        "",
        "Commands (a later one reruns only the methods it names): "
        + ", ".join(f"`{c}`" for c in meta.get("commands", [meta.get("command")]))
        + "  ",
        f"Machine: {meta['machine']}; {meta['date']}.  ",
        f"Evaluation: {meta['windows']} windows x {meta['seq_len']} tokens of builtin:wiki "
        "(evaluation split), KL(original ‖ quantized) in nats/token.",
        "",
        "Caveat: the builtin SmolLM2 weights went through GGUF Q4_1 (blocks of 32, asymmetric), "
        "so formats like it look unrealistically good; we compare at group 64.",
        "",
        "| method | bits/weight | ppl | KL | top-1 | quantize s | peak RSS MB |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in sorted(rows, key=lambda r: (-r.get("bits_per_weight", 0), r["method"])):
        if "error" in row:
            lines.append(f"| {row['method']} | – | – | – | – | – | failed: {row['error']} |")
            continue
        lines.append(
            f"| {row['method']} | {row['bits_per_weight']:.3f} | {row['perplexity']:.2f} | "
            f"{row['kl_mean']:.4f} | {100 * row['top1_agreement']:.1f}% | "
            f"{row['quantize_seconds']:.1f} | {row['peak_rss_mb_during_quantization']:.0f} |"
        )
    reference = next((r["reference_perplexity"] for r in rows if "error" not in r), None)
    if reference is not None:
        lines += ["", f"Original model perplexity on the same windows: {reference:.2f}."]
    if meta.get("notes"):
        lines += ["", "Notes:", ""] + [f"- {note}" for note in meta["notes"]]
    lines += ["", "Peers not in the table:", ""]
    lines += [f"- {peer}: {why}" for peer, why in PEERS_NOT_RUN.items()]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="*", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "quality")
    parser.add_argument("--peers-path", type=Path, default=None, help="folder with hqq installed")
    parser.add_argument(
        "--llmc-python",
        type=Path,
        default=None,
        help="python of llm-compressor's venv (scripts/peers/llmc_gptq.py)",
    )
    parser.add_argument(
        "--merge",
        action="store_true",
        help="keep the rows of methods not rerun from the existing JSON",
    )
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--render-only", action="store_true", help="rewrite the .md from the .json")
    args = parser.parse_args()

    if args.one:
        print(json.dumps(run_one(args.one, args.windows, args.seq_len)))
        return

    if args.render_only:
        data = json.loads(args.out.with_suffix(".json").read_text())
        args.out.with_suffix(".md").write_text(render(data["rows"], data["meta"]))
        return

    env = dict(os.environ)
    if args.peers_path:
        env["PYTHONPATH"] = os.pathsep.join(
            filter(None, [str(args.peers_path), env.get("PYTHONPATH")])
        )
    if args.llmc_python:
        env[LLMC_PYTHON_ENV] = str(args.llmc_python)
    command_line = "python scripts/bench_quality.py " + " ".join(sys.argv[1:])
    previous: dict[str, dict[str, Any]] = {}
    commands: list[str] = []
    notes: list[str] = []  # written by hand into the JSON, kept across --merge runs
    if args.merge and args.out.with_suffix(".json").exists():
        data = json.loads(args.out.with_suffix(".json").read_text())
        previous = {row["method"]: row for row in data["rows"]}
        commands = data["meta"].get("commands", [data["meta"].get("command")])
        notes = data["meta"].get("notes", [])
    for name in args.methods:
        print(f"[bench_quality] {name} ...", file=sys.stderr, flush=True)
        command = [sys.executable, __file__, "--one", name, "--windows", str(args.windows),
                   "--seq-len", str(args.seq_len)]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
        if done.returncode != 0:
            tail = done.stderr.strip().splitlines()[-1:] or ["?"]
            row: dict[str, Any] = {"method": name, "error": tail[0][:120]}
        else:
            row = json.loads(done.stdout.strip().splitlines()[-1])
        row["date"] = time.strftime("%Y-%m-%d")
        previous[name] = row
        print(f"[bench_quality] {row}", file=sys.stderr, flush=True)
        # written after every method, so a long run that dies keeps what it measured
        rows = list(previous.values())
        meta = {
            "notes": notes,
            "commands": [c for c in commands if c] + [command_line],
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
            "date": time.strftime("%Y-%m-%d"),
            "windows": args.windows,
            "seq_len": args.seq_len,
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
        args.out.with_suffix(".md").write_text(render(rows, meta))


if __name__ == "__main__":
    main()
