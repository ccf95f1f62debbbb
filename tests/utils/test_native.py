"""The JIT loader: builds keyed by instruction set, a forced lower level, clean fallbacks (a
disabled or failing build returns None, logged once; a failing level falls to the next)."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest

from compress.utils import native


@pytest.fixture(autouse=True)
def _fresh_registry(monkeypatch):
    monkeypatch.setattr(native, "_loaded", {})
    monkeypatch.setattr(native, "_built", {})
    monkeypatch.setattr(native, "_failures", {})
    monkeypatch.setattr(native, "_warned", set())
    monkeypatch.delenv("COMPRESS_CPU_ISA", raising=False)


def test_disabled_build_returns_none(monkeypatch):
    monkeypatch.setenv("COMPRESS_NATIVE", "0")
    assert native.load_native("never_built", "int main() {}", ["f"]) is None
    assert native.native_status() == {"never_built": "unavailable: disabled by COMPRESS_NATIVE=0"}


def test_broken_source_falls_back_and_logs_once(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("COMPRESS_CACHE", str(tmp_path))
    monkeypatch.setenv("COMPRESS_CPU_ISA", "generic")  # one level: one compiler run
    broken = "#include <torch/extension.h>\nthis is not C++;\n"
    with caplog.at_level(logging.WARNING, logger="compress.utils.native"):
        assert native.load_native("broken", broken, ["f"]) is None
        assert native.load_native("broken", broken, ["f"]) is None
    assert len([r for r in caplog.records if "broken" in r.getMessage()]) == 1
    assert all(v.startswith("unavailable: ") for v in native.native_status().values())


def test_cpu_isa_is_a_known_level_consistent_with_the_flags():
    level = native.cpu_isa()
    assert level in native.ISA_LEVELS
    flags = native.cpu_flags()
    if level in ("avx512", "amx"):
        assert {"avx512f", "avx512bw", "avx512vl", "avx512_vnni"} <= flags
    if level != "generic":
        assert {"avx2", "fma"} <= flags


def test_each_level_has_explicit_flags_never_march_native():
    for level in native.ISA_LEVELS:
        assert not any(f.startswith("-march") for f in native.isa_cflags(level))
    if native._x86():
        assert "-mavx2" not in native.isa_cflags("generic")
        assert "-mavx2" in native.isa_cflags("avx2")
        assert "-mavx512f" not in native.isa_cflags("avx2")
        assert {"-mavx2", "-mavx512bw", "-mavx512vnni"} <= set(native.isa_cflags("avx512"))
        assert "-mamx-tile" in native.isa_cflags("amx")


def test_forcing_a_lower_level_and_refusing_a_higher_one(monkeypatch, caplog):
    monkeypatch.setattr(native, "cpu_isa", lambda: "avx512")
    assert native.build_isa() == "avx512"
    monkeypatch.setenv("COMPRESS_CPU_ISA", "AVX2")
    assert native.build_isa() == "avx2"
    monkeypatch.setenv("COMPRESS_CPU_ISA", "amx")
    with caplog.at_level(logging.WARNING, logger="compress.utils.native"):
        assert native.build_isa() == "avx512"  # its binary would stop on an illegal instruction
    assert "above what this CPU runs" in caplog.text
    monkeypatch.setenv("COMPRESS_CPU_ISA", "avx3")
    with pytest.raises(ValueError, match=r"COMPRESS_CPU_ISA='avx3'.*generic, avx2, avx512, amx"):
        native.build_isa()


def test_builds_are_keyed_and_named_by_level(monkeypatch, tmp_path):
    """Two levels of one source: two build folders and module names, both in one process."""
    monkeypatch.setenv("COMPRESS_CACHE", str(tmp_path))
    monkeypatch.setattr(native, "cpu_isa", lambda: "avx512")
    calls = []

    def fake_load_inline(**kwargs):
        calls.append(kwargs)
        return SimpleNamespace(name=kwargs["name"])

    monkeypatch.setattr("torch.utils.cpp_extension.load_inline", fake_load_inline)
    wide = native.load_native("kern", "// source", ["f"])
    monkeypatch.setenv("COMPRESS_CPU_ISA", "avx2")
    narrow = native.load_native("kern", "// source", ["f"])
    assert wide is not None and narrow is not None and wide is not narrow
    assert native.load_native("kern", "// source", ["f"]) is narrow  # cached per level
    assert native.load_native("kern", "// source", ["f"], isa="avx512") is wide
    assert len(calls) == 2
    names = [c["name"] for c in calls]
    folders = [c["build_directory"] for c in calls]
    assert "_avx512_" in names[0] and "_avx2_" in names[1]
    assert "kern-avx512-" in folders[0] and "kern-avx2-" in folders[1]
    assert "-mavx512f" in calls[0]["extra_cflags"] and "-mavx512f" not in calls[1]["extra_cflags"]
    assert native.native_status() == {"kern": "built (avx512)", "kern (avx2)": "built (avx2)"}


def test_a_level_that_fails_to_build_falls_to_the_next(monkeypatch, caplog):
    monkeypatch.setattr(native, "cpu_isa", lambda: "amx")

    def fake_build(name, source, functions, isa):
        if isa == "amx":
            raise RuntimeError("g++: error: unrecognized command-line option '-mamx-tile'")
        return SimpleNamespace(__compress_isa__=isa)

    monkeypatch.setattr(native, "_build", fake_build)
    with caplog.at_level(logging.WARNING, logger="compress.utils.native"):
        module = native.load_native("kern", "// source", ["f"])
    assert module is not None and module.__compress_isa__ == "avx512"
    assert "amx build" in caplog.text and "trying a lower level" in caplog.text
    assert native.native_status() == {"kern": "built (avx512)"}
