"""The recipe: one YAML file (or dict) saying what to compress, how, where to, and how to judge it.

A recipe is validated in full before any model is loaded, so a typo costs a second, not a
download. Every error names the file, the line, the key path (``passes[0].group_size``), the bad
value, and a hint with the nearest valid key, pass name or allowed values. Beyond the schema,
:func:`check_plan` refuses what would only fail after the passes ran: a pass order that cannot
work (``awq`` after ``rtn``), a format the chosen export cannot hold (``compressed-tensors`` with
int3), a dataset that does not exist; a recipe file must also name at least one pass. Checks
that need the model (e.g. group size against each layer's input dimension) belong to the passes.

Example::

    model: smollm2-135m
    calibration: {dataset: builtin:wiki, samples: 128, seq_len: 512, seed: 0}
    passes:
      - {pass: rtn, bits: 4, group_size: 64, symmetric: true}
    export: {dir: out/smollm2-w4g64, format: compress}
    evaluate: {perplexity: [builtin:wiki], max_windows: 32, kl: true}
"""

from __future__ import annotations

import json
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializeAsAny,
    ValidationError,
    field_validator,
)

from compress.errors import PassError, RecipeError, nearest
from compress.registry import PassConfig, available_passes, config_for, get_pass

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

LineMap = dict[tuple[Any, ...], int]
"""Key path (``("passes", 0, "bits")``) → 1-based line where that key or item starts."""

_MERGE_TAG = "tag:yaml.org,2002:merge"
_MAX_LISTED = 5  # further errors named after the first one
MAX_YAML_VALUES = 100_000
"""Most values a recipe may expand to (aliases counted at each use); a real one has dozens."""
# Pass order: these rescale weights for the quantizers that follow them and must come first.
_QUANTIZERS = ("rtn", "gptq")
_BEFORE_QUANTIZERS = ("awq",)


