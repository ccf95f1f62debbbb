"""KV cache quantization on SmolLM2-135M: KL against the bf16 cache and the cache's memory.

Each of 32 windows x 512 tokens of the builtin:wiki evaluation split is fed in chunks of
``--chunk`` tokens through a cache, so every chunk attends to the stored (quantized) keys and
values of the chunks before it and to its own unrounded ones (what ``generate`` does after its
prompt). The reference is the same model and chunking with transformers' ``DynamicCache`` in
bf16. KL(reference || quantized cache) per predicted token, top-1 agreement, and the bytes the
cache holds at the end of a window against bf16's.

    python scripts/bench_kvcache.py                      # -> benchmarks/kvcache.json, .md
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from typing import Any

from benchrows import BENCHMARKS, cpu_flags, machine, smollm2_and_eval_windows

VARIANTS: dict[str, dict[str, Any]] = {
    "int8 g64": {"bits": 8, "group_size": 64, "ksort": False},
    "int4 g64": {"bits": 4, "group_size": 64, "ksort": False},
    "int4 g32": {"bits": 4, "group_size": 32, "ksort": False},
    "int4 g32 K-sorted": {"bits": 4, "group_size": 32, "ksort": True},
    "int4 g16": {"bits": 4, "group_size": 16, "ksort": False},
    "int4 g16 K-sorted": {"bits": 4, "group_size": 16, "ksort": True},
}


def run(chunk: int, windows: int, variants: list[str]) -> list[dict[str, Any]]:
    import torch
    from transformers import DynamicCache

    from compress.utils.quantized_cache import QuantizedKVCache

    model, _, ids = smollm2_and_eval_windows(windows, 512)
    model.eval()

    def feed(window: torch.Tensor, cache: Any) -> torch.Tensor:
        parts = []
        for start in range(0, window.shape[1], chunk):
            out = model(window[:, start : start + chunk], cache=cache, use_cache=True)
            parts.append(out.logits.float())
        return torch.cat(parts, dim=1)[0, :-1]

    rows = []
    with torch.inference_mode():
        references = []
        for window in ids:
            cache = DynamicCache(config=model.config)
            references.append(torch.log_softmax(feed(window[None], cache), -1))
            bf16_bytes = sum(
                layer.keys.numel() * 2 + layer.values.numel() * 2 for layer in cache.layers
            )
        for name in variants:
            spec = VARIANTS[name]
            start = time.perf_counter()
            kl_sum, agree, tokens, stored = 0.0, 0, 0, 0
            for window, reference in zip(ids, references, strict=True):
                cache = QuantizedKVCache(model.config, **spec)
                logq = torch.log_softmax(feed(window[None], cache), -1)
                kl_sum += float((reference.exp() * (reference - logq)).sum(-1).sum())
                agree += int((reference.argmax(-1) == logq.argmax(-1)).sum())
                tokens += reference.shape[0]
                stored = cache.stored_bytes()
            rows.append(
                {
                    "variant": name,
                    **spec,
                    "kl": kl_sum / tokens,
                    "top1": agree / tokens,
                    "memory_vs_bf16": stored / bf16_bytes,
                    "seconds": time.perf_counter() - start,
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chunk", type=int, default=64)
    parser.add_argument("--windows", type=int, default=32)
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    args = parser.parse_args()
    rows = run(args.chunk, args.windows, args.variants)
    data = {
        "machine": machine(),
        "cpu_flags": cpu_flags(),
        "date": datetime.date.today().isoformat(),
        "command": "python scripts/bench_kvcache.py " + " ".join(sys.argv[1:]),
        "chunk": args.chunk,
        "windows": args.windows,
        "rows": rows,
    }
    (BENCHMARKS / "kvcache.json").write_text(json.dumps(data, indent=2) + "\n")
    lines = [
        "# KV cache quantization on SmolLM2-135M",
        "",
        f"Machine: {data['machine']} ({data['cpu_flags']}); {data['date']}.",
        "",
        f"Command: `{data['command']}`",
        "",
        f"{args.windows} windows x 512 tokens of builtin:wiki (evaluation split), fed in chunks "
        f"of {args.chunk} tokens through the cache; reference: the same chunking with the bf16 "
        "`DynamicCache`. KL(reference || quantized) per predicted token; memory: the cache's "
        "bytes at the end of a window (codes + fp16 scales) over bf16's.",
        "",
        "| variant | KL | top-1 | memory vs bf16 | s |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['variant']} | {row['kl']:.4f} | {100 * row['top1']:.1f}% | "
            f"{row['memory_vs_bf16']:.3f} | {row['seconds']:.0f} |"
        )
    (BENCHMARKS / "kvcache.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
