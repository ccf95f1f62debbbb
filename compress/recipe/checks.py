"""Checks across recipe sections: what would otherwise fail only after the passes ran."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from compress.data import dataset_problem
from compress.export import compressed_tensors as ct
from compress.recipe.messages import LineMap, _line, _Problem, _raise
from compress.recipe.schema import CalibrationSpec, EvaluateSpec, ExportSpec
from compress.registry import PassConfig, config_for, get_pass

__all__ = ["check_plan"]

# Pass order: these rescale weights for the quantizers that follow them and must come first.
_QUANTIZERS = ("rtn", "gptq")
_BEFORE_QUANTIZERS = ("awq", "rotate", "prune")


def check_plan(
    passes: Sequence[PassConfig],
    *,
    calibration: CalibrationSpec | None = None,
    export: ExportSpec | None = None,
    evaluate: EvaluateSpec | None = None,
    source: str = "<recipe>",
    lines: LineMap | None = None,
) -> None:
    """Refuse a pass order that cannot work, a format the export cannot hold and datasets that
    do not exist; :class:`RecipeError` naming the key, as for schema errors."""
    lines = lines or {}
    names = [config_for(config).name for config in passes]
    problems = _order_problems(names, lines)
    if export is not None:
        problems += _export_problems(passes, names, export, lines)
    datasets: list[tuple[tuple[Any, ...], str]] = []
    if calibration is not None and any(get_pass(name).calibrated for name in names):
        datasets.append((("calibration", "dataset"), calibration.dataset))
    if evaluate is not None:
        datasets += [
            (("evaluate", "perplexity", index), spec)
            for index, spec in enumerate(evaluate.perplexity)
        ]
    for path, spec in datasets:
        found = dataset_problem(spec)
        if found is not None:
            detail, hint = found
            problems.append(_Problem(path, detail, hint, _line(lines, path)))
    if problems:
        _raise(problems, source)


def _order_problems(names: list[str], lines: LineMap) -> list[_Problem]:
    problems = []
    for index, name in enumerate(names):
        if name not in _BEFORE_QUANTIZERS:
            continue
        earlier = [(i, n) for i, n in enumerate(names[:index]) if n in _QUANTIZERS]
        if earlier:
            first, quantizer = earlier[0]
            path = ("passes", index, "pass")
            problems.append(
                _Problem(
                    path,
                    f"{name} comes after {quantizer} (passes[{first}]): {name} changes weights "
                    f"before they are quantized, and after {quantizer} it would break their codes",
                    f"move {name} before {quantizer}"
                    + (", with the same bits and group_size" if name == "awq" else ""),
                    _line(lines, path),
                )
            )
    return problems


def _export_problems(
    passes: Sequence[PassConfig], names: list[str], export: ExportSpec, lines: LineMap
) -> list[_Problem]:
    """Formats the chosen export format cannot store (compressed-tensors: what vLLM serves)."""
    if export.format != ct.FORMAT_NAME:
        return []
    problems = []
    for index, (name, config) in enumerate(zip(names, passes, strict=True)):
        path: tuple[Any, ...] = ("passes", index)
        if name == "entropy_code":
            problems.append(
                _Problem(
                    (*path, "pass"),
                    f"entropy_code cannot be exported as {ct.FORMAT_NAME} (export.format)",
                    "use export.format: compress, or drop the entropy_code pass",
                    _line(lines, (*path, "pass")),
                )
            )
        if name not in _QUANTIZERS:
            continue
        bits, group = getattr(config, "bits", None), getattr(config, "group_size", None)
        if bits not in ct.SUPPORTED_BITS:
            held = " or ".join(map(str, ct.SUPPORTED_BITS))
            key, reason = "bits", f"{bits}-bit codes (it holds {held})"
        elif group not in ct.SUPPORTED_GROUPS:
            key, reason = "group_size", f"group_size {group} (it holds 32, 64, 128 or null)"
        elif not getattr(config, "symmetric", True):
            key, reason = "symmetric", "asymmetric codes (its loaders cannot read zero points)"
        else:
            continue
        where = (*path, key)
        problems.append(
            _Problem(
                where,
                f"export.format {ct.FORMAT_NAME} cannot hold {name}'s {reason}",
                "quantize to symmetric int4 or int8 with group_size 32, 64, 128 or null, or "
                "export with format: compress",
                _line(lines, where),
            )
        )
    return problems
