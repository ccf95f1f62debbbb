"""What the quality benchmarks (bench_sparsity, bench_structured, bench_distill) share: the
machine line, and JSON rows that a run adds to (``--merge``) and rewrites after every case."""

from __future__ import annotations

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


def smollm2_and_eval_windows(windows: int = 32, seq_len: int = 512) -> tuple[Any, Any, Any]:
    """The builtin SmolLM2-135M, its tokenizer, and ``windows`` x ``seq_len`` token windows of
    the builtin:wiki evaluation split: what the quality benchmarks score on."""
    from compress.data import load_texts, token_windows
    from compress.models import load_model

    model, tokenizer = load_model("smollm2-135m")
    texts = load_texts("builtin:wiki", "evaluation")
    return model, tokenizer, token_windows(tokenizer, texts, seq_len, windows)


def save_keyed(out: Path, key: str, value: dict[str, Any]) -> None:
    """Set ``key`` in the JSON object at ``out`` (created if missing) and print the value."""
    saved = json.loads(out.read_text()) if out.exists() else {}
    saved[key] = value
    out.write_text(json.dumps(saved, indent=1) + "\n")
    print(json.dumps(value, indent=1))
