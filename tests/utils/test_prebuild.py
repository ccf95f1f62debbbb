"""Native builds started ahead of first use, in a process of their own."""

from compress.formats.int import cpu
from compress.utils import native
from compress.utils.native import build_in_background, is_built


def test_is_built_reads_the_cache(tmp_path, monkeypatch):
    source, functions = cpu._source(), cpu._FUNCTIONS
    if cpu.native() is None:  # this machine cannot build: nothing to look for
        assert not is_built("qmatmul", source, functions)
        return
    assert is_built("qmatmul", source, functions)  # native() just built or found it
    monkeypatch.setenv("COMPRESS_CACHE", str(tmp_path))
    assert not is_built("qmatmul", source, functions)  # an empty cache holds nothing
    assert not is_built("qmatmul", source + "\n// changed", functions)
    monkeypatch.setenv("COMPRESS_NATIVE", "0")
    assert is_built("qmatmul", source, functions)  # disabled: there is nothing to wait for


def test_background_build_runs_in_its_own_process():
    process = build_in_background("platform", "machine")
    assert process is not None
    assert process.wait(timeout=60) == 0


def test_prebuild_starts_nothing_when_cached(monkeypatch):
    if cpu.native() is None:
        return
    started = []
    monkeypatch.setattr(native, "build_in_background", lambda *a: started.append(a))
    monkeypatch.setattr(cpu, "build_in_background", lambda *a: started.append(a))
    cpu.prebuild()
    assert started == []
