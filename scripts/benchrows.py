"""What the quality benchmarks (bench_sparsity, bench_structured, bench_distill) share: the
machine line, and JSON rows that a run adds to (``--merge``) and rewrites after every case."""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
from collections.abc import Iterable
from pathlib import Path
from typing import Any

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def machine() -> str:
    """CPU model, cores, torch version and architecture."""
    import torch

    lines = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
    model = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("Model name")), "")
    return f"{model}, {os.cpu_count()} cores, torch {torch.__version__}, {platform.machine()}"


def cpu_flags() -> str:
    """Which of AVX-512 and AVX2 the CPU has."""
    flags = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    return ", ".join(f for f in ("avx512f", "avx2") if f" {f}" in flags) or "neither"


def load_rows(out: Path, key: str, merge: bool) -> dict[str, Any]:
    """The saved rows by their ``key`` field when merging, else none."""
    if not (merge and out.exists()):
        return {}
    return {row[key]: row for row in json.loads(out.read_text())["rows"]}


def write_rows(
    out: Path, meta: dict[str, Any], rows: dict[str, Any], order: Iterable[str]
) -> list[dict[str, Any]]:
    """Write ``rows`` in ``order`` (names without a row skipped) with ``meta``; returns them."""
    ordered = [rows[name] for name in order if name in rows]
    out.write_text(json.dumps({"meta": meta, "rows": ordered}, indent=1, default=str) + "\n")
    return ordered


def add_dtype_argument(parser: argparse.ArgumentParser) -> None:
    """``--dtype`` for the model :func:`smollm2_and_eval_windows` loads: on CPUs without bf16
    arithmetic, float32 runs many times faster than the published bf16."""
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=("auto", "float32", "bfloat16"),
        help="model dtype (auto: bf16 as published; float32 where the CPU lacks bf16 arithmetic)",
    )


def smollm2_and_eval_windows(
    windows: int = 32, seq_len: int = 512, dtype: str = "auto"
) -> tuple[Any, Any, Any]:
    """The builtin SmolLM2-135M (in ``dtype``; ``auto``: its published bf16), its tokenizer, and
    ``windows`` x ``seq_len`` token windows of the builtin:wiki evaluation split: what the
    quality benchmarks score on."""
    from compress.data import load_texts, token_windows
    from compress.models import load_model

    model, tokenizer = load_model("smollm2-135m", dtype=dtype)
    texts = load_texts("builtin:wiki", "evaluation")
    return model, tokenizer, token_windows(tokenizer, texts, seq_len, windows)


def save_keyed(out: Path, key: str, value: dict[str, Any]) -> None:
    """Set ``key`` in the JSON object at ``out`` (created if missing) and print the value."""
    saved = json.loads(out.read_text()) if out.exists() else {}
    saved[key] = value
    out.write_text(json.dumps(saved, indent=1) + "\n")
    print(json.dumps(value, indent=1))


def run_peer_script(
    python: str, script: str, options: list[str], calibration: Any, peer: str = "llmc"
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run ``scripts/peers/<script>`` in a peer's venv (``python``: llm-compressor's, or
    torchao's where ``peer`` says so) on SmolLM2 with the ``calibration`` token windows; returns
    the decoder weights it wrote and what it measured (its last stdout line: seconds, peak
    RSS, ...)."""
    import tempfile

    import torch
    from safetensors.torch import load_file

    from compress.models import model_folder

    root = BENCHMARKS.parent
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(calibration, f"{tmp}/calibration.pt")
        command = [
            python, str(root / "scripts" / "peers" / script),
            "--model-dir", str(model_folder("smollm2-135m")),
            "--calibration", f"{tmp}/calibration.pt", "--out", f"{tmp}/weights.safetensors",
            *options,
        ]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True, cwd=root)
        if done.returncode != 0:
            who = "llm-compressor" if peer == "llmc" else peer
            raise RuntimeError(f"{who} failed: {done.stderr.strip()[-3000:]}")
        measured = json.loads(done.stdout.strip().splitlines()[-1])
        return load_file(f"{tmp}/weights.safetensors"), measured


def score_decoder_weights(
    weights: dict[str, Any], windows: int = 32, seq_len: int = 512, dtype: str = "auto"
) -> dict[str, float]:
    """Quality of SmolLM2 (in ``dtype``) with these decoder weights put in (``{module}.weight``
    keys, every one must name a module), against the original, as the pipeline's evaluation
    reports it."""
    from compress.evaluate.quality import compare_to_reference
    from compress.models import load_model

    reference, _, ids = smollm2_and_eval_windows(windows, seq_len, dtype)
    model, _ = load_model("smollm2-135m", dtype=dtype)
    for key, tensor in weights.items():
        module = model.get_submodule(key.removesuffix(".weight"))
        module.weight.data.copy_(tensor.to(module.weight.dtype))
    return quality_row(compare_to_reference(model, reference, ids, batch_size=4))


def quality_row(metrics: Any) -> dict[str, float]:
    """The quality fields a benchmark row keeps of a :class:`QualityMetrics`."""
    return {
        "perplexity": metrics.perplexity,
        "reference_perplexity": metrics.reference_perplexity,
        "kl_mean": metrics.kl_mean,
        "top1_agreement": metrics.top1_agreement,
        "tokens": metrics.tokens,
    }
