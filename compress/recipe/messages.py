"""Recipe error messages: every problem located (file, line, key path), the bad value shown as
the user wrote it, and a hint with the nearest valid key, pass name or allowed values.

Pydantic's errors are turned into :class:`_Problem` records here; the first one in file order is
reported in full and the rest are named after it.
"""

from __future__ import annotations

import json
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ValidationError

from compress.errors import PassError, RecipeError, nearest
from compress.registry import PassConfig, available_passes, config_for, get_pass

LineMap = dict[tuple[Any, ...], int]
"""Key path (``("passes", 0, "bits")``) → 1-based line where that key or item starts."""

_MAX_LISTED = 5  # further errors named after the first one


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
            if getattr(cls, "shorthand", None):
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
