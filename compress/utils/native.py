"""First-use JIT build of small C++ extensions (CPU kernels, entropy decoders).

Kernels ship as C++ source inside the package and are compiled once with
``torch.utils.cpp_extension.load_inline`` into the compress cache, so a plain ``pip install``
needs no build step. When no compiler is available (or ``COMPRESS_NATIVE=0``) the build is skipped,
the reason is logged once, and callers fall back to their plain-torch path.

Builds are keyed by instruction set, never by ``-march=native``: a binary built on one CPU must
not run on another that lacks its instructions (a shared cache, a copied home directory, a
container image). The levels, lowest first:

- ``generic``: the compiler's baseline for the architecture (x86-64: SSE2), any CPU;
- ``avx2``: AVX2 + FMA + F16C (Haswell, Zen 1 and later);
- ``avx512``: ``avx2`` + AVX-512 F/BW/VL/DQ and VNNI (Ice Lake, Cascade Lake, Zen 4 and later);
- ``amx``: ``avx512`` + AVX512-BF16 and AMX tiles with bf16 (Sapphire Rapids and later).

The running CPU's level is read from ``/proc/cpuinfo`` (else torch's cpuinfo). The level and
its compiler flags are part of the cache key and of the module name, so builds for several
levels live side by side, even in one process. ``COMPRESS_CPU_ISA=<level>`` forces a lower
level (to test the AVX2 build on an AVX-512 machine, or to rule out a suspect path); a level
the CPU cannot run is refused with a warning. A level whose build fails (an old compiler
without AMX, say) is logged and the next lower one is built instead.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import subprocess
import sys
import threading
from functools import cache
from pathlib import Path
from types import ModuleType

from .paths import cache_dir

__all__ = [
    "ISA_LEVELS",
    "build_isa",
    "cpu_flags",
    "cpu_isa",
    "isa_cflags",
    "load_native",
    "native_status",
]

log = logging.getLogger(__name__)

ISA_LEVELS = ("generic", "avx2", "avx512", "amx")
"""Instruction-set levels of the native builds, lowest first; each includes the ones before."""

# /proc/cpuinfo flags each level needs beyond the previous one.
_REQUIRED: dict[str, tuple[str, ...]] = {
    "generic": (),
    "avx2": ("avx2", "fma", "f16c"),
    "avx512": ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni"),
    "amx": ("avx512_bf16", "amx_tile", "amx_bf16"),
}
# Compiler flags each level adds to the previous one (gcc and clang spell them alike).
_FLAGS: dict[str, tuple[str, ...]] = {
    "generic": (),
    "avx2": ("-mavx2", "-mfma", "-mf16c"),
    "avx512": ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512vnni"),
    "amx": ("-mavx512bf16", "-mamx-tile", "-mamx-bf16"),
}

_lock = threading.Lock()
_loaded: dict[tuple[str, str], ModuleType | None] = {}  # (name, level asked for)
_built: dict[tuple[str, str], ModuleType] = {}  # (name, level built): one import per binary
_failures: dict[tuple[str, str], str] = {}
_warned: set[str] = set()


def _x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64", "i386", "i686", "x86")


@cache
def cpu_flags() -> frozenset[str]:
    """The running CPU's feature flags as Linux names them (``avx2``, ``avx512_vnni``, ...).

    From ``/proc/cpuinfo``, which lists only what the kernel has enabled; elsewhere from
    torch's cpuinfo (the subset the levels need)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    import torch

    probes = {
        "avx2": ("_is_avx2_supported", ("avx2", "fma", "f16c")),
        "avx512": ("_is_avx512_supported", ("avx512f", "avx512bw", "avx512vl", "avx512dq")),
        "vnni": ("_is_vnni_supported", ("avx512_vnni",)),
        "bf16": ("_is_avx512_bf16_supported", ("avx512_bf16",)),
        "amx": ("_is_amx_tile_supported", ("amx_tile", "amx_bf16")),
    }
    found: set[str] = set()
    for probe, names in probes.values():
        check = getattr(torch.cpu, probe, None)
        if check is not None and check():
            found.update(names)
    return frozenset(found)


