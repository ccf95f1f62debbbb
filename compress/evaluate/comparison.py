"""Several runs side by side: one JSON-able row per run plus the original model's row, and the
markdown table; :mod:`compress.evaluate.html` draws the same rows as plots. Reads only the runs'
report dicts (:mod:`compress.evaluate.report`), so no model is loaded.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from compress.evaluate.report import (
    _bits,
    _fixed,
    _is_number,
    _kl,
    _list,
    _megabytes,
    _original_bits,
    _percent,
    _ppl,
    _seconds,
    _section,
    _table,
)

__all__ = ["compare_runs", "comparison_table", "render_comparison_markdown"]


def _first_quality(result: Mapping[str, Any]) -> Mapping[str, Any]:
    for metrics in _section(result, "quality").values():
        if isinstance(metrics, Mapping):
            return metrics
    return {}


def _task_scores(result: Mapping[str, Any], key: str) -> dict[str, float]:
    """``task`` → its main score (acc, else a perplexity) for ``key`` compressed/original."""
    found: dict[str, float] = {}
    for raw in _list(_section(result, "lm_eval"), "scores"):
        if not isinstance(raw, Mapping) or not _is_number(raw.get(key)):
            continue
        task, metric = str(raw.get("task")), str(raw.get("metric"))
        if metric in ("acc", "word_perplexity") and task not in found:
            found[task] = float(raw[key])
    return found


def _run_label(result: Mapping[str, Any], fallback: str) -> str:
    names = [str(p.get("name", "?")) for p in _list(result, "passes") if isinstance(p, Mapping)]
    size = _section(result, "size")
    formats = size.get("per_format")
    if isinstance(formats, Mapping) and formats:
        return f"{fallback} ({', '.join(str(k) for k in formats)})"
    return f"{fallback} ({'+'.join(names)})" if names else fallback


def _training_curve(result: Mapping[str, Any]) -> dict[str, list[float]] | None:
    """The loss and held-out KL against steps of the run's (last) training pass, if any."""
    curve = None
    for entry in _list(result, "passes"):
        series = entry.get("series") if isinstance(entry, Mapping) else None
        if isinstance(series, Mapping) and series.get("step"):
            curve = {
                key: [float(v) for v in series.get(key, []) if _is_number(v)]
                for key in ("step", "loss", "eval_step", "eval_kl")
            }
    return curve


def compare_runs(runs: Sequence[tuple[str, Mapping[str, Any]]]) -> dict[str, Any]:
    """One JSON-able row per run, plus the original model's row (from the first run's numbers).

    ``runs`` is ``(name, run result)`` pairs; a row holds size, bits per weight, the first
    perplexity corpus's ppl/KL/top-1, task scores, speed, peak memory and compression time; a
    value the run did not measure is None.
    """
    rows: list[dict[str, Any]] = []
    original: dict[str, Any] | None = None
    for name, result in runs:
        size, quality = _section(result, "size"), _first_quality(result)
        speed, timings = _section(result, "speed"), _section(result, "timings")
        passes_s = timings.get("passes_s")
        export_s = timings.get("export_s")
        rows.append(
            {
                "name": name,
                "label": _run_label(result, name),
                "original": False,
                "size_bytes": size.get("export_bytes"),
                "bits_per_weight": size.get("model_bits_per_weight"),
                "quantized_bits_per_weight": size.get("quantized_bits_per_weight"),
                "perplexity": quality.get("perplexity"),
                "kl_mean": quality.get("kl_mean"),
                "top1_agreement": quality.get("top1_agreement"),
                "tasks": _task_scores(result, "compressed"),
                "tokens_per_s": speed.get("tokens_per_s"),
                "peak_memory_bytes": speed.get("peak_memory_bytes"),
                "compression_s": (passes_s or 0) + (export_s or 0)
                if _is_number(passes_s)
                else None,
                "training": _training_curve(result),
                "per_layer_error": {
                    module: float(values["relative_error"])
                    for entry in _list(result, "passes")
                    if isinstance(entry, Mapping) and isinstance(entry.get("per_module"), Mapping)
                    for module, values in entry["per_module"].items()
                    if isinstance(values, Mapping) and _is_number(values.get("relative_error"))
                },
            }
        )
        if original is None:
            original = {
                "name": "original",
                "label": f"original ({_section(result, 'model').get('source', '?')})",
                "original": True,
                "size_bytes": size.get("original_bytes"),
                "bits_per_weight": _original_bits(result),
                "quantized_bits_per_weight": None,
                "perplexity": quality.get("reference_perplexity"),
                "kl_mean": 0.0 if quality.get("kl_mean") is not None else None,
                "top1_agreement": 1.0 if quality.get("top1_agreement") is not None else None,
                "tasks": _task_scores(result, "original"),
                "tokens_per_s": speed.get("reference_tokens_per_s"),
                "peak_memory_bytes": speed.get("reference_peak_memory_bytes"),
                "compression_s": None,
                "training": None,
                "per_layer_error": {},
            }
    datasets = [next(iter(_section(r, "quality")), None) for _, r in runs]
    return {
        "runs": ([original] if original else []) + rows,
        "perplexity_dataset": next((d for d in datasets if d), None),
        "tasks": sorted({task for row in rows for task in row["tasks"]}),
    }


def comparison_table(comparison: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the runs table, shared by the markdown and the HTML report."""
    tasks = list(comparison.get("tasks") or [])
    header = [
        "run", "size", "bits/weight", "ppl", "KL", "top-1",
        *tasks, "tokens/s", "peak memory", "compression time",
    ]  # fmt: skip
    rows = []
    for row in comparison.get("runs") or []:
        task_cells = [
            _percent(row["tasks"].get(t)) if row["tasks"].get(t, 2) <= 1 else _ppl(row["tasks"][t])
            for t in tasks
        ]
        tokens_per_s = row.get("tokens_per_s")
        rows.append(
            [
                str(row.get("label")),
                _megabytes(row.get("size_bytes")),
                _bits(row.get("bits_per_weight")),
                _ppl(row.get("perplexity")),
                _kl(row.get("kl_mean")),
                _percent(row.get("top1_agreement")),
                *task_cells,
                _fixed(tokens_per_s, 1),
                _megabytes(row.get("peak_memory_bytes")),
                _seconds(row.get("compression_s")),
            ]
        )
    return header, rows


def render_comparison_markdown(
    comparison: Mapping[str, Any], images: Mapping[str, str] | None = None
) -> str:
    """The runs table (and links to plot images, if given) as markdown."""
    header, rows = comparison_table(comparison)
    lines = ["# compress report: comparison of runs", ""]
    dataset = comparison.get("perplexity_dataset")
    if dataset:
        lines += [f"Perplexity, KL and top-1 on {dataset}; the original row is the model the "
                  "first run compressed.", ""]  # fmt: skip
    lines += [*_table(header, rows), ""]
    for title, path in (images or {}).items():
        lines += [f"## {title}", "", f"![{title}]({path})", ""]
    return "\n".join(lines).rstrip("\n") + "\n"