class _Spec(BaseModel):
    """Recipe sections: frozen, unknown keys rejected."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class ModelSpec(_Spec):
    """Which model to compress; ``model: NAME`` is shorthand for ``model: {name: NAME}``."""

    name: str = Field(
        min_length=1, description="builtin alias, hub id, local HF folder or .gguf file"
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto", description="dtype to load the weights in; auto keeps the checkpoint's"
    )
    trust_remote_code: bool = Field(
        default=False, description="allow the checkpoint's own modelling code (runs its Python)"
    )
    offload: bool = Field(
        default=False,
        description="keep the weights on disk and load one decoder layer at a time (models "
        "larger than memory); export is then written shard by shard",
    )


class CalibrationSpec(_Spec):
    """Text the calibrated passes see; fixed seed so a rerun gives the same model."""

    dataset: str = Field(
        default="builtin:wiki", description="builtin:NAME, a hub dataset or a file"
    )
    samples: int = Field(default=128, gt=0, description="number of calibration sequences")
    seq_len: int = Field(default=512, gt=0, description="tokens per calibration sequence")
    seed: int = Field(default=0, description="seed for picking the calibration windows")


class ExportSpec(_Spec):
    """Where the compressed model is written; the folder appears whole or not at all."""

    dir: Path = Field(description="folder to create (relative to the working directory)")
    format: Literal["compress", "compressed-tensors"] = Field(
        default="compress",
        description="on-disk format of the export: compress (every format, our loader) or "
        "compressed-tensors (int4/int8 pack-quantized, loadable by vLLM and transformers)",
    )
    overwrite: bool = Field(default=False, description="replace an existing folder at dir")

    @field_validator("dir")
    @classmethod
    def _names_a_folder(cls, value: Path) -> Path:
        # Path("") is "."; exporting over the working directory would replace it.
        if str(value) in ("", "."):
            raise ValueError("must name a folder to create, not the working directory")
        return value


class LmEvalTasksSpec(_Spec):
    """lm-eval tasks scored on the export and on the original, on the same items."""

    tasks: list[str] = Field(
        min_length=1,
        description="lm-eval task names (offline = the default offline set; "
        "offline_all, offline_<name>, or any task lm-eval's registry knows)",
    )
    limit: int | None = Field(default=None, gt=0, description="items per task; null = all")
    num_fewshot: int | None = Field(
        default=None, ge=0, description="few-shot examples; null = each task's own default"
    )
    batch_size: int = Field(default=8, gt=0, description="requests per forward pass")
    include_path: list[str] = Field(
        default_factory=list, description="folders of local lm-eval task YAML files"
    )
    max_length: int | None = Field(
        default=None, gt=0, description="tokens per window; null = the model's context"
    )

    @field_validator("tasks", mode="before")
    @classmethod
    def _comma_separated(cls, value: Any) -> Any:
        # `tasks: offline` and `tasks: a,b` read as the CLI's --tasks does
        if isinstance(value, str):
            return [name.strip() for name in value.split(",") if name.strip()]
        return value


class EvaluateSpec(_Spec):
    """How the compressed model is judged against the original."""

    perplexity: list[str] = Field(
        default_factory=lambda: ["builtin:wiki"], description="corpora to measure perplexity on"
    )
    seq_len: int = Field(default=512, gt=0, description="tokens per evaluation window")
    max_windows: int | None = Field(
        default=32, gt=0, description="windows per corpus; null = the whole corpus"
    )
    kl: bool = Field(
        default=True, description="KL divergence and top-1 agreement against the original"
    )
    batch_size: int = Field(default=4, gt=0, description="windows per forward pass")
    speed: bool = Field(
        default=True,
        description="decode tokens/s and peak memory of the export and of the original, each "
        "loaded in a process of its own (about 10 s for a small model)",
    )
    lm_eval: LmEvalTasksSpec | None = Field(
        default=None,
        description="lm-eval tasks, e.g. {tasks: [offline], limit: 200}; null = none",
    )


class Recipe(_Spec):
    """A whole recipe. ``passes`` holds the registered passes' config objects, in order."""

    model: ModelSpec = Field(description="the model to compress")
    calibration: CalibrationSpec = Field(
        default_factory=CalibrationSpec, description="calibration text for calibrated passes"
    )
    passes: list[SerializeAsAny[PassConfig]] = Field(
        description="the passes to run, in order; each is {pass: NAME, ...settings}"
    )
    export: ExportSpec | None = Field(
        default=None, description="where to write the result; null = no export"
    )
    evaluate: EvaluateSpec | None = Field(default=None, description="evaluation; null = skip")

    @field_validator("model", mode="before")
    @classmethod
    def _model_shorthand(cls, value: Any) -> Any:
        return {"name": value} if isinstance(value, str) else value

    @field_validator("passes", mode="before")
    @classmethod
    def _passes_from_mappings(cls, value: Any) -> Any:
        # The Python-API entry: Recipe(passes=[{"pass": "rtn"}, RTNConfig()]). parse_recipe has
        # already turned every mapping into a config, so for it this only re-checks them.
        if not isinstance(value, (list, tuple)):
            # pydantic would take a set or a mapping's keys as a list; order matters here.
            raise ValueError("expected a list of passes, e.g. [{pass: rtn, bits: 4}]")
        configs, problems = _build_passes(list(value), {})
        if problems:
            _raise(problems, "<recipe>")
        return configs

    def pass_names(self) -> list[str]:
        """Registered names of the passes, in order."""
        return [config_for(config).name for config in self.passes]

    def resolved(self) -> dict[str, Any]:
        """Every default filled in, JSON-serialisable: what a run records next to its results."""
        return {
            "model": self.model.model_dump(mode="json"),
            "calibration": self.calibration.model_dump(mode="json"),
            "passes": [
                {"pass": config_for(config).name, **config.model_dump(mode="json")}
                for config in self.passes
            ],
            "export": self.export.model_dump(mode="json") if self.export else None,
            "evaluate": self.evaluate.model_dump(mode="json") if self.evaluate else None,
        }


# --------------------------------------------------------------------------------------------
# Loading


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


