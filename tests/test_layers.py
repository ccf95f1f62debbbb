"""The import structure of the package, read from its source (no module is imported).

Every ``import`` statement counts: top level, inside functions and under ``TYPE_CHECKING``
alike. Three rules (``docs/architecture.md`` draws the map):

- no circle between modules;
- no unit imports a unit of a higher layer;
- units of one layer do not import each other (each is a sibling the others must not need).

Names handed to ``importlib.import_module`` as data (the builtin pass list, the builtin format
kinds, the transformers plugin) are how a lower layer reaches plugins above it on purpose; they
are not import statements and are listed in :data:`PLUGIN_STRINGS` so a new one is a decision.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "compress"

LAYERS: list[list[str]] = [
    ["compress.errors"],
    ["compress", "compress.utils"],  # the root: version and the transformers import hook
    ["compress.formats"],  # the format protocol, its registry, bit packing
    ["compress.ir", "compress.registry"],
    # one folder per format kind
    [
        "compress.formats.int",
        "compress.formats.fp8",
        "compress.formats.fp4",
        "compress.formats.entropy",
        "compress.formats.bitmask",
    ],
    # format kinds built on another kind (N:M sparsity over integer codes, MXFP6 over the 4-bit
    # table formats' rounding, scales and quantize/dequantize)
    ["compress.formats.nm", "compress.formats.fp6"],
    # adapters that correct a layer's output (PEFT methods and the in-pipeline hooks)
    ["compress.adapters"],
    [
        "compress.data",
        "compress.models",
        "compress.layouts",
        "compress.sequential",
        "compress.offload",
    ],
    [
        "compress.quant",
        "compress.lossless",
        "compress.export",
        "compress.prune",
        "compress.distill",
    ],
    ["compress.evaluate"],
    ["compress.recipe", "compress.builtins"],
    ["compress.pipeline"],
    ["compress.cli"],
]
UNITS = {unit: level for level, units in enumerate(LAYERS) for unit in units}

PLUGIN_STRINGS = {
    "compress/__init__.py": {"compress.export.hf"},
    "compress/registry.py": {"compress.builtins"},
    "compress/formats/base.py": {
        "compress.formats.int",
        "compress.formats.fp8",
        "compress.formats.fp4",
        "compress.formats.fp6",
        "compress.formats.nm",
        "compress.formats.bitmask",
    },
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imported_names(path: Path, modules: dict[str, Path]) -> Iterator[str]:
    """The compress modules one file imports, anywhere in it."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            # `from pkg import sub` imports the submodule; `from mod import name` the module
            targets = [source] + [f"{source}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            if target in modules and target != name:
                yield target


def unit_of(module: str) -> str:
    best = max((u for u in UNITS if module == u or module.startswith(u + ".")), key=len)
    return best


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = all_modules()
    return {name: set(imported_names(path, modules)) for name, path in modules.items()}


def test_every_module_has_a_layer(graph: dict[str, set[str]]) -> None:
    assert all(any(m == u or m.startswith(u + ".") for u in UNITS) for m in graph), [
        m for m in graph if not any(m == u or m.startswith(u + ".") for u in UNITS)
    ]
    assert unit_of("compress.formats.int.linear") == "compress.formats.int"
    assert unit_of("compress.formats.base") == "compress.formats"


def test_no_circles(graph: dict[str, set[str]]) -> None:
    state: dict[str, int] = {}
    stack: list[str] = []
    circles: list[list[str]] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                circles.append([*stack[stack.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert not circles, "\n".join(" -> ".join(c) for c in circles)


def test_imports_go_down_and_not_sideways(graph: dict[str, set[str]]) -> None:
    problems = []
    for module, targets in graph.items():
        unit = unit_of(module)
        for target in targets:
            other = unit_of(target)
            if other == unit:
                continue
            if UNITS[other] > UNITS[unit]:
                problems.append(
                    f"{module} imports {target}: layer {UNITS[other]} above {UNITS[unit]}"
                )
            elif UNITS[other] == UNITS[unit]:
                problems.append(f"{module} imports {target}: siblings {unit} and {other}")
    assert not problems, "\n".join(sorted(problems))


def test_plugins_reached_by_name_are_the_declared_ones() -> None:
    found: dict[str, set[str]] = {}
    pattern = re.compile(r"""["'](compress(?:\.\w+)+)["']""")
    for name, path in all_modules().items():
        relative = str(path.relative_to(PACKAGE.parent))
        text = path.read_text(encoding="utf-8")
        if "import_module" not in text:
            continue
        names = {
            m
            for m in pattern.findall(text)
            if m in all_modules() and UNITS[unit_of(m)] > UNITS[unit_of(name)]
        }
        if names:
            found[relative] = names
    assert found == PLUGIN_STRINGS


def test_the_check_sees_function_level_and_type_checking_imports(tmp_path: Path) -> None:
    modules = {"compress.a": tmp_path / "a.py", "compress.b": tmp_path / "b.py"}
    source = (
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from compress.a import x\n"
        "def f():\n    import compress.b\n"
    )
    path = PACKAGE / "_probe_for_test.py"
    try:
        path.write_text(source, encoding="utf-8")
        assert set(imported_names(path, modules)) == {"compress.a", "compress.b"}
    finally:
        path.unlink()
