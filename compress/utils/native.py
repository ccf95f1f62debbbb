"""First-use JIT build of small C++ extensions (CPU kernels, entropy decoders).

Kernels ship as C++ source inside the package and are compiled once per source hash with
``torch.utils.cpp_extension.load_inline`` into the compress cache, so a plain ``pip install``
needs no build step. When no compiler is available (or ``COMPRESS_NATIVE=0``) the build is skipped,
the reason is logged once, and callers fall back to their plain-torch path.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import threading
from types import ModuleType

from .paths import cache_dir

__all__ = ["load_native", "native_status"]

log = logging.getLogger(__name__)

_lock = threading.Lock()
_loaded: dict[str, ModuleType | None] = {}
_failures: dict[str, str] = {}


def _cflags() -> list[str]:
    flags = ["-O3", "-std=c++17", "-fopenmp"]
    if platform.machine() in ("x86_64", "AMD64"):
        flags.append("-march=native")
    return flags


def load_native(name: str, cpp_source: str, functions: list[str]) -> ModuleType | None:
    """Compile (once, cached by source hash) and import a C++ extension, or return ``None``.

    ``cpp_source`` is a complete translation unit using ``torch/extension.h``; ``functions`` are
    the names bound into Python. A failed build is logged once per name and remembered for the
    process, so hot paths can call this freely.
    """
    with _lock:
        if name in _loaded:
            return _loaded[name]
        module: ModuleType | None = None
        if os.environ.get("COMPRESS_NATIVE", "1") == "0":
            _failures[name] = "disabled by COMPRESS_NATIVE=0"
        else:
            try:
                module = _build(name, cpp_source, functions)
            except Exception as exc:  # any toolchain failure means: use the torch path
                _failures[name] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1:]}"
                log.warning(
                    "compress: native extension %r unavailable (%s); using the plain-torch path",
                    name,
                    _failures[name],
                )
        _loaded[name] = module
        return module


def native_status() -> dict[str, str]:
    """For ``compress inspect`` and reports: which extensions built, and why others did not."""
    return {
        name: ("built" if module is not None else f"unavailable: {_failures.get(name, '?')}")
        for name, module in _loaded.items()
    }


def _build(name: str, cpp_source: str, functions: list[str]) -> ModuleType:
    import torch
    from torch.utils.cpp_extension import load_inline

    flags = _cflags()
    key = hashlib.sha256(
        "\n".join([cpp_source, *functions, *flags, torch.__version__]).encode()
    ).hexdigest()[:16]
    build_dir = cache_dir() / "native" / f"{name}-{key}"
    build_dir.mkdir(parents=True, exist_ok=True)
    return load_inline(
        name=f"compress_{name}_{key}",
        cpp_sources=[cpp_source],
        functions=functions,
        extra_cflags=flags,
        extra_ldflags=["-fopenmp"],
        build_directory=str(build_dir),
        verbose=False,
    )
