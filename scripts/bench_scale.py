"""Scale check: GPTQ int4 on a Llama model larger than the memory we allow ourselves.

A Llama-architecture model with random weights (≥ 4 GB of fp32 by default) is written shard by
shard straight to disk (one decoder layer in memory at a time), then quantized with GPTQ int4
through ``compress apply`` with ``model.offload: true`` in a child process. The child's peak
resident memory (``ru_maxrss``: load, calibration, quantization and the shard-by-shard export
together) is compared with the model's size on disk; the target is ≤ 30%.

    python scripts/bench_scale.py                          # -> benchmarks/scale.{json,md}
    python scripts/bench_scale.py --layers 4 --keep        # a quicker, smaller run

Random weights say nothing about quality; this measures memory and time only. The tokenizer is
SmolLM2's (vocabulary 49152), so the embedding and head have a realistic size.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]


def layer_tensors(index: int, hidden: int, intermediate: int, kv_heads: int, heads: int):
    """One decoder layer's weights, named as transformers' Llama names them (fp32, std 0.02)."""
    generator = torch.Generator().manual_seed(1000 + index)
    kv = hidden * kv_heads // heads
    shapes = {
        "self_attn.q_proj.weight": (hidden, hidden),
        "self_attn.k_proj.weight": (kv, hidden),
        "self_attn.v_proj.weight": (kv, hidden),
        "self_attn.o_proj.weight": (hidden, hidden),
        "mlp.gate_proj.weight": (intermediate, hidden),
        "mlp.up_proj.weight": (intermediate, hidden),
        "mlp.down_proj.weight": (hidden, intermediate),
    }
    tensors = {
        f"model.layers.{index}.{name}": torch.randn(shape, generator=generator) * 0.02
        for name, shape in shapes.items()
    }
    for norm in ("input_layernorm", "post_attention_layernorm"):
        tensors[f"model.layers.{index}.{norm}.weight"] = torch.ones(hidden)
    return tensors


def write_model(folder: Path, args: argparse.Namespace) -> int:
    """Write config, tokenizer and one safetensors shard per layer; returns bytes of weights."""
    from transformers import AutoTokenizer, LlamaConfig

    from compress.models import resolve_builtin

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(str(resolve_builtin("smollm2-135m")))
    tokenizer.save_pretrained(folder)
    vocab = len(tokenizer)
    config = LlamaConfig(
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        vocab_size=vocab,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        dtype="float32",
    )
    config.save_pretrained(folder)
    weight_map: dict[str, str] = {}
    total = 0
    count = args.layers + 2
    generator = torch.Generator().manual_seed(0)

    def write(index: int, tensors: dict[str, torch.Tensor]) -> None:
        nonlocal total
        name = f"model-{index + 1:05d}-of-{count:05d}.safetensors"
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
        total += sum(t.numel() * t.element_size() for t in tensors.values())

    write(0, {"model.embed_tokens.weight": torch.randn(vocab, args.hidden, generator=generator)})
    for index in range(args.layers):
        write(
            index + 1,
            layer_tensors(index, args.hidden, args.intermediate, args.kv_heads, args.heads),
        )
        print(f"  wrote layer {index + 1}/{args.layers}", flush=True)
    write(
        count - 1,
        {
            "model.norm.weight": torch.ones(args.hidden),
            "lm_head.weight": torch.randn(vocab, args.hidden, generator=generator) * 0.02,
        },
    )
    shard_index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(shard_index, indent=2))
    return total


def run_apply(model_dir: Path, export_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    recipe = {
        "model": {"name": str(model_dir), "offload": True},
        "calibration": {
            "dataset": "builtin:wiki",
            "samples": args.samples,
            "seq_len": args.seq_len,
        },
        # batch_size 2: the layer forward's temporaries (MLP activations) for 2 x 256 tokens at
        # a time; the Hessians are the same sums in any batching
        "passes": [
            {"pass": "gptq", "bits": 4, "group_size": 128, "symmetric": True, "batch_size": 2}
        ],
        "export": {"dir": str(export_dir), "overwrite": True},
    }
    recipe_path = export_dir.parent / "scale-recipe.yaml"
    recipe_path.write_text(json.dumps(recipe, indent=2))  # JSON is YAML
    command = [sys.executable, "-m", "compress.cli", "apply", str(recipe_path), "--no-evaluate"]
    start = time.perf_counter()
    child = subprocess.run(command, cwd=ROOT, text=True, capture_output=True)
    wall = time.perf_counter() - start
    if child.returncode != 0:
        sys.stderr.write(child.stdout[-4000:] + child.stderr[-4000:])
        raise SystemExit(f"compress apply failed with exit code {child.returncode}")
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # Linux: kilobytes
    return {"command": " ".join(command), "wall_s": wall, "peak_rss_bytes": peak_kb * 1024}


def render(result: dict[str, Any]) -> str:
    gb = 1024**3
    ratio = result["peak_rss_bytes"] / result["model_bytes"]
    lines = [
        "# Scale check: offloaded GPTQ int4 on a model larger than the memory budget",
        "",
        f"Command: `{result['bench_command']}`  ",
        f"Machine: {result['machine']}  ",
        f"Date: {result['date']}",
        "",
        "| model | layers | parameters | weights on disk | calibration | wall time | peak RSS |"
        " peak RSS / size | target |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| random Llama, hidden {result['config']['hidden']}, "
        f"MLP {result['config']['intermediate']}"
        f" | {result['config']['layers']} | {result['parameters'] / 1e9:.2f} B | "
        f"{result['model_bytes'] / gb:.2f} GiB (fp32) | {result['config']['samples']} x "
        f"{result['config']['seq_len']} tokens | {result['apply']['wall_s'] / 60:.1f} min | "
        f"{result['peak_rss_bytes'] / gb:.2f} GiB | {ratio:.1%} | ≤ 30% "
        f"{'met' if ratio <= 0.30 else 'MISSED'} |",
        "",
        f"Export: {result['export_bytes'] / gb:.2f} GiB on disk "
        f"({result['export_bytes'] / result['model_bytes']:.1%} of the original), written tensor "
        "by tensor. Peak RSS is the `compress apply` child's `ru_maxrss`: loading the skeleton, "
        "calibration capture, GPTQ layer by layer (one layer's weights and Hessians in memory), "
        "per-layer checkpoints and the export, all together.",
        "",
        "Recipe: `gptq` bits 4, group 128, symmetric, calibration batch size 2, with "
        "`model.offload: true`; calibration "
        "text `builtin:wiki`. Random weights: this measures memory and time, not quality.",
    ]
    if result.get("notes"):  # written by hand into the JSON, kept by later runs
        notes = result["notes"]  # "  - " starts a sub-point of the note before
        lines += ["", "Notes:", ""] + [n if n.startswith("  - ") else f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def _tensor_bytes(path: Path) -> int:
    """Bytes of tensor data in a safetensors file: its size less the 8-byte length and header."""
    with open(path, "rb") as handle:
        header_length = struct.unpack("<Q", handle.read(8))[0]
    return path.stat().st_size - 8 - header_length


def _same_model(model_dir: Path, args: argparse.Namespace) -> bool:
    """Whether ``model_dir`` holds a complete model written with this run's shape."""
    index, config = model_dir / "model.safetensors.index.json", model_dir / "config.json"
    if not (index.is_file() and config.is_file()):
        return False
    saved = json.loads(config.read_text())
    files = set(json.loads(index.read_text())["weight_map"].values())
    return (
        saved.get("num_hidden_layers") == args.layers
        and saved.get("hidden_size") == args.hidden
        and saved.get("intermediate_size") == args.intermediate
        and all((model_dir / name).is_file() for name in files)
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=20)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/compress-scale"))
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks")
    parser.add_argument("--keep", action="store_true", help="keep the generated model and export")
    parser.add_argument(
        "--reuse-model",
        action="store_true",
        help="reuse a model kept (--keep) in --workdir by an earlier run with the same shape",
    )
    parser.add_argument("--render-only", action="store_true", help="rewrite the .md from the .json")
    args = parser.parse_args(argv)
    if args.render_only:
        result = json.loads((args.out / "scale.json").read_text())
        (args.out / "scale.md").write_text(render(result))
        return 0

    model_dir, export_dir = args.workdir / "model", args.workdir / "export"
    if args.reuse_model and _same_model(model_dir, args):
        print(f"reusing the random Llama in {model_dir}", flush=True)
        model_bytes = sum(_tensor_bytes(p) for p in model_dir.glob("*.safetensors"))
        shutil.rmtree(export_dir, ignore_errors=True)
        shutil.rmtree(args.workdir / ".export.work", ignore_errors=True)
    else:
        shutil.rmtree(args.workdir, ignore_errors=True)
        print(f"writing a random Llama to {model_dir} …", flush=True)
        model_bytes = write_model(model_dir, args)
    print(f"  {model_bytes / 1024**3:.2f} GiB of weights; running compress apply …", flush=True)
    apply = run_apply(model_dir, export_dir, args)
    export_bytes = sum(p.stat().st_size for p in export_dir.glob("*.safetensors"))
    inspect = subprocess.run(
        [sys.executable, "-m", "compress.cli", "inspect", str(export_dir)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    if inspect.returncode != 0:
        raise SystemExit(f"compress inspect rejected the export:\n{inspect.stdout}{inspect.stderr}")
    result = {
        "bench_command": "python scripts/bench_scale.py " + " ".join(argv or sys.argv[1:]),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
        f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 1024**3:.0f} GiB RAM, "
        f"torch {torch.__version__}",
        "date": time.strftime("%Y-%m-%d"),
        "config": {
            k: getattr(args, k.replace("-", "_"))
            for k in ("layers", "hidden", "intermediate", "heads", "kv_heads", "samples", "seq_len")
        },
        "parameters": model_bytes // 4,
        "model_bytes": model_bytes,
        "export_bytes": export_bytes,
        "peak_rss_bytes": apply["peak_rss_bytes"],
        "peak_rss_fraction": apply["peak_rss_bytes"] / model_bytes,
        "apply": apply,
    }
    previous = args.out / "scale.json"
    if previous.is_file():
        result["notes"] = json.loads(previous.read_text()).get("notes", [])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "scale.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "scale.md").write_text(render(result))
    print(render(result))
    if not args.keep:
        shutil.rmtree(args.workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
