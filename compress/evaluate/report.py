"""The run report: one JSON-able dict, written as ``report.json`` and rendered as ``report.md``.

The pipeline assembles a :class:`RunResult`; this module only formats and stores it, so a report
can be re-rendered later (``compress report out/``) from its JSON without the model. It imports
no torch: reading a report is cheap.

Shape of a run result (sections marked *optional* may be absent; renderers skip what is missing)::

    {
      "recipe": {...},                      # the resolved recipe, as validated
      "model": {"source": str, "parameters": int},
      "passes": [                           # one per pass, in order (PassReport.to_dict())
        {"name": str, "touched": [str], "skipped": {module: reason},
         "metrics": {str: float}, "per_module": {module: {"relative_error": float, ...}}}
      ],
      "size": {
        "original_bytes": int, "export_bytes": int,
        "quantized_params": int, "quantized_bits_per_weight": float,
        "model_bits_per_weight": float,
        "adapter_bytes": int, "corrected_bits_per_weight": float,  # optional: adapters
        "original_bits_per_weight": float,  # optional; else 8 * original_bytes / parameters
        "note": str,                        # optional: why sizes are missing (e.g. no export)
        "per_format": {"int4 g64 sym": {"modules": int, "params": int, "bits_per_weight": float}}
      },
      "quality": {"<dataset spec>": QualityMetrics.to_dict()},      # optional
      "samples": [{"prompt": str, "original": str, "compressed": str}],  # optional
      "timings": {"load_s": float, "passes_s": float, "export_s": float, "evaluate_s": float},
      "environment": {"compress": str, "torch": str, "transformers": str, "python": str,
                      "machine": str, "cpu_count": int},
      "caveats": [str],
      "lm_eval": {"scores": [PairedScore.to_dict()], ...},   # optional: `compress eval`
      "speed": {"tokens_per_s": float, "peak_memory_bytes": int,            # optional
                "reference_tokens_per_s": float, "reference_peak_memory_bytes": int}
    }

Several runs compare in :mod:`compress.evaluate.comparison` (one row per run plus the original,
JSON-able, and its markdown); :mod:`compress.evaluate.html` draws the same as plots.

Non-finite floats (a diverged model's perplexity is ``inf``) are written as JSON ``Infinity`` /
``NaN``, which Python reads back exactly.
"""

from __future__ import annotations

import json
import math
import os
import platform
import tempfile
from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any, TypedDict, TypeGuard

from compress.errors import ExportError

__all__ = [
    "JSON_NAME",
    "MARKDOWN_NAME",
    "Environment",
    "FormatSize",
    "ModelInfo",
    "PassResult",
    "QualityDict",
    "RunResult",
    "Sample",
    "SizeInfo",
    "Timings",
    "collect_environment",
    "lm_eval_rows",
    "read_report",
    "render_markdown",
    "summary_rows",
    "top_errors",
    "write_report",
]

JSON_NAME = "report.json"
MARKDOWN_NAME = "report.md"

_MISSING = "—"


# --- shape ---------------------------------------------------------------------------------------


class ModelInfo(TypedDict):
    source: str
    parameters: int


class PassResult(TypedDict):
    """One pass's :class:`compress.registry.PassReport` as a dict."""

    name: str
    touched: list[str]
    skipped: dict[str, str]
    metrics: dict[str, float]
    per_module: dict[str, dict[str, float]]


class FormatSize(TypedDict):
    modules: int
    params: int
    bits_per_weight: float


class _SizeRequired(TypedDict):
    original_bytes: int
    export_bytes: int
    quantized_params: int
    quantized_bits_per_weight: float
    model_bits_per_weight: float
    per_format: dict[str, FormatSize]


class SizeInfo(_SizeRequired, total=False):
    original_bits_per_weight: float
    """Bits per weight of the original as loaded (16 for bf16); derived from bytes if absent."""
    note: str
    """Why some sizes are missing (e.g. no export); shown under the summary."""


class QualityDict(TypedDict):
    """:meth:`compress.evaluate.quality.QualityMetrics.to_dict` (kept in sync by a test)."""

    tokens: int
    windows: int
    seq_len: int
    perplexity: float
    reference_perplexity: float | None
    kl_mean: float | None
    top1_agreement: float | None


class Sample(TypedDict):
    prompt: str
    original: str
    compressed: str


class Timings(TypedDict):
    load_s: float
    passes_s: float
    export_s: float
    evaluate_s: float


class Environment(TypedDict):
    compress: str
    torch: str
    transformers: str
    python: str
    machine: str
    cpu_count: int


