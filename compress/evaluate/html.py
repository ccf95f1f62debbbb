"""Compare runs in one self-contained HTML page (plus markdown and JSON): a table and plots.

``compress report RUN [RUN ...] -o DIR`` writes ``DIR/report.html`` (the table and every plot
inline: PNGs as base64 ``data:`` URIs, CSS in a ``<style>`` block, no script, no network),
``DIR/comparison.md`` (the same table, plots as PNG files beside it) and ``DIR/comparison.json``
(every number the page shows, from :func:`compress.evaluate.comparison.compare_runs`). The names
differ from a run's own ``report.md``/``report.json``, so writing into a run folder overwrites
nothing of it.

Plots, drawn with matplotlib's Agg backend (no display needed):

- quality vs size: perplexity (and each task's score) against size on disk, the original model
  included, with the Pareto front (runs no other run beats on both size and quality);
- per-layer error: the relative weight error of every quantized layer, per run, in model order,
  so the layers that lost most stand out;
- speed: tokens/s and peak memory where the runs measured them, and compression time per stage;
- training: the loss and the held-out KL against steps of runs with a ``distill`` pass.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from compress.evaluate.comparison import compare_runs, comparison_table, render_comparison_markdown
from compress.evaluate.report import read_report

__all__ = [
    "HTML_NAME",
    "pareto_front",
    "render_html",
    "render_plots",
    "write_comparison",
]

HTML_NAME = "report.html"
_PLOT_DIR = "report_plots"

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 72rem; color: #222; }
table { border-collapse: collapse; margin: 1rem 0; font-size: 0.9rem; }
th, td { border: 1px solid #ccc; padding: 0.3rem 0.6rem; text-align: right; }
th { background: #f3f3f3; } td:first-child, th:first-child { text-align: left; }
tr.original td { font-style: italic; background: #fafafa; }
figure { margin: 1.5rem 0; } figcaption { color: #555; font-size: 0.9rem; }
img { max-width: 100%; height: auto; border: 1px solid #eee; }
"""


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats: smaller x and smaller-or-equal y, or equal x
    and smaller y. Sorted by x. (x = size, y = a loss such as perplexity.)"""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1]))
    front: list[int] = []
    best = math.inf
    for index in order:
        if points[index][1] < best:
            front.append(index)
            best = points[index][1]
    return front


def _png(figure: Any) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return buffer.getvalue()


def _quality_plot(comparison: Mapping[str, Any]) -> bytes | None:
    import matplotlib.pyplot as plt

    runs = [r for r in comparison["runs"] if _number(r.get("size_bytes"))]
    panels: list[tuple[str, str, bool]] = []  # (key, axis label, lower is better)
    if sum(_number(r.get("perplexity")) for r in runs) >= 1:
        label = f"perplexity ({comparison.get('perplexity_dataset') or '?'})"
        panels.append(("perplexity", label, True))
    for task in comparison.get("tasks") or []:
        values = [r["tasks"].get(task) for r in runs]
        if any(_number(v) for v in values):
            lower = not all(v is None or v <= 1 for v in values)  # accuracies are <= 1
            panels.append((f"task:{task}", task, lower))
    if not panels:
        return None
    figure, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4), squeeze=False)
    for axis, (key, label, lower) in zip(axes[0], panels, strict=True):
        points, names, originals = [], [], []
        for run in runs:
            value = run["tasks"].get(key[5:]) if key.startswith("task:") else run.get(key)
            if _number(value):
                points.append((run["size_bytes"] / 1e6, float(value)))
                names.append(str(run["name"]))
                originals.append(bool(run.get("original")))
        loss = [(x, y if lower else -y) for x, y in points]
        front = pareto_front(loss)
        for (x, y), name, original in zip(points, names, originals, strict=True):
            axis.scatter(x, y, s=60, marker="s" if original else "o", zorder=3)
            axis.annotate(name, (x, y), textcoords="offset points", xytext=(6, 4), fontsize=8)
        if len(front) > 1:
            axis.plot(
                [points[i][0] for i in front],
                [points[i][1] for i in front],
                "--",
                color="gray",
                label="Pareto front",
                zorder=2,
            )
            axis.legend(fontsize=8)
        axis.set_xlabel("size on disk (MB)")
        axis.set_ylabel(label + (" ↓" if lower else " ↑"))
        axis.grid(alpha=0.3)
    figure.suptitle("quality vs size")
    data = _png(figure)
    plt.close(figure)
    return data


def _layer_plot(comparison: Mapping[str, Any]) -> bytes | None:
    import matplotlib.pyplot as plt

    runs = [r for r in comparison["runs"] if r.get("per_layer_error")]
    if not runs:
        return None
    modules: list[str] = []
    for run in runs:
        modules += [m for m in run["per_layer_error"] if m not in modules]
    figure, axis = plt.subplots(figsize=(11, 4))
    for run in runs:
        errors = [run["per_layer_error"].get(m, math.nan) for m in modules]
        axis.plot(range(len(modules)), errors, marker=".", linewidth=0.8, label=str(run["name"]))
    worst = max(runs[-1]["per_layer_error"], key=lambda m: runs[-1]["per_layer_error"][m])
    index = modules.index(worst)
    axis.annotate(
        worst,
        (index, runs[-1]["per_layer_error"][worst]),
        textcoords="offset points",
        xytext=(8, -4),
        fontsize=8,
    )
    axis.set_yscale("log")
    axis.set_xlabel(f"quantized layer, in model order ({len(modules)} layers)")
    axis.set_ylabel("relative weight error ‖W − Q(W)‖ / ‖W‖")
    axis.set_title("per-layer error")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    data = _png(figure)
    plt.close(figure)
    return data


def _speed_plot(comparison: Mapping[str, Any]) -> bytes | None:
    import matplotlib.pyplot as plt

    runs = list(comparison["runs"])
    panels = [
        (key, label, scale)
        for key, label, scale in (
            ("tokens_per_s", "tokens/s (higher is better)", 1.0),
            ("peak_memory_bytes", "peak memory (MB)", 1e-6),
            ("compression_s", "compression time (s)", 1.0),
        )
        if any(_number(r.get(key)) for r in runs)
    ]
    if not panels:
        return None
    figure, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.6), squeeze=False)
    for axis, (key, label, scale) in zip(axes[0], panels, strict=True):
        shown = [r for r in runs if _number(r.get(key))]
        axis.bar(
            [str(r["name"]) for r in shown],
            [r[key] * scale for r in shown],
            color=["#999" if r.get("original") else "#4477aa" for r in shown],
        )
        axis.set_ylabel(label)
        axis.tick_params(axis="x", labelrotation=30)
        axis.grid(axis="y", alpha=0.3)
    figure.suptitle("speed and cost")
    data = _png(figure)
    plt.close(figure)
    return data


def _training_plot(comparison: Mapping[str, Any]) -> bytes | None:
    import matplotlib.pyplot as plt

    runs = [r for r in comparison["runs"] if r.get("training")]
    if not runs:
        return None
    figure, (loss_axis, kl_axis) = plt.subplots(1, 2, figsize=(11, 3.8))
    for run in runs:
        curve = run["training"]
        loss_axis.plot(curve["step"], curve["loss"], linewidth=0.9, label=str(run["name"]))
        if curve["eval_kl"]:
            kl_axis.plot(curve["eval_step"], curve["eval_kl"], marker="o", label=str(run["name"]))
    loss_axis.set_xlabel("optimizer step")
    loss_axis.set_ylabel("training loss")
    kl_axis.set_xlabel("optimizer step")
    kl_axis.set_ylabel("held-out KL (nats per token)")
    for axis in (loss_axis, kl_axis):
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.suptitle("distillation")
    data = _png(figure)
    plt.close(figure)
    return data


def render_plots(comparison: Mapping[str, Any]) -> dict[str, bytes]:
    """Title → PNG bytes of every plot the runs have data for."""
    import matplotlib

    matplotlib.use("Agg")
    plots: dict[str, bytes] = {}
    for title, draw in (
        ("Quality vs size", _quality_plot),
        ("Per-layer error", _layer_plot),
        ("Speed", _speed_plot),
        ("Training", _training_plot),
    ):
        png = draw(comparison)
        if png is not None:
            plots[title] = png
    return plots


def render_html(comparison: Mapping[str, Any], plots: Mapping[str, bytes]) -> str:
    """The page: title, runs table, then each plot as an inline PNG."""
    header, rows = comparison_table(comparison)
    esc = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        "<title>compress report</title>",
        f"<style>{_STYLE}</style></head><body>",
        "<h1>compress report: comparison of runs</h1>",
    ]
    dataset = comparison.get("perplexity_dataset")
    if dataset:
        parts.append(
            f"<p>Perplexity, KL and top-1 on {esc(str(dataset))}; the original row is the model "
            "the first run compressed.</p>"
        )
    parts.append('<table id="runs"><thead><tr>')
    parts += [f"<th>{esc(h)}</th>" for h in header]
    parts.append("</tr></thead><tbody>")
    for run, row in zip(comparison["runs"], rows, strict=True):
        css = ' class="original"' if run.get("original") else ""
        parts.append(f"<tr{css}>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>")
    parts.append("</tbody></table>")
    for title, png in plots.items():
        encoded = base64.b64encode(png).decode("ascii")
        parts.append(
            f'<figure><img alt="{esc(title)}" src="data:image/png;base64,{encoded}">'
            f"<figcaption>{esc(title)}</figcaption></figure>"
        )
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def write_comparison(run_dirs: Sequence[Path], output: Path) -> dict[str, Path]:
    """Read each run's ``report.json`` and write the HTML, markdown, JSON and PNGs to ``output``.

    Runs are named by their folder; two runs in folders of the same name get a number.
    """
    runs: list[tuple[str, Mapping[str, Any]]] = []
    for directory in run_dirs:
        name = Path(directory).resolve().name or str(directory)
        taken = {n for n, _ in runs}
        unique, number = name, 2
        while unique in taken:
            unique, number = f"{name}-{number}", number + 1
        runs.append((unique, read_report(Path(directory))))
    comparison = compare_runs(runs)
    plots = render_plots(comparison)
    output = Path(output)
    (output / _PLOT_DIR).mkdir(parents=True, exist_ok=True)
    images = {}
    for title, png in plots.items():
        path = Path(_PLOT_DIR) / (title.lower().replace(" ", "_") + ".png")
        (output / path).write_bytes(png)
        images[title] = path.as_posix()
    paths = {
        "html": output / HTML_NAME,
        "markdown": output / "comparison.md",
        "json": output / "comparison.json",
    }
    paths["html"].write_text(render_html(comparison, plots), encoding="utf-8")
    paths["markdown"].write_text(render_comparison_markdown(comparison, images), encoding="utf-8")
    paths["json"].write_text(json.dumps(comparison, indent=2) + "\n", encoding="utf-8")
    return paths
