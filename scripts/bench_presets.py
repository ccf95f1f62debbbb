"""Peers' weight-only presets against ours, side by side: llm-compressor's FP8 schemes and
torchao's int8 / int4 / float8 configs, each beside our round-to-nearest and GPTQ at the same
format.

Each case quantizes every Linear of SmolLM2-135M's 30 decoder layers and is scored in one process
on the same evaluation windows against the same original:

* ``llmc-fp8-dynamic`` / ``llmc-fp8-block``: llm-compressor's ``FP8_DYNAMIC`` (E4M3, one scale
  per output channel) and ``FP8_BLOCK`` (E4M3, 128 x 128 blocks) presets, run in its own venv by
  ``scripts/peers/llmc_scheme.py``; only their weights are taken (the presets also quantize
  activations, which this weight-only comparison leaves out);
* ``torchao-*``: torchao 0.18's ``Int8WeightOnlyConfig``, ``IntxWeightOnlyConfig`` (int4, groups
  of 64, symmetric or asymmetric), ``Float8WeightOnlyConfig`` and its HQQ int4 search, run in
  its own venv by ``scripts/peers/torchao_quant.py`` (set-up in its docstring);
* ``ours-*``: our ``rtn`` and ``gptq`` passes at the same formats (int4 in groups of 64:
  SmolLM2's 576 and 192 are not multiples of 128; GPTQ with act-order on 64 x 512 calibration
  tokens, as the recipes).

    python scripts/bench_presets.py --llmc-python /tmp/llmc/venv/bin/python --dtype float32
    python scripts/bench_presets.py --merge --torchao-python /tmp/tao/venv/bin/python \
        --dtype float32 --cases torchao-int8 ours-int8-channel ...
    python scripts/bench_presets.py --table      # the markdown of the JSON
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import shlex
import sys
import time
from typing import Any

from benchrows import (
    BENCHMARKS,
    add_dtype_argument,
    cpu_flags,
    load_rows,
    machine,
    quality_row,
    run_peer_script,
    score_decoder_weights,
    smollm2_and_eval_windows,
    write_rows,
)

WINDOWS = 32
SEQ_LEN = 512
CASES: dict[str, dict[str, Any]] = {
    "llmc-fp8-dynamic": {"scheme": "FP8_DYNAMIC"},
    "llmc-fp8-block": {"scheme": "FP8_BLOCK"},
    "ours-fp8-channel": {"pass": "rtn", "format": "fp8_e4m3", "scaling": "channel"},
    "ours-fp8-block64": {
        "pass": "rtn",
        "format": "fp8_e4m3",
        "scaling": "block",
        "scale_block": 64,
    },
    "ours-fp8-channel-gptq": {  # recipes/smollm2-fp8.yaml
        "pass": "gptq",
        "format": "fp8_e4m3",
        "scaling": "channel",
        "act_order": True,
    },
    "torchao-int8": {"torchao": "int8-wo"},
    "ours-int8-channel": {"pass": "rtn", "bits": 8, "group_size": None, "symmetric": True},
    "torchao-int4-g64-sym": {"torchao": "int4-wo-g64"},
    "ours-int4-g64-sym": {"pass": "rtn", "bits": 4, "group_size": 64, "symmetric": True},
    "ours-int4-g64-sym-mse": {
        "pass": "rtn",
        "bits": 4,
        "group_size": 64,
        "symmetric": True,
        "observer": "mse",
    },
    "ours-int4-g64-sym-gptq": {
        "pass": "gptq",
        "bits": 4,
        "group_size": 64,
        "symmetric": True,
        "act_order": True,
        "observer": "mse",
    },
    "torchao-int4-g64-asym": {"torchao": "int4-wo-g64-asym"},
    "torchao-int4-hqq-g64": {"torchao": "int4-hqq-g64"},
    "ours-int4-g64-asym-mse": {
        "pass": "rtn",
        "bits": 4,
        "group_size": 64,
        "symmetric": False,
        "observer": "mse",
    },
    "ours-int4-g64-asym-gptq": {  # recipes/smollm2-w4-gptq.yaml, 64 x 512 calibration
        "pass": "gptq",
        "bits": 4,
        "group_size": 64,
        "symmetric": False,
        "act_order": True,
        "observer": "mse",
    },
    "torchao-fp8": {"torchao": "fp8-wo"},
}
TORCHAO_CONFIGS = {  # what scripts/peers/torchao_quant.py runs for each --config
    "int8-wo": "Int8WeightOnlyConfig() (int8, a scale per output channel, symmetric)",
    "int4-wo-g64": "IntxWeightOnlyConfig(int4, PerGroup(64)) (symmetric)",
    "int4-wo-g64-asym": "IntxWeightOnlyConfig(int4, PerGroup(64), ASYMMETRIC)",
    "int4-hqq-g64": "its HQQ int4 search, group 64, asymmetric (Int4WeightOnlyConfig's "
    "hqq primitive; the config itself packs for CUDA only)",
    "fp8-wo": "Float8WeightOnlyConfig() (E4M3, a scale per output channel)",
}
GPTQ_CALIBRATION = 64  # windows of SEQ_LEN tokens, as recipes/smollm2-fp8.yaml


def run_case(name: str, peers: dict[str, str | None], dtype: str) -> dict[str, Any]:
    """One case's quality (and how long its quantization took); ``peers``: the python of
    llm-compressor's venv (``llmc``) and of torchao's (``torchao``), where given."""
    from compress.data import calibration_batch
    from compress.evaluate.quality import compare_to_reference
    from compress.models import load_model
    from compress.registry import PassContext, get_pass

    entry = CASES[name]
    start = time.perf_counter()
    if "scheme" in entry or "torchao" in entry:
        peer, script, option, setup = (
            ("llmc", "llmc_scheme.py", ["--scheme", entry["scheme"]], "llmc_gptq.py")
            if "scheme" in entry
            else ("torchao", "torchao_quant.py", ["--config", entry["torchao"]], "torchao_quant.py")
        )
        python = peers[peer]
        if not python:
            raise SystemExit(f"{name} needs --{peer}-python (see scripts/peers/{setup})")
        _, tokenizer = load_model("smollm2-135m")
        ids = calibration_batch(tokenizer, "builtin:wiki", 16, SEQ_LEN, 0)  # RTN reads none
        weights, measured = run_peer_script(python, script, option, ids, peer=peer)
        quality = score_decoder_weights(weights, WINDOWS, SEQ_LEN, dtype)
        return {"quality": quality, "quantize_s": measured["seconds"]}
    reference, tokenizer, windows = smollm2_and_eval_windows(WINDOWS, SEQ_LEN, dtype)
    model = copy.deepcopy(reference)
    registered = get_pass(entry["pass"])
    context = PassContext()
    if registered.calibrated:
        context.calibration = calibration_batch(
            tokenizer, "builtin:wiki", GPTQ_CALIBRATION, SEQ_LEN, 0
        )
    settings = {k: v for k, v in entry.items() if k != "pass"}
    registered.fn(model, registered.config_cls(**settings), context)
    seconds = time.perf_counter() - start
    quality = quality_row(compare_to_reference(model, reference, windows, batch_size=4))
    return {"quality": quality, "quantize_s": seconds}


def render(meta: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    lines = [
        "# Weight-only presets on SmolLM2-135M: llm-compressor's and torchao's beside our rtn "
        "and gptq",
        "",
        *(f"    {command}" for command in meta["commands"]),
        "",
        f"Machine: {meta['machine']} ({meta['cpu_flags']}). Every Linear of the 30 decoder "
        f"layers quantized (embeddings and lm_head kept); {WINDOWS} windows x {SEQ_LEN} tokens "
        "of the builtin:wiki evaluation split, KL(original ‖ quantized) in nats/token against "
        "the original in the same dtype. llm-compressor 0.14 and torchao 0.18 each in its own "
        "venv, their quantized weights read back dequantized; llm-compressor's FP8 presets also "
        "quantize activations, left out here (weights only, like ours). The builtin weights "
        "went through GGUF Q4_1 (blocks of 32, asymmetric): asymmetric int4 looks better on "
        "them than on a model that did not.",
        "",
        "| case | what | model dtype | ppl | KL | top-1 | date |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        q = row["quality"]
        entry = CASES[row["case"]]
        what = (
            TORCHAO_CONFIGS[entry["torchao"]]
            if "torchao" in entry
            else ", ".join(f"{k}: {v}" for k, v in entry.items())
        )
        lines.append(
            f"| {row['case']} | {what} | "
            f"{row['dtype']} | {q['perplexity']:.2f} | {q['kl_mean']:.4f} | "
            f"{100 * q['top1_agreement']:.1f}% | {row['date']} |"
        )
    if rows:
        reference = rows[0]["quality"]["reference_perplexity"]
        lines += ["", f"Original model perplexity on the same windows: {reference:.2f}."]
    kl = {row["case"]: row["quality"]["kl_mean"] for row in rows}
    notes = []
    if {"llmc-fp8-dynamic", "ours-fp8-channel"} <= set(kl):
        peer, ours = kl["llmc-fp8-dynamic"], kl["ours-fp8-channel"]
        same = abs(peer - ours) <= 1e-9 * max(peer, 1e-12)
        notes.append(
            "Per-channel round-to-nearest: "
            + (
                f"the same KL to nine digits for both ({ours:.6f}): one algorithm (the row's "
                "absmax over 448 as its scale, nearest E4M3 code)."
                if same
                else f"ours {ours:.4f}, llm-compressor's {peer:.4f}."
            )
        )
    for ours_case in ("ours-fp8-block64", "ours-fp8-channel-gptq"):
        if ours_case in kl and "llmc-fp8-block" in kl:
            ratio = kl[ours_case] / kl["llmc-fp8-block"]
            notes.append(
                f"{ours_case}: KL {kl[ours_case]:.4f}, {ratio:.2f} of llm-compressor's best "
                f"preset (FP8_BLOCK, {kl['llmc-fp8-block']:.4f})."
            )
    pairs = [  # (peer, ours): the same format; ours by round-to-nearest, or by gptq
        ("torchao-int8", "ours-int8-channel"),
        ("torchao-int4-g64-sym", "ours-int4-g64-sym"),
        ("torchao-int4-g64-sym", "ours-int4-g64-sym-gptq"),
        ("torchao-int4-g64-asym", "ours-int4-g64-asym-mse"),
        ("torchao-int4-hqq-g64", "ours-int4-g64-asym-mse"),
        ("torchao-int4-hqq-g64", "ours-int4-g64-asym-gptq"),
        ("torchao-fp8", "ours-fp8-channel"),
        ("torchao-fp8", "ours-fp8-channel-gptq"),
    ]
    for peer, ours_case in pairs:
        if peer in kl and ours_case in kl:
            notes.append(
                f"{ours_case} against {peer}: KL {kl[ours_case]:.4f} against "
                f"{kl[peer]:.4f} ({kl[ours_case] / kl[peer]:.2f} of it)."
            )
    notes += [f"{row['case']}: {row['note']}" for row in rows if row.get("note")]
    if notes:
        lines += ["", "Notes:", "", *(f"- {note}" for note in notes)]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    parser.add_argument("--llmc-python", help="python of llm-compressor's venv (llmc-* cases)")
    parser.add_argument("--torchao-python", help="python of torchao's venv (torchao-* cases)")
    parser.add_argument("--merge", action="store_true", help="keep rows of cases not rerun")
    parser.add_argument("--table", action="store_true", help="write the markdown of the JSON")
    add_dtype_argument(parser)
    args = parser.parse_args()
    out = BENCHMARKS / "presets.json"
    if args.table:
        saved = json.loads(out.read_text())
        (BENCHMARKS / "presets.md").write_text(render(saved["meta"], saved["rows"]))
        return
    rows = load_rows(out, "case", args.merge)
    saved_meta = json.loads(out.read_text())["meta"] if args.merge and out.exists() else {}
    command = shlex.join(["python", "scripts/bench_presets.py", *sys.argv[1:]])
    meta = {
        "machine": machine(),
        "cpu_flags": cpu_flags(),
        "commands": [*saved_meta.get("commands", []), command],
    }
    peers = {"llmc": args.llmc_python, "torchao": args.torchao_python}
    for name in args.cases:
        print(f"== {name}", flush=True)
        row = run_case(name, peers, args.dtype)
        rows[name] = {
            "case": name,
            **row,
            "dtype": args.dtype,
            "date": datetime.date.today().isoformat(),
        }
        print(json.dumps(rows[name], indent=1, default=str), flush=True)
        ordered = write_rows(out, meta, rows, CASES)
        (BENCHMARKS / "presets.md").write_text(render(meta, ordered))


if __name__ == "__main__":
    main()