class _RunResultRequired(TypedDict):
    recipe: dict[str, Any]
    model: ModelInfo
    passes: list[PassResult]
    size: SizeInfo
    timings: Timings
    environment: Environment
    caveats: list[str]


class RunResult(_RunResultRequired, total=False):
    """Everything a run produced; see the module docstring for the layout."""

    quality: dict[str, QualityDict]
    samples: list[Sample]


def collect_environment() -> Environment:
    """Versions and machine, so a report says what produced its numbers."""

    def version(package: str) -> str:
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return "not installed"

    return {
        "compress": version("compress-llm"),
        "torch": version("torch"),
        "transformers": version("transformers"),
        "python": platform.python_version(),
        "machine": f"{platform.system()} {platform.machine()}".strip(),
        "cpu_count": os.cpu_count() or 0,
    }


# --- number formatting ---------------------------------------------------------------------------


def _is_number(value: Any) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _fixed(value: Any, decimals: int) -> str:
    if not _is_number(value):
        return _MISSING
    if not math.isfinite(value):
        return str(float(value))  # "inf", "nan": a broken model must show, not vanish
    return f"{value:.{decimals}f}"


def _ppl(value: Any) -> str:
    return _fixed(value, 2)


def _kl(value: Any) -> str:
    return _fixed(value, 4)


def _bits(value: Any) -> str:
    return _fixed(value, 3)


def _percent(value: Any) -> str:
    if not _is_number(value) or not math.isfinite(value):
        return _fixed(value, 1)
    return f"{100 * value:.1f}%"


def _megabytes(value: Any) -> str:
    """Decimal megabytes (10^6 bytes), like file managers and the hub."""
    if not _is_number(value):
        return _MISSING
    return f"{value / 1e6:.1f} MB"


def _count(value: Any) -> str:
    return f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else _MISSING


def _metric(value: Any) -> str:
    """A pass metric of unknown scale: 4 significant digits."""
    if isinstance(value, bool) or not _is_number(value):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.4g}"


def _seconds(value: Any) -> str:
    if not _is_number(value) or not math.isfinite(value):
        return _MISSING
    if value < 60:
        return f"{value:.1f} s"
    minutes, seconds = divmod(round(value), 60)
    return f"{minutes} min {seconds} s"


# --- summary -------------------------------------------------------------------------------------