def yaml_with_lines(text: str, source: str = "<recipe>") -> tuple[Any, LineMap]:
    """``yaml.safe_load(text)`` plus the line of every key, refusing duplicate keys.

    safe_load keeps the last of two equal keys without a word; in a recipe that hides edits, so
    here it is an error naming both lines.
    """
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        if node is None:
            return None, {(): 1}
        if _expanded_size(node, {}, set()) > MAX_YAML_VALUES:
            raise RecipeError(
                f"{source}: the document expands to more than {MAX_YAML_VALUES:,} values "
                "(each use of an alias *name repeats the whole &name value)",
                hint="a recipe needs a few dozen values; write them out, or nest fewer aliases",
            )
        lines: LineMap = {(): node.start_mark.line + 1}
        _index_node(node, (), lines, yaml.SafeLoader(""), source, set())
        data = yaml.SafeLoader("").construct_document(node)
    except yaml.MarkedYAMLError as error:
        raise _yaml_error(error, source) from None
    except yaml.YAMLError as error:
        raise RecipeError(f"{source}:1: invalid YAML: {error}") from None
    return data, lines


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


# --------------------------------------------------------------------------------------------
# YAML with lines


def _index_node(
    node: yaml.Node,
    path: tuple[Any, ...],
    lines: LineMap,
    keys: yaml.SafeLoader,
    source: str,
    seen: set[int],
) -> None:
    """Record each key's line under its path; refuse duplicate keys.

    Each node is visited once: an alias repeats a node, and following it again would make a
    small file with nested aliases expand exponentially.
    """
    if id(node) in seen:
        return
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        first_line: dict[Any, int] = {}
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE_TAG:  # `<<: *anchor`; later keys may override it
                continue
            try:
                key = keys.construct_object(key_node, deep=True)
                hash(key)
            except (yaml.YAMLError, TypeError):
                continue  # construction reports it, with its line
            line = key_node.start_mark.line + 1
            if key in first_line:
                raise RecipeError(
                    f"{source}:{line}: {_format_path(path)}: duplicate key {key!r} "
                    f"(lines {first_line[key]} and {line})",
                    hint="keep one of them; YAML would otherwise silently use the last",
                )
            first_line[key] = line
            lines[(*path, key)] = line
            _index_node(value_node, (*path, key), lines, keys, source, seen)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            lines[(*path, index)] = item.start_mark.line + 1
            _index_node(item, (*path, index), lines, keys, source, seen)


def _expanded_size(node: yaml.Node, sizes: dict[int, int], open_nodes: set[int]) -> int:
    """Values ``node`` becomes once aliases are expanded; more than the limit once it is
    clear, so a billion-laughs document is measured in microseconds, not built."""
    key = id(node)
    if key in sizes:
        return sizes[key]
    if key in open_nodes:  # an alias inside its own anchor: an endless document
        return MAX_YAML_VALUES + 1
    open_nodes.add(key)
    total = 1
    if isinstance(node, yaml.SequenceNode):
        children: list[yaml.Node] = list(node.value)
    elif isinstance(node, yaml.MappingNode):
        children = [part for pair in node.value for part in pair]
    else:
        children = []
    for child in children:
        total += _expanded_size(child, sizes, open_nodes)
        if total > MAX_YAML_VALUES:
            break
    open_nodes.discard(key)
    sizes[key] = total
    return total


def _yaml_error(error: yaml.MarkedYAMLError, source: str) -> RecipeError:
    mark = error.problem_mark or error.context_mark
    line = mark.line + 1 if mark else 1
    problem = error.problem or "not valid YAML"
    detail = f"invalid YAML: {problem}"
    if mark:
        detail += f" (column {mark.column + 1})"
    if error.context and error.context_mark and error.context_mark is not mark:
        detail += f", {error.context} at line {error.context_mark.line + 1}"
    elif error.context:
        detail = f"invalid YAML: {error.context}: {problem}"
    if "\\t" in problem or "\t" in problem:
        hint = "indent with spaces; YAML does not allow tabs"
    elif "constructor for the tag" in problem:
        hint = (
            "YAML tags (!name, !!type) are not used in recipes: remove the tag, or quote the "
            "value if the '!' belongs to the text"
        )
    elif "another document" in problem:
        hint = "a recipe is a single YAML document; remove the extra '---'"
    else:
        hint = f"check indentation, quotes and brackets on line {line} and just above it"
    return RecipeError(f"{source}:{line}: {detail}", hint=hint)


