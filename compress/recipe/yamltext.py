"""Recipe YAML read with the line of every key: duplicate keys refused, alias bombs refused
before they expand, YAML errors turned into located messages with a hint."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from compress.errors import RecipeError, nearest
from compress.recipe.messages import LineMap, _format_path

__all__ = ["MAX_YAML_VALUES", "yaml_with_lines"]

_MERGE_TAG = "tag:yaml.org,2002:merge"
MAX_YAML_VALUES = 100_000
"""Most values a recipe may expand to (aliases counted at each use); a real one has dozens."""


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