def _section(result: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = result.get(key)
    return value if isinstance(value, Mapping) else {}


def _list(result: Mapping[str, Any], key: str) -> list[Any]:
    value = result.get(key)
    return list(value) if isinstance(value, list | tuple) else []


def _original_bits(result: Mapping[str, Any]) -> float | None:
    size = _section(result, "size")
    explicit = size.get("original_bits_per_weight")
    if _is_number(explicit):
        return float(explicit)
    parameters = _section(result, "model").get("parameters")
    original_bytes = size.get("original_bytes")
    if _is_number(original_bytes) and _is_number(parameters) and parameters > 0:
        return 8 * original_bytes / parameters
    return None


def summary_rows(result: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """``(metric, before, after)`` rows: the original against the compressed model.

    One definition for the CLI's table and the markdown summary. "Before" of KL and top-1 is the
    original against itself (0 and 100%) so every row reads as before → after.
    """
    rows: list[tuple[str, str, str]] = []
    quality = _section(result, "quality")
    for dataset, raw in quality.items():
        metrics = raw if isinstance(raw, Mapping) else {}
        label = f" ({dataset})" if dataset else ""
        rows.append(
            (
                f"perplexity{label}",
                _ppl(metrics.get("reference_perplexity")),
                _ppl(metrics.get("perplexity")),
            )
        )
        if metrics.get("kl_mean") is not None:
            rows.append(
                (f"KL vs original, nats/token{label}", _kl(0.0), _kl(metrics.get("kl_mean")))
            )
        if metrics.get("top1_agreement") is not None:
            rows.append(
                (f"top-1 agreement{label}", _percent(1.0), _percent(metrics.get("top1_agreement")))
            )

    size = _section(result, "size")
    original_bytes, export_bytes = size.get("original_bytes"), size.get("export_bytes")
    if _is_number(original_bytes) or _is_number(export_bytes):
        after = _megabytes(export_bytes)
        if _is_number(original_bytes) and _is_number(export_bytes) and export_bytes > 0:
            ratio = original_bytes / export_bytes
            if ratio >= 1:
                after += f" ({ratio:.2f}× smaller)"
            elif ratio > 0:
                after += f" ({1 / ratio:.2f}× larger)"
        rows.append(("size on disk", _megabytes(original_bytes), after))
    original_bits = _original_bits(result)
    if "model_bits_per_weight" in size:
        rows.append(
            ("bits/weight, whole model", _bits(original_bits), _bits(size["model_bits_per_weight"]))
        )
    if "quantized_bits_per_weight" in size:
        rows.append(
            (
                "bits/weight, quantized layers",
                _bits(original_bits),
                _bits(size["quantized_bits_per_weight"]),
            )
        )
    if "corrected_bits_per_weight" in size:
        rows.append(
            (
                "bits/weight, quantized layers + adapters",
                _bits(original_bits),
                _bits(size["corrected_bits_per_weight"]),
            )
        )
    quantized, parameters = (
        size.get("quantized_params"),
        _section(result, "model").get("parameters"),
    )
    if isinstance(quantized, int):
        after = _count(quantized)
        if isinstance(parameters, int) and parameters > 0:
            after += f" ({quantized / parameters:.1%} of the model)"
        rows.append(("quantized parameters", "0", after))
    speed = _section(result, "speed")
    if _is_number(speed.get("tokens_per_s")):
        rows.append(
            (
                "decode tokens/s",
                _fixed(speed.get("reference_tokens_per_s"), 1),
                _fixed(speed["tokens_per_s"], 1),
            )
        )
    if _is_number(speed.get("peak_memory_bytes")):
        rows.append(
            (
                "peak memory",
                _megabytes(speed.get("reference_peak_memory_bytes")),
                _megabytes(speed["peak_memory_bytes"]),
            )
        )
    return rows


def top_errors(result: Mapping[str, Any], limit: int = 10) -> list[tuple[str, str, float]]:
    """``(module, pass, relative_error)`` of the ``limit`` worst-quantized layers, worst first."""
    found: list[tuple[str, str, float]] = []
    for entry in _list(result, "passes"):
        if not isinstance(entry, Mapping):
            continue
        per_module = entry.get("per_module")
        if not isinstance(per_module, Mapping):
            continue
        for module, values in per_module.items():
            error = values.get("relative_error") if isinstance(values, Mapping) else None
            if _is_number(error):
                found.append((str(module), str(entry.get("name", "?")), float(error)))
    # nan sorts first: a layer whose error could not be computed is the first to look at
    found.sort(key=lambda item: -math.inf if math.isnan(item[2]) else -item[2])
    return found[:limit]


# --- markdown ------------------------------------------------------------------------------------


def _cell(value: Any) -> str:
    return str(value).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(_cell(h) for h in header) + " |"]
    lines.append("|" + "|".join("---" for _ in header) + "|")
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return lines


def _fenced(text: str, language: str = "text") -> list[str]:
    """A code block whose fence outgrows any backtick run in ``text``: model output is arbitrary."""
    longest = run = 0
    for char in text:
        run = run + 1 if char == "`" else 0
        longest = max(longest, run)
    fence = "`" * max(3, longest + 1)
    return [f"{fence}{language}", text, fence]


def _title(result: Mapping[str, Any]) -> list[str]:
    model = _section(result, "model")
    source = model.get("source")
    lines = [f"# compress report: {source}" if source else "# compress report", ""]
    facts = []
    if _is_number(model.get("parameters")):
        facts.append(f"{_count(model['parameters'])} parameters")
    names = [str(p.get("name", "?")) for p in _list(result, "passes") if isinstance(p, Mapping)]
    if names:
        facts.append("passes: " + " → ".join(names))
    export = _section(result, "recipe").get("export")
    if isinstance(export, Mapping) and export.get("dir"):
        facts.append(f"export: `{export['dir']}`")
    if facts:
        lines += ["; ".join(facts), ""]
    return lines


def _summary(result: Mapping[str, Any]) -> list[str]:
    rows = summary_rows(result)
    if not rows:
        return []
    lines = ["## Summary", "", *_table(["metric", "original", "compressed"], rows), ""]
    for dataset, metrics in _section(result, "quality").items():
        if isinstance(metrics, Mapping) and "tokens" in metrics:
            lines.append(
                f"- {dataset}: {_count(metrics.get('tokens'))} predicted tokens in "
                f"{_count(metrics.get('windows'))} windows of {_count(metrics.get('seq_len'))}"
            )
    note = _section(result, "size").get("note")
    if isinstance(note, str) and note:
        lines.append(f"- size: {note}")
    speed = _section(result, "speed")
    if _is_number(speed.get("tokens_per_s")):
        lines.append(
            f"- speed: greedy decode at batch 1 on {_count(speed.get('threads'))} CPU threads, "
            "median of 3 runs; peak memory is that process's peak resident set (Python, torch, "
            "the model): each model measured in a process of its own"
        )
    elif isinstance(speed.get("note"), str):
        lines.append(f"- speed: {speed['note']}")
    if lines[-1] != "":
        lines.append("")
    return lines


def _passes(result: Mapping[str, Any]) -> list[str]:
    entries = [p for p in _list(result, "passes") if isinstance(p, Mapping)]
    if not entries:
        return []
    rows = []
    for entry in entries:
        metrics = entry.get("metrics")
        shown = (
            ", ".join(f"{k} {_metric(v)}" for k, v in metrics.items())
            if isinstance(metrics, Mapping)
            else ""
        )
        rows.append(
            (
                entry.get("name", "?"),
                len(entry.get("touched") or ()),
                len(entry.get("skipped") or {}),
                shown or _MISSING,
            )
        )
    lines = ["## Passes", "", *_table(["pass", "touched", "skipped", "metrics"], rows), ""]
    for entry in entries:
        notes = entry.get("notes")
        if isinstance(notes, list) and notes:  # e.g. allocate_bits' widths, distill's ending
            lines.append(f"Notes of {entry.get('name', '?')}:")
            lines += [f"- {note}" for note in notes]
            lines.append("")
        skipped = entry.get("skipped")
        if isinstance(skipped, Mapping) and skipped:
            lines.append(f"Skipped by {entry.get('name', '?')}:")
            lines += [f"- `{module}`: {reason}" for module, reason in skipped.items()]
            lines.append("")
    return lines


def _errors(result: Mapping[str, Any]) -> list[str]:
    worst = top_errors(result)
    if not worst:
        return []
    rows = [(f"`{module}`", name, _fixed(error, 4)) for module, name, error in worst]
    return [
        f"## Largest quantization error ({len(worst)} layers)",
        "",
        "Relative weight error ‖W − Q(W)‖ / ‖W‖.",
        "",
        *_table(["module", "pass", "relative error"], rows),
        "",
    ]


def _formats(result: Mapping[str, Any]) -> list[str]:
    per_format = _section(result, "size").get("per_format")
    if not isinstance(per_format, Mapping) or not per_format:
        return []
    rows = [
        (
            name,
            _count(info.get("modules")),
            _count(info.get("params")),
            _bits(info.get("bits_per_weight")),
        )
        for name, info in per_format.items()
        if isinstance(info, Mapping)
    ]
    return ["## Formats", "", *_table(["format", "modules", "params", "bits/weight"], rows), ""]


def _samples(result: Mapping[str, Any]) -> list[str]:
    samples = [s for s in _list(result, "samples") if isinstance(s, Mapping)]
    if not samples:
        return []
    lines = ["## Samples", "", "Greedy continuations of the same prompt.", ""]
    for number, sample in enumerate(samples, start=1):
        lines += [f"### Sample {number}", "", "Prompt:", ""]
        lines += _fenced(str(sample.get("prompt", "")))
        for key in ("original", "compressed"):
            if key in sample:
                lines += ["", f"{key.capitalize()}:", "", *_fenced(str(sample[key]))]
        lines.append("")
    return lines


def _timings(result: Mapping[str, Any]) -> list[str]:
    timings = _section(result, "timings")
    if not timings:
        return []
    rows = [(key.removesuffix("_s"), _seconds(value)) for key, value in timings.items()]
    total = sum(v for v in timings.values() if _is_number(v) and math.isfinite(v))
    rows.append(("total", _seconds(total)))
    return ["## Timings", "", *_table(["stage", "time"], rows), ""]


def _caveats(result: Mapping[str, Any]) -> list[str]:
    caveats = _list(result, "caveats")
    if not caveats:
        return []
    return ["## Caveats", "", *[f"- {caveat}" for caveat in caveats], ""]


def _environment(result: Mapping[str, Any]) -> list[str]:
    environment = _section(result, "environment")
    if not environment:
        return []
    rows = list(environment.items())
    return ["## Environment", "", *_table(["", "value"], rows), ""]


def _recipe(result: Mapping[str, Any]) -> list[str]:
    recipe = result.get("recipe")
    if not recipe:
        return []
    text = json.dumps(recipe, indent=2, ensure_ascii=False, default=_json_default)
    return ["## Recipe", "", *_fenced(text, "json"), ""]


def render_markdown(result: Mapping[str, Any]) -> str:
    """``report.md``: what a reader wants first (quality and size) first; missing parts omitted."""
    lines: list[str] = []
    for section in (
        _title,
        _summary,
        _lm_eval,
        _passes,
        _errors,
        _formats,
        _samples,
        _caveats,
        _timings,
        _environment,
        _recipe,
    ):
        lines += section(result)
    return "\n".join(lines).rstrip("\n") + "\n"


# --- lm-eval and comparisons ---------------------------------------------------------------------


def _score(value: Any, metric: str) -> str:
    if metric in ("acc", "acc_norm", "exact_match"):
        return _percent(value)
    return _fixed(value, 3)


def _pm(value: Any, stderr: Any, metric: str) -> str:
    shown = _score(value, metric)
    if _is_number(stderr) and shown != _MISSING:
        shown += f" ± {_score(stderr, metric)}"
    return shown


def lm_eval_rows(result: Mapping[str, Any]) -> list[tuple[str, str, str, str, str, str]]:
    """``(task, metric, items, original, compressed, difference [95% CI])`` per lm-eval score."""
    rows = []
    for raw in _list(_section(result, "lm_eval"), "scores"):
        if not isinstance(raw, Mapping):
            continue
        metric = str(raw.get("metric", "?"))
        difference = _MISSING
        if _is_number(raw.get("difference")):
            sign = "+" if raw["difference"] >= 0 else ""
            difference = f"{sign}{_score(raw['difference'], metric)}"
            if _is_number(raw.get("ci_low")) and _is_number(raw.get("ci_high")):
                difference += (
                    f" [{_score(raw['ci_low'], metric)}, {_score(raw['ci_high'], metric)}]"
                )
            if raw.get("significant"):
                difference += " *"
        rows.append(
            (
                str(raw.get("task", "?")),
                metric,
                _count(raw.get("items")),
                _pm(raw.get("original"), raw.get("original_stderr"), metric),
                _pm(raw.get("compressed"), raw.get("compressed_stderr"), metric),
                difference,
            )
        )
    return rows


def _lm_eval(result: Mapping[str, Any]) -> list[str]:
    rows = lm_eval_rows(result)
    if not rows:
        return []
    header = ["task", "metric", "items", "original", "compressed", "difference [95% CI]"]
    return [
        "## lm-eval tasks",
        "",
        "Both models on the same items; ± is lm-eval's stderr, the interval a paired bootstrap "
        "over items; * marks a difference whose interval excludes 0.",
        "",
        *_table(header, rows),
        "",
    ]


# --- files ---------------------------------------------------------------------------------------


def _json_default(value: Any) -> Any:
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"report value of type {type(value).__name__} is not JSON-serialisable")