def _missing_file_hint(file: Path) -> str:
    folder = file.parent
    if not folder.is_dir():
        return f"there is no folder {str(folder)!r}; paths are relative to {Path.cwd()}"
    names = sorted(p.name for p in folder.iterdir() if p.suffix in (".yaml", ".yml"))
    if not names:
        return f"{str(folder)!r} holds no .yaml files"
    # Compare stems: the shared ".yaml" would make every name look close.
    stems = {Path(name).stem: name for name in names}
    guess = nearest(file.stem, stems)
    return (f"did you mean {str(folder / stems[guess])!r}? " if guess else "") + (
        f"recipes in {str(folder)!r}: {', '.join(names)}"
    )


def _folder_hint(folder: Path) -> str:
    names = sorted(p.name for p in folder.iterdir() if p.suffix in (".yaml", ".yml"))
    if names:
        return f"name one of the recipes in it: {', '.join(names)}"
    return "name a .yaml recipe file"


# --------------------------------------------------------------------------------------------
# Passes


@dataclass(frozen=True)
class _Problem:
    """One thing wrong with a recipe, located; the first is reported in full."""

    path: tuple[Any, ...]
    detail: str
    hint: str | None
    line: int | None


def _build_passes(items: list[Any], lines: LineMap) -> tuple[list[PassConfig], list[_Problem]]:
    """Turn ``passes`` entries into their registered config objects, collecting every problem."""
    configs: list[PassConfig] = []
    problems: list[_Problem] = []
    names = ", ".join(available_passes())
    example = "- {pass: rtn, bits: 4, group_size: 64}"
    for index, item in enumerate(items):
        path: tuple[Any, ...] = ("passes", index)
        if isinstance(item, PassConfig):
            try:
                config_for(item)
            except PassError as error:
                problems.append(
                    _Problem(
                        path,
                        error.message,
                        "register it with @register_pass(name, ConfigClass)",
                        _line(lines, path),
                    )
                )
            else:
                configs.append(item)
            continue
        if not isinstance(item, Mapping):
            problems.append(
                _Problem(
                    path,
                    f"expected a mapping with key 'pass', got {_described(item)}",
                    f"write each pass as a mapping, e.g. {example}; available passes: {names}",
                    _line(lines, path),
                )
            )
            continue
        if "pass" not in item:
            guess = nearest("pass", [k for k in item if isinstance(k, str)])
            problems.append(
                _Problem(
                    path,
                    f"missing key 'pass' (value {_show(dict(item))})",
                    (f"did you mean 'pass' instead of {guess!r}? " if guess else "")
                    + f"each entry names its pass, e.g. {example}; available passes: {names}",
                    _line(lines, path),
                )
            )
            continue
        name = item["pass"]
        name_path = (*path, "pass")
        if not isinstance(name, str):
            problems.append(
                _Problem(
                    name_path,
                    f"{_show(name)} is not valid: expected a pass name",
                    f"available passes: {names}",
                    _line(lines, name_path),
                )
            )
            continue
        try:
            entry = get_pass(name)
        except RecipeError as error:
            problems.append(_Problem(name_path, error.message, error.hint, _line(lines, name_path)))
            continue
        settings = {key: value for key, value in item.items() if key != "pass"}
        booleans = _boolean_problems(settings, entry.config_cls, path, lines)
        problems += booleans
        try:
            configs.append(entry.config_cls.model_validate(settings))
        except ValidationError as error:
            found = _from_validation(error, settings, path, entry.config_cls, lines)
            problems += _merged(booleans, found)[len(booleans) :]
    return configs, problems


def _boolean_problems(
    data: Any, cls: type[BaseModel], path: tuple[Any, ...], lines: LineMap
) -> list[_Problem]:
    """``true``/``false`` where a number belongs: pydantic would read them as 1 and 0."""
    if not isinstance(data, Mapping):
        return []
    problems = []
    for key, value in data.items():
        if not isinstance(key, str) or key not in cls.model_fields:
            continue
        kinds = _unwrap(cls.model_fields[key].annotation)
        where = (*path, key)
        if isinstance(value, bool) and bool not in kinds and ({int, float} & set(kinds)):
            description = cls.model_fields[key].description
            problems.append(
                _Problem(
                    where,
                    f"{_show(value)} is not valid: expected a number, not a boolean",
                    f"{key}: {description}" if description else None,
                    _line(lines, where),
                )
            )
        section = next((t for t in kinds if _is_model(t)), None)
        if section is not None:
            problems += _boolean_problems(value, section, where, lines)
    return problems


