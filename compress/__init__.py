"""compress: a declarative compression pipeline for Hugging Face causal LMs.

``import compress`` is light (no torch, no transformers): it makes transformers aware of the
``compress`` quantization method as soon as transformers is imported (now, if it already is), so
``AutoModelForCausalLM.from_pretrained(export_dir)`` loads packed exports. Passes are registered
on their first lookup (:mod:`compress.registry`).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
from collections.abc import Sequence
from types import ModuleType
from typing import Any

from compress.errors import CompressError

__all__ = ["CompressError", "__version__"]

__version__ = "0.1.0"

_PLUGIN = "compress.export.hf"  # registers the quantizer and the exports' config type on import


def _register_with_transformers() -> None:
    # A half-imported plugin (it is what imported transformers) registers itself when done.
    if _PLUGIN not in sys.modules:
        importlib.import_module(_PLUGIN)


class _RegisterAfter(importlib.abc.Loader):
    """Runs transformers' own loader, then registers compress with it."""

    def __init__(self, loader: importlib.abc.Loader) -> None:
        self._loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)
        _register_with_transformers()


class _TransformersHook(importlib.abc.MetaPathFinder):
    """One-shot import hook: the first ``import transformers`` also registers compress."""

    def find_spec(
        self, name: str, path: Sequence[str] | None, target: Any = None
    ) -> importlib.machinery.ModuleSpec | None:
        if name != "transformers":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            spec.loader = _RegisterAfter(spec.loader)
        return spec


if "transformers" in sys.modules:
    _register_with_transformers()
elif not any(isinstance(finder, _TransformersHook) for finder in sys.meta_path):
    sys.meta_path.insert(0, _TransformersHook())
