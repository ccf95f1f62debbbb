"""The JIT loader must fall back cleanly: a disabled or failing build returns None, logged once."""

from __future__ import annotations

import logging

import pytest

from compress.utils import native


@pytest.fixture(autouse=True)
def _fresh_registry(monkeypatch):
    monkeypatch.setattr(native, "_loaded", {})
    monkeypatch.setattr(native, "_failures", {})


def test_disabled_build_returns_none(monkeypatch):
    monkeypatch.setenv("COMPRESS_NATIVE", "0")
    assert native.load_native("never_built", "int main() {}", ["f"]) is None
    assert native.native_status() == {"never_built": "unavailable: disabled by COMPRESS_NATIVE=0"}


def test_broken_source_falls_back_and_logs_once(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("COMPRESS_CACHE", str(tmp_path))
    broken = "#include <torch/extension.h>\nthis is not C++;\n"
    with caplog.at_level(logging.WARNING, logger="compress.utils.native"):
        assert native.load_native("broken", broken, ["f"]) is None
        assert native.load_native("broken", broken, ["f"]) is None
    assert len([r for r in caplog.records if "broken" in r.getMessage()]) == 1
    assert native.native_status()["broken"].startswith("unavailable: ")