def _merged(first: list[_Problem], more: list[_Problem]) -> list[_Problem]:
    """``first`` and then those of ``more`` at paths ``first`` does not already name."""
    named = {problem.path for problem in first}
    return first + [problem for problem in more if problem.path not in named]


# --------------------------------------------------------------------------------------------
# Checks across sections: what would otherwise fail only after the passes ran


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
        found = _dataset_problem(spec)
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
                    f"{name} comes after {quantizer} (passes[{first}]): {name} rescales weights "
                    f"before they are quantized, and after {quantizer} it would break their codes",
                    f"move {name} before {quantizer}, with the same bits and group_size",
                    _line(lines, path),
                )
            )
    return problems


def _export_problems(
    passes: Sequence[PassConfig], names: list[str], export: ExportSpec, lines: LineMap
) -> list[_Problem]:
    """Formats the chosen export format cannot store (compressed-tensors: what vLLM serves)."""
    from compress.export import compressed_tensors as ct

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


def _dataset_problem(spec: str) -> tuple[str, str] | None:
    """(message, hint) if ``spec`` names no dataset :func:`compress.data.load_texts` can read;
    checked without loading anything (hub datasets only by the shape of their spec)."""
    from compress import data
    from compress.errors import DataError

    known = [f"builtin:{name}" for name in data.BUILTIN_DATASETS]
    aliases = list(data._HUB_ALIASES)  # the corpora load_texts names by a short alias
    if spec.startswith("builtin:") or spec in data.BUILTIN_DATASETS:
        name = spec.removeprefix("builtin:")
        if name in data.BUILTIN_DATASETS:
            return None
        guess = nearest(spec, known)
        return f"{spec!r} is not a builtin dataset", (
            f"did you mean {guess!r}? " if guess else ""
        ) + f"builtin datasets: {', '.join(known)}"
    if spec in aliases:
        return None
    if spec.startswith("hub:"):
        try:
            data._parse_hub_spec(spec)
        except DataError as error:
            return error.message, error.hint or ""
        return None
    path = Path(spec).expanduser()
    if path.suffix.lower() in {".txt", ".json", ".jsonl"}:
        if not path.is_file():
            where = "is a folder" if path.is_dir() else "does not exist"
            return f"dataset file {path} {where}", "check the path; or use builtin:wiki"
        if path.stat().st_size == 0:
            return f"dataset file {path} is empty", (
                ".txt: one text per line; .json/.jsonl: records with a 'text' field"
            )
        return None
    guess = nearest(spec, [*known, *aliases])
    return f"unknown dataset {spec!r}", (f"did you mean {guess!r}? " if guess else "") + (
        f"use one of {', '.join([*known, *aliases])}, hub:<dataset id>[:<config>][@<split>], "
        "or a local .txt/.json/.jsonl file"
    )


# --------------------------------------------------------------------------------------------
# Turning pydantic errors into located messages


def _from_validation(
    error: ValidationError,
    data: Any,
    root: tuple[Any, ...],
    root_cls: type[BaseModel],
    lines: LineMap,
) -> list[_Problem]:
    """One located problem per pydantic error; ``data`` is what ``root_cls`` was given."""
    problems = []
    for item in error.errors(include_url=False):
        kind = item["type"]
        relative = _real_path(data, item["loc"], kind)
        path = (*root, *relative)
        value = item.get("input")
        if kind in ("extra_forbidden", "invalid_key") and relative:
            key = relative[-1]
            cls = _model_at(root_cls, relative[:-1])
            valid = list(cls.model_fields) if cls else []
            guess = nearest(str(key), valid)
            label = _label(root_cls, root, relative[:-1])
            detail = (
                f"unknown key {key!r} (value {_show(value)})"
                if kind == "extra_forbidden"
                else f"key {key!r} is not valid: keys must be strings"
            )
            hint = (f"did you mean {guess!r}? " if guess else "") + (
                f"valid keys of {label}: {', '.join(valid)}"
            )
            problems.append(_Problem(path[:-1], detail, hint, _line(lines, path)))
        elif kind == "missing" and relative:
            cls = _model_at(root_cls, relative[:-1])
            label = _label(root_cls, root, relative[:-1])
            required = [n for n, f in cls.model_fields.items() if f.is_required()] if cls else []
            hint = f"add '{relative[-1]}:'"
            description = _description(root_cls, relative)
            if description:
                hint += f" ({description})"
            if required:
                hint += f"; required keys of {label}: {', '.join(required)}"
            problems.append(_Problem(path, "missing", hint, _line(lines, path[:-1])))
        else:
            reason = item["msg"].removeprefix("Value error, ")
            value_hint = _value_hint(root_cls, root, relative, kind, value)
            key = next((p for p in reversed(relative) if isinstance(p, str)), None)
            if isinstance(value, str) and kind in _NUMBER_ERRORS and key and _quoted(value):
                # YAML reads a quoted 4 as the text "4": say so, the parser's words do not
                value_hint = (
                    f"{key} takes a number (or null where allowed); quotes make {_show(value)} "
                    f"text: write it unquoted, e.g. {key}: 4"
                )
            elif isinstance(value, bool) and kind not in ("bool_type", "bool_parsing"):
                reason = "expected a number or text, not a boolean"
            elif isinstance(value, int | float) and kind == "string_type" and key:
                value_hint = f"{key} takes text; quote it: {key}: '{value}'"
            detail = f"{_show(value)} is not valid: {reason}"
            problems.append(_Problem(path, detail, value_hint, _line(lines, path)))
    return problems