def _write_atomic(path: Path, text: str) -> None:
    """Readers never see a half-written file: write a temp file beside it, then rename."""
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(temporary, 0o666 & ~umask)  # mkstemp's file is private; a report is not
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            stream.write(text)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def write_report(result: Mapping[str, Any], directory: Path) -> tuple[Path, Path]:
    """Write ``report.json`` and ``report.md`` into ``directory``; returns both paths.

    Both texts are produced before either file is touched, so a result that cannot be
    serialised leaves an earlier report intact.
    """
    directory = Path(directory)
    json_text = json.dumps(result, indent=2, ensure_ascii=False, default=_json_default) + "\n"
    markdown = render_markdown(result)
    directory.mkdir(parents=True, exist_ok=True)
    json_path, markdown_path = directory / JSON_NAME, directory / MARKDOWN_NAME
    _write_atomic(json_path, json_text)
    _write_atomic(markdown_path, markdown)
    return json_path, markdown_path


def read_report(directory: Path) -> dict[str, Any]:
    """The run result stored in ``directory`` (or a ``report.json`` path given directly)."""
    directory = Path(directory)
    path = (
        directory if directory.suffix == ".json" and directory.is_file() else directory / JSON_NAME
    )
    hint = "pass the folder a `compress apply` run exported to (it holds report.json)"
    if not directory.exists():
        raise ExportError(f"no such report folder: {directory}", hint=hint)
    if directory.is_file() and path != directory:
        inside = (directory.parent / JSON_NAME).is_file()
        raise ExportError(
            f"{directory}: is a file, not a run folder",
            hint=f"pass its folder: {directory.parent}" if inside else hint,
        )
    if not path.is_file():
        raise ExportError(f"no report in {directory}: {path} is missing", hint=hint)
    try:
        text = path.read_text(encoding="utf-8")
        data = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ExportError(
            f"report {path} is not valid JSON: {error}",
            hint="the file is damaged; re-run `compress apply` (or restore the file) to rewrite it",
        ) from None
    except OSError as error:
        raise ExportError(f"cannot read report {path}: {error.strerror or error}") from None
    if not isinstance(data, dict):
        raise ExportError(
            f"report {path} holds a JSON {type(data).__name__}, not an object",
            hint="the file is not a compress report; re-run `compress apply` to rewrite it",
        )
    return data