def bf16_arithmetic() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX). Without it torch
    converts bf16 to fp32 around its fp32 kernels: bf16 GEMMs and autocast run slower than
    fp32 ones."""
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


@cache
def cpu_isa() -> str:
    """The highest level of :data:`ISA_LEVELS` the running CPU can execute."""
    if not _x86():
        return "generic"
    flags = cpu_flags()
    best = "generic"
    for level in ISA_LEVELS[1:]:
        if not all(flag in flags for flag in _REQUIRED[level]):
            break
        best = level
    return best


def build_isa() -> str:
    """The level to build and run: the CPU's, or ``COMPRESS_CPU_ISA`` where that is lower.

    An unknown name raises ``ValueError``; a level above the CPU's is refused with a warning
    (once), since its binary would stop on an illegal instruction."""
    detected = cpu_isa()
    wanted = os.environ.get("COMPRESS_CPU_ISA", "").strip().lower()
    if not wanted or wanted == "native":
        return detected
    if wanted not in ISA_LEVELS:
        raise ValueError(
            f"COMPRESS_CPU_ISA={wanted!r} is not an instruction-set level; use one of "
            f"{', '.join(ISA_LEVELS)} (or unset it for this CPU's, {detected!r})"
        )
    if ISA_LEVELS.index(wanted) > ISA_LEVELS.index(detected):
        if wanted not in _warned:
            _warned.add(wanted)
            log.warning(
                "compress: COMPRESS_CPU_ISA=%s is above what this CPU runs (%s); using %s",
                wanted,
                detected,
                detected,
            )
        return detected
    return wanted


def isa_cflags(isa: str) -> list[str]:
    """Compiler flags of one level (cumulative), on top of the common ones."""
    flags = ["-O3", "-std=c++17", "-fopenmp"]
    if not _x86():
        return flags
    for level in ISA_LEVELS[: ISA_LEVELS.index(isa) + 1]:
        flags += _FLAGS[level]
    return flags


def load_native(
    name: str, cpp_source: str, functions: list[str], *, isa: str | None = None
) -> ModuleType | None:
    """Compile (once, cached by source and instruction set) and import a C++ extension, or
    return ``None``.

    ``cpp_source`` is a complete translation unit using ``torch/extension.h``; ``functions`` are
    the names bound into Python; ``isa`` is a level of :data:`ISA_LEVELS` (default:
    :func:`build_isa`). A failed build is logged once per (name, level) and remembered for the
    process, and the next lower level is tried, so hot paths can call this freely.
    """
    level = isa or build_isa()
    with _lock:
        key = (name, level)
        if key in _loaded:
            return _loaded[key]
        module: ModuleType | None = None
        if os.environ.get("COMPRESS_NATIVE", "1") == "0":
            _failures[key] = "disabled by COMPRESS_NATIVE=0"
        else:
            for candidate in reversed(ISA_LEVELS[: ISA_LEVELS.index(level) + 1]):
                if (name, candidate) in _built:
                    module = _built[(name, candidate)]
                    break
                if (name, candidate) in _failures:
                    continue
                try:
                    module = _built[(name, candidate)] = _build(
                        name, cpp_source, functions, candidate
                    )
                    break
                except Exception as exc:  # any toolchain failure means: try lower, then torch
                    reason = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1:]}"
                    _failures[(name, candidate)] = reason
                    log.warning(
                        "compress: native extension %r (%s build) unavailable (%s); %s",
                        name,
                        candidate,
                        reason,
                        "trying a lower level" if candidate != "generic" else "using plain torch",
                    )
            if module is None:
                _failures.setdefault(key, "no level built")
        _loaded[key] = module
        return module


def native_status() -> dict[str, str]:
    """For ``compress inspect`` and reports: which extensions built (and for which instruction
    set), and why others did not."""
    status = {}
    for (name, level), module in _loaded.items():
        label = name if level == cpu_isa() else f"{name} ({level})"
        if module is None:
            status[label] = f"unavailable: {_failures.get((name, level), '?')}"
        else:
            built = getattr(module, "__compress_isa__", level)
            status[label] = f"built ({built})"
    return status


def _build_place(name: str, cpp_source: str, functions: list[str], isa: str) -> tuple[Path, str]:
    """The build folder and module name of an extension: keyed by its source, functions,
    flags (so the instruction set), torch version and machine."""
    import torch

    flags = isa_cflags(isa)
    key = hashlib.sha256(
        "\n".join([cpp_source, *functions, *flags, torch.__version__, platform.machine()]).encode()
    ).hexdigest()[:16]
    return cache_dir() / "native" / f"{name}-{isa}-{key}", f"compress_{name}_{isa}_{key}"


def is_built(name: str, cpp_source: str, functions: list[str], *, isa: str | None = None) -> bool:
    """Whether the extension's library is in the cache already (nothing to compile)."""
    if os.environ.get("COMPRESS_NATIVE", "1") == "0":
        return True  # nothing will be built
    build_dir, module_name = _build_place(name, cpp_source, functions, isa or build_isa())
    return (build_dir / f"{module_name}.so").is_file()


def build_in_background(module: str, function: str) -> subprocess.Popen[bytes] | None:
    """Run ``module.function()`` (a first-use build) in a process of its own and return at
    once. A separate process, not a thread: if this one is killed, the build still finishes
    and releases torch's build lock, which a half-done build would leave behind for good."""
    code = f"import importlib; importlib.import_module({module!r}).{function}()"
    try:
        return subprocess.Popen(
            [sys.executable, "-c", code],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    except OSError as error:  # the build then happens on first use, as without this
        log.info("compress: background build of %s not started: %s", module, error)
        return None


def _build(name: str, cpp_source: str, functions: list[str], isa: str) -> ModuleType:
    from torch.utils.cpp_extension import load_inline

    flags = isa_cflags(isa)
    build_dir, module_name = _build_place(name, cpp_source, functions, isa)
    build_dir.mkdir(parents=True, exist_ok=True)
    module = load_inline(
        name=module_name,
        cpp_sources=[cpp_source],
        functions=functions,
        extra_cflags=flags,
        extra_ldflags=["-fopenmp"],
        build_directory=str(build_dir),
        verbose=False,
    )
    module.__compress_isa__ = isa
    return module