def _quoted(text: str) -> bool:
    """Whether YAML would have read ``text`` as a number or null without its quotes."""
    try:
        float(text)
    except ValueError:
        return text.strip().lower() in ("null", "~", "none", "true", "false")
    return True


_NUMBER_ERRORS = ("int_parsing", "float_parsing", "int_from_float", "int_type", "float_type")


def _value_hint(
    root_cls: type[BaseModel],
    root: tuple[Any, ...],
    relative: tuple[Any, ...],
    kind: str,
    value: Any,
) -> str | None:
    """Allowed values for a choice, valid keys for a section, else the field's description."""
    field_path = tuple(p for p in relative if isinstance(p, str))
    annotation = _annotation_at(root_cls, field_path)
    choices = ["true", "false"] if annotation is bool else _literal_choices(annotation)
    if choices:
        guess = nearest(str(value), choices) if isinstance(value, str) else None
        return (f"did you mean {guess!r}? " if guess else "") + (
            f"allowed values: {', '.join(choices)}"
        )
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        cls = _model_at(root_cls, relative)
        if cls is not None:
            keys = ", ".join(cls.model_fields)
            if cls is ModelSpec:
                return f"write a model name, or a mapping with keys: {keys}"
            return f"expected a mapping; valid keys of {_label(root_cls, root, relative)}: {keys}"
    description = _description(root_cls, relative)
    return f"{field_path[-1]}: {description}" if description and field_path else None


def _real_path(data: Any, loc: tuple[Any, ...], kind: str) -> tuple[Any, ...]:
    """The key path in the user's data; drops pydantic's union and validator tags from ``loc``."""
    path: list[Any] = []
    node = data
    for position, part in enumerate(loc):
        in_mapping = isinstance(node, Mapping) and part in node
        in_list = (
            isinstance(node, Sequence)
            and not isinstance(node, str)
            and isinstance(part, int)
            and 0 <= part < len(node)
        )
        if in_mapping or in_list:
            path.append(part)
            node = node[part]
        elif position == len(loc) - 1 and kind == "missing":
            path.append(part)
    return tuple(path)


def _unwrap(annotation: Any) -> list[Any]:
    """The types inside ``X | None``, ``list[X]``, ``Annotated[X, ...]`` and the like."""
    origin = typing.get_origin(annotation)
    if origin is None:
        return [annotation]
    if origin is Literal:
        return [annotation]
    if origin in (typing.Union, types.UnionType, list, tuple, set, typing.Annotated):
        inner = typing.get_args(annotation)
        if origin is typing.Annotated:
            inner = inner[:1]
        return [t for arg in inner for t in _unwrap(arg)]
    return [annotation]


def _annotation_at(cls: type[BaseModel] | None, field_path: tuple[str, ...]) -> Any:
    """The annotation of the field reached by ``field_path`` from ``cls``."""
    annotation: Any = None
    for name in field_path:
        if cls is None or name not in cls.model_fields:
            return None
        annotation = cls.model_fields[name].annotation
        cls = next((t for t in _unwrap(annotation) if _is_model(t)), None)
    return annotation


