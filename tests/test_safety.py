"""Data safety and honest exit codes (issue 13, section 2): what ``compress apply`` may replace,
what an interrupted or killed run leaves, and two runs into one folder.

Signals are sent to a real ``compress apply`` subprocess on a tiny random Llama saved as a local
folder (seconds per run). The driver pauses the run at a chosen point (after a decoder layer, or
while the export is being written), writes a marker file, and waits there for the signal.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from compress.offload import work_dir_for
from compress.pipeline import Pipeline
from compress.quant.rtn import RTNConfig

from .test_cli import _wide_output, invoke, quoted, write_recipe  # noqa: F401 (autouse)

RTN = "  - {pass: rtn, bits: 4, group_size: 32}\n"

# Runs the CLI; DRIVER_PAUSE=layer or export makes it stop there, write DRIVER_MARKER and sleep
# until a signal arrives (a sleeping process takes SIGINT and SIGTERM like a working one).
_DRIVER = textwrap.dedent(
    """\
    import os, signal, sys, time
    from pathlib import Path
    from compress.cli import run

    # a shell starts background jobs with SIGINT ignored, and children inherit that: restore
    # Python's own handler, which a run started from a terminal has
    signal.signal(signal.SIGINT, signal.default_int_handler)

    def pause():
        Path(os.environ["DRIVER_MARKER"]).write_text(str(os.getpid()))
        time.sleep(60)

    where = os.environ.get("DRIVER_PAUSE")
    if where == "layer":
        from compress.offload import LayerStore
        finish = LayerStore.finish
        def paused_finish(self, index, *args):
            finish(self, index, *args)
            if index == 1:
                pause()
        LayerStore.finish = paused_finish
    elif where == "export":
        from compress.utils.safetensors_io import ShardWriter
        add = ShardWriter.add
        def paused_add(self, name, tensor):
            add(self, name, tensor)
            pause()
        ShardWriter.add = paused_add
    sys.exit(run(sys.argv[1:]))
    """
)


def recipe_for(folder: Path, model: Path, export: Path, *, overwrite: bool = False) -> Path:
    text = f"model: {quoted(model)}\npasses:\n{RTN}"
    text += f"export: {{dir: {quoted(export)}, overwrite: {str(overwrite).lower()}}}\n"
    return write_recipe(folder, text)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory, tiny_llama, byte_tokenizer) -> Path:
    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama.save_pretrained(folder)
    byte_tokenizer.save_pretrained(folder)
    return folder


def start(tmp_path: Path, *args: str | Path, pause: str | None = None) -> subprocess.Popen:
    env = {
        **os.environ,
        "COMPRESS_NATIVE": "0",
        "COLUMNS": "400",  # rich wraps at the terminal width
        "DRIVER_MARKER": str(tmp_path / "paused"),
    }
    if pause is not None:
        env["DRIVER_PAUSE"] = pause
    return subprocess.Popen(
        [sys.executable, "-c", _DRIVER, *map(str, args)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for_pause(process: subprocess.Popen, marker: Path, timeout_s: float = 240) -> None:
    deadline = time.monotonic() + timeout_s
    while not marker.exists():
        if process.poll() is not None:
            raise AssertionError(f"the run ended before pausing:\n{process.stderr.read()}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError("the run never reached its pause point")
        time.sleep(0.05)


def finish(process: subprocess.Popen) -> tuple[int, str]:
    _, err = process.communicate(timeout=120)
    return process.returncode, " ".join(err.split())  # rich wraps long lines


def siblings(export: Path) -> list[str]:
    return sorted(p.name for p in export.parent.iterdir()) if export.parent.exists() else []


# --- what -o and overwrite may replace ------------------------------------------------------------


def test_export_dir_option_does_not_inherit_the_recipes_overwrite(capsys, tmp_path, model_dir):
    """quickstart.yaml says overwrite: true; -o elsewhere must not wipe a folder with it."""
    recipe = recipe_for(tmp_path, model_dir, tmp_path / "out" / "quick", overwrite=True)
    precious = tmp_path / "somefolder"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    result = invoke(capsys, "apply", recipe, "-o", precious)
    assert result.code == 2
    assert f"{precious}: export folder already exists" in result.err
    assert (precious / "thesis.tex").read_text() == "years of work"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.yaml", "somefolder"]


def test_overwrite_never_replaces_a_folder_that_is_not_an_export(capsys, tmp_path, model_dir):
    precious = tmp_path / "somefolder"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    recipe = recipe_for(tmp_path, model_dir, precious, overwrite=True)
    for args in ([], ["--overwrite"], ["-o", precious, "--overwrite"]):
        result = invoke(capsys, "apply", recipe, *args)
        assert result.code == 2, result.err
        assert f"{precious}: exists and is not a compress export" in result.err
        assert "hint:" in result.err
        assert (precious / "notes.txt").read_text() == "keep me"
    assert siblings(precious) == ["recipe.yaml", "somefolder"]


def test_recipe_overwrite_applies_to_its_own_folder_given_with_o(capsys, tmp_path, model_dir):
    export = tmp_path / "out" / "quick"
    recipe = recipe_for(tmp_path, model_dir, export, overwrite=True)
    assert invoke(capsys, "apply", recipe).code == 0
    result = invoke(capsys, "apply", recipe, "-o", export)
    assert result.code == 0, result.err
    assert (export / "compress_manifest.json").is_file()
    assert siblings(export) == ["quick"]


# --- unwritable targets: exit 2 with the path and a hint, before the model is loaded -------------


def test_export_under_a_regular_file_is_refused_before_loading(capsys, tmp_path) -> None:
    blocker = tmp_path / "afile"
    blocker.write_text("")
    # the model does not exist: the target is checked first, so its error is the one reported
    recipe = recipe_for(tmp_path, tmp_path / "no-model", blocker / "export")
    result = invoke(capsys, "apply", recipe)
    assert result.code == 2
    assert f"{blocker}: cannot write the export {blocker / 'export'}: Not a directory" in result.err
    assert "hint: a part of the path is a file" in result.err
    assert blocker.read_text() == ""


def test_export_onto_a_regular_file_is_refused(capsys, tmp_path) -> None:
    target = tmp_path / "model.bin"
    target.write_text("data")
    recipe = recipe_for(tmp_path, tmp_path / "no-model", target, overwrite=True)
    result = invoke(capsys, "apply", recipe)
    assert result.code == 2
    assert f"{target}: is a file, not a folder" in result.err
    assert target.read_text() == "data"


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc")
def test_export_into_proc_is_refused(capsys, tmp_path) -> None:
    target = Path("/proc/compress-test/export")
    result = invoke(capsys, "apply", recipe_for(tmp_path, tmp_path / "no-model", target))
    assert result.code == 2
    assert f"cannot write the export {target}" in result.err
    assert "hint:" in result.err


@pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() == 0,
    reason="root writes into a read-only (chmod 555) folder anyway",
)
def test_export_into_a_read_only_folder_is_refused(capsys, tmp_path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        result = invoke(capsys, "apply", recipe_for(tmp_path, tmp_path / "m", locked / "x"))
    finally:
        locked.chmod(0o755)
    assert result.code == 2
    assert "Permission denied" in result.err and "hint: no permission" in result.err


def test_disk_full_during_export_exits_2_and_frees_the_checkpoints(
    capsys, tmp_path, model_dir, monkeypatch
) -> None:
    from compress.utils import safetensors_io

    def full(self, name, tensor):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.path))

    monkeypatch.setattr(safetensors_io.ShardWriter, "add", full)
    export = tmp_path / "out" / "x"
    result = invoke(capsys, "apply", recipe_for(tmp_path, model_dir, export))
    assert result.code == 2
    assert "No space left on device" in result.err and "hint: the disk is full" in result.err
    assert "checkpoints" in result.err and "removed" in result.err
    assert siblings(export) == []  # no export, no .x.tmp-*, no .x.work, no lock


# --- signals --------------------------------------------------------------------------------------


def test_sigint_exits_130_says_what_was_kept_and_the_run_resumes(tmp_path, model_dir) -> None:
    export = tmp_path / "out" / "x"
    recipe = recipe_for(tmp_path, model_dir, export)
    process = start(tmp_path, "apply", recipe, pause="layer")
    wait_for_pause(process, tmp_path / "paused")
    process.send_signal(signal.SIGINT)
    code, err = finish(process)
    assert code == 130, err
    assert "interrupted (SIGINT)" in err
    assert f"finished layer checkpoint(s) kept in {work_dir_for(export)}" in err
    assert f"continue with `compress apply {recipe} --resume`" in err
    assert siblings(export) == [".x.work"]

    resumed = start(tmp_path, "apply", recipe, "--resume")
    code, err = finish(resumed)
    assert code == 0, err
    assert siblings(export) == ["x"]


def test_sigterm_while_exporting_removes_the_temporary_folder(tmp_path, model_dir) -> None:
    export = tmp_path / "out" / "x"
    process = start(tmp_path, "apply", recipe_for(tmp_path, model_dir, export), pause="export")
    wait_for_pause(process, tmp_path / "paused")
    assert any(name.startswith(".x.tmp-") for name in siblings(export))
    process.send_signal(signal.SIGTERM)
    code, err = finish(process)
    assert code == 143, err
    assert "interrupted (SIGTERM)" in err and "--resume" in err
    assert siblings(export) == [".x.work"]  # the checkpoints stay for --resume


def test_python_api_interrupt_is_a_keyboard_interrupt(tiny_llama_copy, byte_tokenizer, tmp_path):
    from compress.pipeline import RunInterrupted

    class Stop:
        def track(self, items, description, total=None):
            raise KeyboardInterrupt

        def log(self, message):
            pass

    pipeline = Pipeline(
        tiny_llama_copy,
        [RTNConfig(bits=4, group_size=32)],
        tokenizer=byte_tokenizer,
        export=tmp_path / "out",
        progress=Stop(),
    )
    with pytest.raises(KeyboardInterrupt) as info:
        pipeline.run()
    assert isinstance(info.value, RunInterrupted) and info.value.exit_code == 130
    assert "no export was written" in info.value.describe()
    assert list(tmp_path.iterdir()) == []


# --- leftovers of killed runs, and two runs at once -----------------------------------------------


def test_a_later_run_removes_stale_temporary_folders_of_its_target(capsys, tmp_path, model_dir):
    export = tmp_path / "out" / "x"
    for stale in (".x.tmp-abcd1234", ".x.old-4242"):
        (export.parent / stale / "sub").mkdir(parents=True)
        (export.parent / stale / "sub" / "model.safetensors").write_bytes(b"\0" * 1000)
    other = export.parent / ".xy.tmp-abcd1234"  # another target's: not ours to remove
    other.mkdir()
    result = invoke(capsys, "apply", recipe_for(tmp_path, model_dir, export))
    assert result.code == 0, result.err
    assert siblings(export) == [".xy.tmp-abcd1234", "x"]
    assert "left behind by a killed run" in " ".join(result.err.split())


def test_a_second_run_into_the_same_target_fails_fast_naming_the_first(
    capsys, tmp_path, model_dir
) -> None:
    export = tmp_path / "out" / "x"
    export.parent.mkdir()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\n"
            "from compress.utils.fs import target_lock\n"
            "with target_lock(sys.argv[1]):\n"
            "    print('locked', flush=True)\n"
            "    time.sleep(60)\n",
            str(export),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        started = time.monotonic()
        result = invoke(capsys, "apply", recipe_for(tmp_path, model_dir, export))
        assert time.monotonic() - started < 30
    finally:
        holder.kill()
        holder.wait()
    assert result.code == 2
    assert f"{export}: another compress run (pid {holder.pid}) is writing" in result.err
    assert not export.exists()


def test_lock_is_released_and_removed(tmp_path: Path) -> None:
    from compress.utils.fs import lock_path, target_lock

    target = tmp_path / "a" / "b" / "export"
    with target_lock(target):
        assert json.loads(lock_path(target).read_text()) == os.getpid()
    assert not lock_path(target).exists()
    with pytest.raises(RuntimeError), target_lock(tmp_path / "c" / "export"):
        raise RuntimeError
    assert not (tmp_path / "c").exists()  # folders made for a failed run are removed again
