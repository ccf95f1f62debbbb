"""Decode speed and peak memory of a saved model, measured in a process of its own.

A run's report answers "how fast is it, how much memory does it take" for the export as a user
loads it: a fresh Python process imports compress, loads the folder with
``AutoModelForCausalLM.from_pretrained``, generates a few warm-up tokens, then times greedy
decoding of ``new_tokens`` tokens; its peak resident set size (``ru_maxrss``) is what the model
costs in memory, with nothing of the calling process (the original model, calibration data,
evaluation logits) counted. The original model folder is measured the same way, so the two
numbers compare. About ten seconds for a 135M model.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from compress.errors import CompressError

__all__ = ["GenerationSpeed", "measure_generation"]

_PROMPT = "The history of the city begins"
_TIMEOUT_S = 900

# Runs in the child; argv: folder, new tokens, threads (0 = torch's default)
_CHILD = r"""
import json, resource, sys, time
import torch
import compress  # noqa: F401  (loads compress exports)
from transformers import AutoModelForCausalLM, AutoTokenizer

folder, new_tokens, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
if threads:
    torch.set_num_threads(threads)
start = time.perf_counter()
model = AutoModelForCausalLM.from_pretrained(folder).eval()
tokenizer = AutoTokenizer.from_pretrained(folder)
load_s = time.perf_counter() - start
ids = tokenizer(sys.argv[4], return_tensors="pt")["input_ids"]
pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def run(count):
    with torch.inference_mode():
        model.generate(
            ids, max_new_tokens=count, min_new_tokens=count, do_sample=False, pad_token_id=pad
        )


def peak_rss():
    # VmHWM belongs to this process's own address space; ru_maxrss would report the parent's
    # resident set at fork time, which Linux carries across exec
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


run(4)  # warm-up: kernel choice, first-call allocations
times = []
for _ in range(3):
    start = time.perf_counter()
    run(new_tokens)
    times.append(time.perf_counter() - start)
times.sort()
print(json.dumps({
    "tokens_per_s": new_tokens / times[1],
    "peak_memory_bytes": peak_rss(),
    "load_s": load_s,
    "threads": torch.get_num_threads(),
}))
"""


@dataclass
class GenerationSpeed:
    """Greedy decode at batch 1 of a saved model, in a process of its own."""

    tokens_per_s: float
    """New tokens per second, median of three timed generations."""
    peak_memory_bytes: int
    """Peak resident memory of that process: Python, torch, the model and its decoding."""
    load_s: float
    threads: int

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


def measure_generation(
    folder: Path | str, *, new_tokens: int = 32, threads: int = 0
) -> GenerationSpeed:
    """Time greedy generation of ``new_tokens`` tokens from ``folder`` in a fresh process."""
    command = [sys.executable, "-c", _CHILD, str(folder), str(new_tokens), str(threads), _PROMPT]
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=_TIMEOUT_S, check=False
        )
    except subprocess.TimeoutExpired:
        raise CompressError(
            f"{folder}: speed measurement did not finish in {_TIMEOUT_S} s",
            hint="set evaluate.speed: false to skip it",
        ) from None
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise CompressError(
            f"{folder}: speed measurement failed (exit {done.returncode}): {last}",
            hint="set evaluate.speed: false to skip it",
        )
    data = json.loads(lines[-1])
    return GenerationSpeed(
        tokens_per_s=float(data["tokens_per_s"]),
        peak_memory_bytes=int(data["peak_memory_bytes"]),
        load_s=float(data["load_s"]),
        threads=int(data["threads"]),
    )