def _model_at(cls: type[BaseModel] | None, path: tuple[Any, ...]) -> type[BaseModel] | None:
    """The section model that the mapping at ``path`` (relative to ``cls``) is validated as."""
    for name in path:
        if isinstance(name, int):
            continue
        if cls is None or name not in cls.model_fields:
            return None
        annotation = cls.model_fields[name].annotation
        cls = next((t for t in _unwrap(annotation) if _is_model(t)), None)
    return cls


def _description(cls: type[BaseModel], relative: tuple[Any, ...]) -> str | None:
    names = tuple(p for p in relative if isinstance(p, str))
    if not names:
        return None
    parent = _model_at(cls, names[:-1])
    if parent is None or names[-1] not in parent.model_fields:
        return None
    return parent.model_fields[names[-1]].description


def _is_model(value: Any) -> bool:
    return isinstance(value, type) and issubclass(value, BaseModel)


def _literal_choices(annotation: Any) -> list[str]:
    for candidate in _unwrap(annotation):
        if typing.get_origin(candidate) is Literal:
            return [str(choice) for choice in typing.get_args(candidate)]
    return []


def _label(root_cls: type[BaseModel], root: tuple[Any, ...], relative: tuple[Any, ...]) -> str:
    """How a message names a section: ``pass 'rtn'``, ``calibration``, ``top level``."""
    if not relative and issubclass(root_cls, PassConfig):
        try:
            return f"pass {_pass_name_of(root_cls)!r}"
        except LookupError:
            pass
    return _format_path((*root, *relative))


def _pass_name_of(cls: type[BaseModel]) -> str:
    for name, entry in available_passes().items():
        if entry.config_cls is cls:
            return name
    raise LookupError(cls.__name__)


# --------------------------------------------------------------------------------------------
# Formatting


def _raise(problems: list[_Problem], source: str) -> typing.NoReturn:
    """Report the first problem (in file order) in full and name the rest."""
    ordered = sorted(problems, key=lambda p: p.line if p.line is not None else float("inf"))
    first, rest = ordered[0], ordered[1:]
    message = f"{_where(source, first.line)}: {_format_path(first.path)}: {first.detail}"
    if rest:
        named = ", ".join(
            _format_path(p.path) + (f" (line {p.line})" if p.line else "")
            for p in rest[:_MAX_LISTED]
        )
        more = ", ..." if len(rest) > _MAX_LISTED else ""
        noun = "error" if len(rest) == 1 else "errors"
        message += f"\n  {len(rest)} more {noun} after this one: {named}{more}"
    raise RecipeError(message, hint=first.hint)


def _where(source: str, line: int | None) -> str:
    return f"{source}:{line}" if line else source


def _line(lines: LineMap, path: tuple[Any, ...]) -> int | None:
    """Line of ``path``, or of its nearest enclosing key when the path itself is absent."""
    for end in range(len(path), -1, -1):
        if path[:end] in lines:
            return lines[path[:end]]
    return None


def _format_path(path: tuple[Any, ...]) -> str:
    if not path:
        return "top level"
    text = ""
    for part in path:
        if isinstance(part, int) and not isinstance(part, bool):
            text += f"[{part}]"
        elif isinstance(part, str) and part.isidentifier():
            text += f".{part}" if text else part
        else:
            text += f"[{part!r}]"
    return text


def _show(value: Any, limit: int = 60) -> str:
    """A value as the user wrote it in YAML terms (null, true, 'text'), cut short if long."""
    if value is None:
        text = "null"
    elif isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, (dict, list)):
        try:
            text = json.dumps(value, default=str)
        except (TypeError, ValueError):
            text = repr(value)
    else:
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _described(value: Any) -> str:
    """``the string 'rtn'``, ``a list [1, 2]``: what was found where something else belongs."""
    if value is None:
        return "nothing (null)"
    if isinstance(value, str):
        return f"the string {_show(value)}"
    if isinstance(value, (list, tuple)):
        return f"a list {_show(list(value))}"
    if isinstance(value, bool):
        return f"the boolean {_show(value)}"
    return f"a {type(value).__name__} {_show(value)}"
