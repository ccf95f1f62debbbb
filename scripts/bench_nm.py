"""The decoder bytes of a 2:4 export stored sparse (the nm_int format), against the dense int4
layout of the very same codes (each ``NMLinear``'s codes re-packed as the ``QuantLinear`` a
``sparse: false`` export stores). GEMV timings of the format: ``scripts/bench_gemv.py``.

    python scripts/bench_nm.py out/smollm2-2of4-sparsegpt-w4     # -> benchmarks/nm.json, nm.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path
from typing import Any

from benchrows import BENCHMARKS, cpu_flags, machine


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
    e = data["export"]
    lines = [
        "# 2:4 sparse int4 (nm_int): bytes of an export",
        "",
        f"Machine: {data['machine']} ({data['cpu_flags']}); {data['date']}.",
        "",
        f"Command: `{data['command']}`",
        "",
        f"Export `{e['export']}`: {e['sparse_layers']} layers stored 2:4. Decoder-layer "
        f"bytes {e['decoder_bytes']:,} against {e['dense_int4_decoder_bytes']:,} for the "
        f"dense int4 layout of the same codes: **{e['ratio']:.3f}**. Safetensors on disk: "
        f"{e['safetensors_bytes']:,} bytes.",
        "",
        "GEMV timings of the format beside the others: [gemv.md](gemv.md).",
        "",
    ]
    out.write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("export", type=Path, help="an export written with sparse: true")
    args = parser.parse_args()
    data = {
        "machine": machine(),
        "cpu_flags": cpu_flags(),
        "date": datetime.date.today().isoformat(),
        "command": "python scripts/bench_nm.py " + " ".join(sys.argv[1:]),
        "export": export_bytes(args.export),
    }
    print(json.dumps(data["export"]))
    (BENCHMARKS / "nm.json").write_text(json.dumps(data, indent=2) + "\n")
    write_markdown(data, BENCHMARKS / "nm.md")


if __name__ == "__main__":
    main()
