"""The recipe: one YAML file (or dict) saying what to compress, how, where to, and how to judge it.

A recipe is validated in full before any model is loaded, so a typo costs a second, not a
download. Every error names the file, the line, the key path (``passes[0].group_size``), the bad
value, and a hint with the nearest valid key, pass name or allowed values. Beyond the schema,
:func:`check_plan` refuses what would only fail after the passes ran: a pass order that cannot
work (``awq`` after ``rtn``), a format the chosen export cannot hold (``compressed-tensors`` with
int3), a dataset that does not exist; a recipe file must also name at least one pass. Checks
that need the model (e.g. group size against each layer's input dimension) belong to the passes.

Modules: :mod:`.schema` (the sections), :mod:`.yamltext` (YAML with lines), :mod:`.messages`
(located errors), :mod:`.checks` (cross-section checks).

Example::

    model: smollm2-135m
    calibration: {dataset: builtin:wiki, samples: 128, seq_len: 512, seed: 0}
    passes:
      - {pass: rtn, bits: 4, group_size: 64, symmetric: true}
    export: {dir: out/smollm2-w4g64, format: compress}
    evaluate: {perplexity: [builtin:wiki], max_windows: 32, kl: true}
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from compress.errors import RecipeError
from compress.recipe.checks import check_plan
from compress.recipe.messages import (
    LineMap,
    _boolean_problems,
    _build_passes,
    _described,
    _from_validation,
    _line,
    _merged,
    _Problem,
    _raise,
    _where,
)
from compress.recipe.schema import (
    CalibrationSpec,
    EvaluateSpec,
    ExportSpec,
    LmEvalTasksSpec,
    ModelSpec,
    Recipe,
)
from compress.recipe.yamltext import (
    MAX_YAML_VALUES,
    _folder_hint,
    _missing_file_hint,
    yaml_with_lines,
)

__all__ = [
    "MAX_YAML_VALUES",
    "CalibrationSpec",
    "EvaluateSpec",
    "ExportSpec",
    "LineMap",
    "LmEvalTasksSpec",
    "ModelSpec",
    "Recipe",
    "check_plan",
    "load_recipe",
    "parse_recipe",
    "recipe_to_yaml",
    "yaml_with_lines",
]


def load_recipe(path: str | Path) -> Recipe:
    """Read, parse and validate a recipe file; any problem raises :class:`RecipeError`."""
    source = str(path)
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError(f"{source}: file not found", hint=_missing_file_hint(file)) from None
    except IsADirectoryError:
        raise RecipeError(
            f"{source}: is a folder, not a recipe file", hint=_folder_hint(file)
        ) from None
    except UnicodeDecodeError as error:
        raise RecipeError(
            f"{source}: not UTF-8 text ({error.reason} at byte {error.start})",
            hint="a recipe is a YAML text file; save it as UTF-8",
        ) from None
    except OSError as error:
        raise RecipeError(f"{source}: cannot read: {error.strerror or error}") from None
    data, lines = yaml_with_lines(text, source)
    recipe = parse_recipe(data, source, lines)
    if not recipe.passes:
        raise RecipeError(
            f"{_where(source, _line(lines, ('passes',)))}: passes: empty list: nothing to "
            "compress (the export would be an uncompressed copy of the model)",
            hint="add a pass, e.g. - {pass: rtn, bits: 4, group_size: 64}; "
            "`compress recipes list` shows them all",
        )
    check_plan(
        recipe.passes,
        calibration=recipe.calibration,
        export=recipe.export,
        evaluate=recipe.evaluate,
        source=source,
        lines=lines,
    )
    return recipe


def parse_recipe(data: Any, source: str = "<recipe>", lines: LineMap | None = None) -> Recipe:
    """Validate already-parsed recipe data (a dict from Python, or YAML with its line map)."""
    lines = lines if lines is not None else {}
    if data is None:
        raise RecipeError(
            f"{_where(source, 1 if lines else None)}: recipe is empty",
            hint="a recipe needs at least 'model:' and 'passes:'; see recipes/quickstart.yaml",
        )
    if not isinstance(data, Mapping):
        raise RecipeError(
            f"{_where(source, lines.get(()))}: top level: expected a mapping of recipe keys, "
            f"got {_described(data)}",
            hint=f"valid top-level keys: {', '.join(Recipe.model_fields)}",
        )
    data = dict(data)
    problems: list[_Problem] = []
    raw_passes = data.get("passes")
    if isinstance(raw_passes, (list, tuple)):
        data["passes"], problems = _build_passes(list(raw_passes), lines)
    problems += _boolean_problems(
        {k: v for k, v in data.items() if k != "passes"}, Recipe, (), lines
    )
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as error:
        _raise(_merged(problems, _from_validation(error, data, (), Recipe, lines)), source)
    if problems:
        _raise(problems, source)
    return recipe


def recipe_to_yaml(recipe: Recipe) -> str:
    """The resolved recipe as YAML; ``load_recipe`` reads it back to an equal Recipe."""
    return yaml.safe_dump(recipe.resolved(), sort_keys=False, allow_unicode=True)
