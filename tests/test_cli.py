"""The ``compress`` command line end to end through :func:`compress.cli.run`, on a tiny model.

Bad input must end in exit code 2 with a message naming the culprit (file and line, key, layer or
value) and a hint, and must leave nothing behind in the export's parent folder. The happy path
runs one real ``apply`` (tiny Llama saved as a local HF folder, a local evaluation text) and
checks what ``inspect`` and ``report`` make of the export. The real SmolLM2 is never used here.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from rich.console import Console

from compress import cli
from compress.cli import run
from compress.quant.gptq import GPTQConfig
from compress.quant.rtn import RTNConfig
from compress.registry import available_passes

RECIPES = sorted((Path(__file__).resolve().parent.parent / "recipes").glob("*.yaml"))
WIDTH = 400  # wide enough that rich never wraps a message or a table row

SENTENCES = [
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "A small model can still learn the shape of a language from a little text.",
    "Rain fell on the old town all night, and the streets were quiet by morning.",
    "She opened the window, looked at the hills, and decided to walk to the lake.",
    "Numbers such as 12, 345 and 6789 appear in reports, tables and letters.",
    "The committee met on Tuesday to discuss the budget for the coming year.",
    "Bread, cheese and apples were all the travellers had left for the journey.",
    "In the library, the students read about rivers, mountains and distant cities.",
]

# every registered pass, in the order the hint lists them
AVAILABLE = "available passes: " + ", ".join(sorted(available_passes()))


@dataclass
class Result:
    code: int
    out: str
    err: str


def wide_consoles() -> tuple[Console, Console]:
    """What ``cli.console`` (stderr) and ``cli.out`` (stdout) are replaced with: no wrapping."""
    return (
        Console(stderr=True, width=WIDTH, color_system=None, force_terminal=False),
        Console(width=WIDTH, color_system=None, force_terminal=False),
    )


@pytest.fixture(autouse=True)
def _wide_output(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", str(WIDTH))
    console, out = wide_consoles()
    monkeypatch.setattr(cli, "console", console)
    monkeypatch.setattr(cli, "out", out)


def invoke(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> Result:
    capsys.readouterr()  # drop whatever earlier steps of the test printed
    code = run([str(arg) for arg in argv])
    captured = capsys.readouterr()
    return Result(code, captured.out, captured.err)


def assert_nothing_left(parent: Path) -> None:
    """No export folder, no ``.<name>.tmp-*`` folder: the parent is absent or empty."""
    leftovers = sorted(p.name for p in parent.iterdir()) if parent.exists() else []
    assert leftovers == []


def apply_failing(
    capsys, tmp_path: Path, model: Path, eval_text: Path, passes: str, *args: str
) -> tuple[Result, Path]:
    """``apply`` on a recipe that must fail: exit code 2 and nothing left in the export parent."""
    parent = tmp_path / "exports"
    text = recipe_text(model, eval_text, parent / "out", pass_lines=passes)
    recipe = write_recipe(tmp_path, text)
    result = invoke(capsys, "apply", recipe, *args)
    assert result.code == 2
    assert_nothing_left(parent)
    return result, recipe


def row_cells(text: str, label: str) -> list[str]:
    """The cells of the rich table row whose first cell is ``label``."""
    for line in text.splitlines():
        cells = [cell.strip() for cell in re.split(r"[│|]", line)[1:-1]]
        if cells and cells[0] == label:
            return cells
    raise AssertionError(f"no table row {label!r} in:\n{text}")


def quoted(path: Path) -> str:
    """A path as a YAML scalar (JSON strings are valid YAML)."""
    return json.dumps(str(path))


# --- fixtures: a tiny local model, an evaluation text, one finished export ------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory, tiny_llama, byte_tokenizer) -> Path:
    """tiny_llama (vocab 256) with the byte tokenizer (256 tokens), as a local HF folder."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama.save_pretrained(folder)
    byte_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def eval_text(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """About 6 KB of English-ish text, one paragraph a line (the .txt dataset format)."""
    lines = [
        " ".join(SENTENCES[(start + k) % len(SENTENCES)] for k in range(5))
        for start in range(2 * len(SENTENCES))
    ]
    path = tmp_path_factory.mktemp("data") / "eval.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def recipe_text(
    model: Path | str,
    eval_file: Path,
    export_dir: Path | None,
    *,
    pass_lines: str = "  - {pass: rtn, bits: 4, group_size: 32, symmetric: true}\n",
    evaluate: bool = True,
) -> str:
    """A recipe for the tiny model; line 1 is ``model:``, line 3 the first pass."""
    text = f"model: {quoted(Path(model)) if isinstance(model, Path) else model}\n"
    text += "passes:\n" + pass_lines
    if export_dir is not None:
        text += f"export: {{dir: {quoted(export_dir)}}}\n"
    if evaluate:
        text += f"evaluate: {{perplexity: [{quoted(eval_file)}], seq_len: 32, max_windows: 4}}\n"
    return text


def write_recipe(folder: Path, text: str, name: str = "recipe.yaml") -> Path:
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


@dataclass
class Exported:
    """One successful ``compress apply`` (rtn int4 g32, export + evaluate) and its output."""

    recipe: Path
    eval_text: Path
    directory: Path
    result: Result


@pytest.fixture(scope="module")
def exported(
    tmp_path_factory: pytest.TempPathFactory, model_dir: Path, eval_text: Path
) -> Exported:
    folder = tmp_path_factory.mktemp("happy")
    directory = folder / "exports" / "tiny-w4g32"
    recipe = write_recipe(folder, recipe_text(model_dir, eval_text, directory))
    stdout, stderr = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as patch:
        console, out = wide_consoles()
        patch.setattr(cli, "console", console)
        patch.setattr(cli, "out", out)
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            code = run(["apply", str(recipe)])
    result = Result(code, stdout.getvalue(), stderr.getvalue())
    assert code == 0, result.err
    return Exported(recipe, eval_text, directory, result)


@pytest.fixture
def export_copy(exported: Exported, tmp_path: Path) -> Path:
    """A private copy of the finished export that a test may damage."""
    return Path(shutil.copytree(exported.directory, tmp_path / "copy" / "tiny-w4g32"))


# --- recipe errors: exit 2, culprit and hint, nothing written -------------------------------------


def test_unknown_pass_names_it_and_lists_the_available_ones(
    capsys, tmp_path, model_dir, eval_text
) -> None:
    passes = "  - {pass: gtpq, bits: 4}\n"
    result, recipe = apply_failing(capsys, tmp_path, model_dir, eval_text, passes)
    assert f"{recipe}:3: passes[0].pass: unknown pass 'gtpq'" in result.err
    assert "hint:" in result.err and AVAILABLE in result.err


def test_unknown_pass_key_suggests_the_nearest(capsys, tmp_path, model_dir, eval_text) -> None:
    passes = "  - pass: rtn\n    bits: 4\n    grup_size: 32\n"
    result, recipe = apply_failing(capsys, tmp_path, model_dir, eval_text, passes)
    assert f"{recipe}:5" in result.err
    assert "unknown key 'grup_size'" in result.err
    assert "did you mean 'group_size'?" in result.err


def test_wrong_type_names_key_and_value(capsys, tmp_path, model_dir, eval_text) -> None:
    passes = "  - pass: rtn\n    bits: four\n    group_size: 32\n"
    result, recipe = apply_failing(capsys, tmp_path, model_dir, eval_text, passes)
    assert f"{recipe}:4: passes[0].bits: 'four' is not valid" in result.err
    assert "integer" in result.err
    assert "hint: bits: code width in bits (2..8)" in result.err


def test_group_size_not_dividing_a_layer_names_the_layer(
    capsys, tmp_path, model_dir, eval_text
) -> None:
    passes = "  - {pass: rtn, bits: 4, group_size: 48}\n"
    result, _ = apply_failing(capsys, tmp_path, model_dir, eval_text, passes)
    assert "layer model.layers.0.self_attn.q_proj" in result.err
    assert "group_size 48 does not divide the input dimension 64" in result.err
    assert "hint: use a divisor of 64" in result.err


def test_missing_model_names_the_path(capsys, tmp_path, eval_text) -> None:
    missing = tmp_path / "no-such-model"
    passes = "  - {pass: rtn, bits: 4, group_size: 32}\n"
    result, _ = apply_failing(capsys, tmp_path, missing, eval_text, passes)
    assert str(missing) in result.err and "does not exist" in result.err
    assert "hint:" in result.err and "smollm2-135m" in result.err


def test_strict_fails_on_a_skipped_module(capsys, tmp_path, model_dir, eval_text) -> None:
    passes = "  - {pass: rtn, bits: 4, group_size: 32, ignore: ['*.mlp.down_proj']}\n"
    result, _ = apply_failing(capsys, tmp_path, model_dir, eval_text, passes, "--strict")
    assert "pass 'rtn' skipped 2 module(s)" in result.err
    assert "model.layers.0.mlp.down_proj: matched an ignore pattern" in result.err
    assert "hint:" in result.err and "--strict" in result.err


def test_without_strict_skipped_modules_are_reported(
    capsys, tmp_path, model_dir, eval_text
) -> None:
    directory = tmp_path / "exports" / "out"
    passes = "  - {pass: rtn, bits: 4, group_size: 32, ignore: ['*.mlp.down_proj']}\n"
    text = recipe_text(model_dir, eval_text, directory, pass_lines=passes, evaluate=False)
    result = invoke(capsys, "apply", write_recipe(tmp_path, text))
    assert result.code == 0, result.err
    report = json.loads((directory / "report.json").read_text())
    assert sorted(report["passes"][0]["skipped"]) == [
        "model.layers.0.mlp.down_proj",
        "model.layers.1.mlp.down_proj",
    ]


# --- recipes validate / list ----------------------------------------------------------------------


def test_recipes_validate_accepts_every_shipped_recipe(capsys) -> None:
    assert RECIPES
    result = invoke(capsys, "recipes", "validate", *RECIPES)
    assert result.code == 0, result.err
    for path in RECIPES:
        expected = ", ".join(step["pass"] for step in yaml.safe_load(path.read_text())["passes"])
        assert f"ok {path}: passes {expected}" in result.out


def test_recipes_validate_rejects_a_bad_recipe_with_its_line(capsys, tmp_path) -> None:
    bad = write_recipe(
        tmp_path, "model: smollm2-135m\npasses:\n  - {pass: rtn, bits: 9}\n", "bad.yaml"
    )
    result = invoke(capsys, "recipes", "validate", RECIPES[0], bad)
    assert result.code == 2
    assert f"ok {RECIPES[0]}" in result.out
    assert f"{bad}:3: passes[0].bits: 9 is not valid" in result.err
    assert "hint: bits: code width in bits (2..8)" in result.err


def test_recipes_list_shows_rtn_and_its_options(capsys) -> None:
    result = invoke(capsys, "recipes", "list")
    assert result.code == 0, result.err
    _, options, summary = row_cells(result.out, "rtn")
    assert options == ", ".join(RTNConfig.model_fields)  # every option, in declaration order
    # the format's keys (shared with awq) first, then rtn's own
    assert options.startswith(
        "bits, group_size, symmetric, scale_dtype, format, scaling, scale_block, observer"
    )
    _, gptq_options, _ = row_cells(result.out, "gptq")
    assert gptq_options == ", ".join(GPTQConfig.model_fields)
    assert gptq_options.endswith("damp, act_order, batch_size, scale_refits")
    assert summary.startswith("Round-to-nearest")


# --- fetch ----------------------------------------------------------------------------------------


def test_fetch_unknown_model_lists_the_builtins(capsys, hub_offline) -> None:
    result = invoke(capsys, "fetch", "nonexistent-model")
    assert result.code == 2
    assert "'nonexistent-model' is not a builtin model" in result.err
    assert "hint:" in result.err and "smollm2-135m" in result.err


# --- the happy path -------------------------------------------------------------------------------


def test_apply_prints_the_summary_table(exported: Exported) -> None:
    out = exported.result.out
    assert f"compress apply {exported.recipe}" in out
    label = f"({exported.eval_text})"
    _, before, after = row_cells(out, f"perplexity {label}")
    assert 1 < float(before) < 1000 and 1 < float(after) < 1000
    _, before, after = row_cells(out, f"KL vs original, nats/token {label}")
    assert float(before) == 0 and float(after) >= 0
    assert row_cells(out, f"top-1 agreement {label}")[1] == "100.0%"
    assert row_cells(out, "bits/weight, quantized layers") == [
        "bits/weight, quantized layers",
        "32.000",
        "4.500",
    ]
    assert row_cells(out, "bits/weight, whole model")[1] == "32.000"
    # measured by default, each model in a process of its own
    _, before, after = row_cells(out, "decode tokens/s")
    assert float(before) > 0 and float(after) > 0
    _, before, after = row_cells(out, "peak memory")
    assert before.endswith("MB") and after.endswith("MB")
    assert f"export: {exported.directory}" in out


def test_apply_writes_a_complete_export(exported: Exported) -> None:
    directory = exported.directory
    for name in ("report.json", "report.md", "compress_manifest.json", "model.safetensors"):
        assert (directory / name).is_file(), name
    config = json.loads((directory / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "compress"
    report = json.loads((directory / "report.json").read_text())
    assert list(report["quality"]) == [str(exported.eval_text)]
    quality = report["quality"][str(exported.eval_text)]
    assert quality["windows"] == 4 and quality["seq_len"] == 32
    assert quality["kl_mean"] >= 0
    assert report["size"]["quantized_bits_per_weight"] == pytest.approx(4.5)
    assert [p.name for p in directory.parent.iterdir()] == [directory.name]  # no temp folders


def test_inspect_shows_formats_and_bits(capsys, exported: Exported) -> None:
    result = invoke(capsys, "inspect", exported.directory)
    assert result.code == 0, result.err
    fmt, modules, params, _, bits, nominal = row_cells(result.out, "int4 g32 sym")
    assert (fmt, modules, params) == ("int4 g32 sym", "14", "73,728")  # 7 Linears x 2 blocks
    assert (bits, nominal) == ("4.500", "4.500")
    assert "4.500 in quantized layers" in result.out
    assert "recipe:" in result.out and '"group_size": 32' in result.out


def test_inspect_json_is_parseable(capsys, exported: Exported) -> None:
    result = invoke(capsys, "inspect", exported.directory, "--json")
    assert result.code == 0, result.err
    summary = json.loads(result.out)
    assert summary["quantized_bits_per_weight"] == pytest.approx(4.5)
    assert summary["per_format"]["int4 g32 sym"]["modules"] == 14
    assert summary["recipe"]["passes"][0]["group_size"] == 32


def test_report_prints_the_markdown(capsys, exported: Exported) -> None:
    result = invoke(capsys, "report", exported.directory)
    assert result.code == 0, result.err
    markdown = (exported.directory / "report.md").read_text(encoding="utf-8")
    assert result.out.rstrip("\n") == markdown.rstrip("\n")
    assert result.out.startswith("# compress report")
    assert "## Summary" in result.out


def test_apply_refuses_an_existing_export(capsys, exported: Exported) -> None:
    directory = exported.directory
    manifest = (directory / "compress_manifest.json").read_bytes()
    result = invoke(capsys, "apply", exported.recipe, "--no-evaluate")
    assert result.code == 2
    assert f"{directory}: export folder already exists" in result.err
    assert "hint:" in result.err and "--overwrite" in result.err
    assert (directory / "compress_manifest.json").read_bytes() == manifest
    assert [p.name for p in directory.parent.iterdir()] == [directory.name]


def test_apply_overwrite_replaces_the_export(capsys, tmp_path, model_dir, eval_text) -> None:
    directory = tmp_path / "exports" / "out"
    recipe = write_recipe(tmp_path, recipe_text(model_dir, eval_text, directory, evaluate=False))
    assert invoke(capsys, "apply", recipe).code == 0
    (directory / "stale.txt").write_text("from the first run")
    result = invoke(capsys, "apply", recipe, "--overwrite")
    assert result.code == 0, result.err
    assert not (directory / "stale.txt").exists()
    assert (directory / "compress_manifest.json").is_file()
    assert [p.name for p in directory.parent.iterdir()] == ["out"]


def test_apply_export_dir_option_overrides_the_recipe(
    capsys, tmp_path, model_dir, eval_text
) -> None:
    in_recipe = tmp_path / "exports" / "from-recipe"
    override = tmp_path / "elsewhere" / "from-option"
    recipe = write_recipe(tmp_path, recipe_text(model_dir, eval_text, in_recipe, evaluate=False))
    result = invoke(capsys, "apply", recipe, "--export-dir", override)
    assert result.code == 0, result.err
    assert (override / "compress_manifest.json").is_file()
    assert not in_recipe.parent.exists()
    assert f"export: {override}" in result.out


# --- damaged or wrong folders ---------------------------------------------------------------------


def test_inspect_truncated_safetensors(capsys, export_copy: Path) -> None:
    shard = export_copy / "model.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    before = sorted(p.name for p in export_copy.parent.iterdir())
    result = invoke(capsys, "inspect", export_copy)
    assert result.code == 2
    assert f"{shard}: size" in result.err and "truncated" in result.err
    assert "hint:" in result.err
    assert sorted(p.name for p in export_copy.parent.iterdir()) == before


def test_inspect_checksum_mismatch(capsys, export_copy: Path) -> None:
    path = export_copy / "compress_manifest.json"
    manifest = json.loads(path.read_text())
    digest = manifest["files"]["model.safetensors"]["sha256"]
    flipped = ("1" if digest[0] == "0" else "0") + digest[1:]
    manifest["files"]["model.safetensors"]["sha256"] = flipped
    path.write_text(json.dumps(manifest, indent=2))
    result = invoke(capsys, "inspect", export_copy)
    assert result.code == 2
    assert f"{export_copy / 'model.safetensors'}: checksum mismatch" in result.err
    assert flipped[:12] in result.err
    assert "hint:" in result.err


def test_inspect_a_folder_that_is_not_an_export(capsys, tmp_path, model_dir) -> None:
    result = invoke(capsys, "inspect", model_dir)
    assert result.code == 2
    assert f"{model_dir}: not a compress export (compress_manifest.json is missing)" in result.err
    assert "hint:" in result.err


def test_inspect_a_missing_folder(capsys, tmp_path) -> None:
    missing = tmp_path / "nowhere"
    result = invoke(capsys, "inspect", missing)
    assert result.code == 2
    assert f"{missing}: no such folder" in result.err
    assert not missing.exists()


def test_report_on_a_folder_without_a_report(capsys, export_copy: Path) -> None:
    (export_copy / "report.json").unlink()
    result = invoke(capsys, "report", export_copy)
    assert result.code == 2
    assert f"no report in {export_copy}" in result.err and "report.json is missing" in result.err
    assert "hint:" in result.err


# --- regressions found in review ---------------------------------------------------------------


def test_error_message_keeps_brackets_in_a_path(capsys, tmp_path) -> None:
    missing = tmp_path / "[draft]" / "export"
    result = invoke(capsys, "inspect", missing)
    assert result.code == 2
    assert f"{missing}: no such folder" in result.err


def test_error_message_with_a_closing_tag_exits_2(capsys, tmp_path) -> None:
    bad = write_recipe(tmp_path, 'model: smollm2-135m\npasses:\n  - {pass: "[/x]"}\n')
    result = invoke(capsys, "recipes", "validate", bad)
    assert result.code == 2
    assert f"{bad}:3: passes[0].pass: unknown pass '[/x]'" in result.err


def test_overwrite_without_an_export_section_touches_nothing(
    capsys, tmp_path, monkeypatch, model_dir, eval_text
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("not an export")
    recipe = write_recipe(tmp_path, recipe_text(model_dir, eval_text, None, evaluate=False))
    result = invoke(capsys, "apply", recipe, "--overwrite")
    assert result.code == 2
    assert "--overwrite given but the recipe has no export section" in result.err
    assert (tmp_path / "out" / "keep.txt").read_text() == "not an export"


def test_inspect_no_verify_truncated_safetensors_exits_2(capsys, export_copy: Path) -> None:
    shard = export_copy / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[:1000])
    result = invoke(capsys, "inspect", export_copy, "--no-verify")
    assert result.code == 2
    assert str(shard) in result.err


# --- eval and report (issue 5) -------------------------------------------------------------------


def test_eval_missing_folder_exits_2(capsys, tmp_path) -> None:
    result = invoke(capsys, "eval", tmp_path / "missing", "--tasks", "offline_wiki_ppl")
    assert result.code == 2
    assert "missing: no such folder" in result.err


def test_eval_folder_that_is_not_an_export_exits_2(capsys, tmp_path) -> None:
    result = invoke(capsys, "eval", tmp_path, "--tasks", "offline_wiki_ppl")
    assert result.code == 2
    assert "neither a compress export" in result.err


def test_eval_unknown_task_exits_2(capsys, exported: Exported) -> None:
    result = invoke(capsys, "eval", exported.directory, "--tasks", "no_such_task_xyz")
    assert result.code == 2
    assert "unknown lm-eval task 'no_such_task_xyz'" in result.err


def test_report_of_several_runs_writes_html(capsys, exported: Exported, tmp_path) -> None:
    result = invoke(capsys, "report", exported.directory, exported.directory, "-o", tmp_path)
    assert result.code == 0, result.err
    page = (tmp_path / "report.html").read_text()
    assert page.count("data:image/png;base64,") >= 2 and "tiny-w4g32-2" in page


def test_report_of_a_missing_run_exits_2(capsys, exported: Exported, tmp_path) -> None:
    result = invoke(capsys, "report", exported.directory, tmp_path / "nope")
    assert result.code == 2
    assert "no such report folder" in result.err


def test_progress_bar_does_not_hold_the_previous_item() -> None:
    """A streamed export drops each tensor once written; the bar must not keep it alive while
    the producer makes the next one (offloaded exports budget for one tensor at a time)."""
    import gc
    import weakref

    from compress.cli import RichProgress

    class Item:
        pass

    alive_when_next_made = []
    previous: list[weakref.ref] = []

    def produce():
        for _ in range(3):
            gc.collect()
            alive_when_next_made.append(any(ref() is not None for ref in previous))
            item = Item()
            previous.append(weakref.ref(item))
            yield item
            del item

    with RichProgress() as progress:
        for item in progress.track(produce(), "items", total=3):
            del item
    assert alive_when_next_made == [False, False, False]


# --- usage errors, version, interrupts (issue 13) -------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["aply"], "Error: No such command 'aply'. Did you mean 'apply'?"),
        (["apply"], "Error: Missing argument 'recipe'."),
        (["apply", "r.yaml", "--bogus"], "Error: No such option: --bogus"),
        (["inspect"], "Error: Missing argument 'directory'."),
        (["recipes", "valdate"], "Error: No such command 'valdate'."),
    ],
    ids=["unknown-command", "missing-argument", "unknown-option", "inspect-no-dir", "subcommand"],
)
def test_usage_errors_exit_2_with_clicks_message(capsys, argv, message) -> None:
    result = invoke(capsys, *argv)
    assert result.code == 2
    assert "Usage: compress" in result.err and "Try 'compress" in result.err
    assert message in result.err
    assert "Traceback" not in result.err


def test_bare_compress_prints_help(capsys) -> None:
    result = invoke(capsys)
    assert result.code == 2  # click's code for a command line that names no command
    shown = result.out + result.err  # typer's rich help goes to stdout
    assert "Usage: compress" in shown and "Traceback" not in shown
    for command in ("apply", "inspect", "report", "recipes"):
        assert command in shown


def test_version(capsys) -> None:
    from compress import __version__

    result = invoke(capsys, "--version")
    assert result.code == 0, result.err
    assert result.out.strip() == f"compress {__version__}"


def test_ctrl_c_in_a_command_exits_130(capsys, monkeypatch) -> None:
    import compress.recipe

    def interrupted(path):
        raise KeyboardInterrupt

    monkeypatch.setattr(compress.recipe, "load_recipe", interrupted)
    result = invoke(capsys, "recipes", "validate", RECIPES[0])
    assert result.code == 130
    assert "interrupted" in result.err


# --- report and inspect verify the export (issue 13) ----------------------------------------------


def _rewrite(export: Path, name: str, data: bytes) -> None:
    """Replace a file of an export and record it in the manifest: only deeper checks see it."""
    import hashlib

    (export / name).write_bytes(data)
    path = export / "compress_manifest.json"
    manifest = json.loads(path.read_text())
    manifest["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    path.write_text(json.dumps(manifest, indent=2))


def test_report_on_a_corrupted_export_exits_2(capsys, export_copy: Path) -> None:
    shard = export_copy / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    result = invoke(capsys, "report", export_copy)
    assert result.code == 2
    assert f"{shard}: size" in result.err and "truncated" in result.err
    assert result.out == ""
    assert invoke(capsys, "report", export_copy, "--no-verify").code == 0


def test_report_with_output_writes_nothing_into_the_export(
    capsys, export_copy: Path, tmp_path
) -> None:
    before = sorted(p.name for p in export_copy.iterdir())
    result = invoke(capsys, "report", export_copy, "-o", tmp_path / "elsewhere")
    assert result.code == 0, result.err
    assert (tmp_path / "elsewhere" / "report.html").is_file()
    assert sorted(p.name for p in export_copy.iterdir()) == before


def test_report_output_that_cannot_be_written_exits_2(capsys, export_copy, tmp_path) -> None:
    blocker = tmp_path / "afile"
    blocker.write_text("")
    result = invoke(capsys, "report", export_copy, "-o", blocker / "out")
    assert result.code == 2
    assert str(blocker) in result.err and "hint:" in result.err


def test_report_of_an_export_it_cannot_write_into_still_prints(
    capsys, export_copy: Path, monkeypatch
) -> None:
    import compress.evaluate.html

    def read_only(run_dirs, output):
        raise PermissionError(errno.EROFS, "Read-only file system", str(output / "report.html"))

    monkeypatch.setattr(compress.evaluate.html, "write_comparison", read_only)
    result = invoke(capsys, "report", export_copy)
    assert result.code == 0, result.err
    assert result.out.startswith("# compress report")
    assert "report.html not written" in result.err and "Read-only file system" in result.err
    assert "-o DIR" in result.err


def test_inspect_checks_tensor_shapes(capsys, export_copy: Path) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(export_copy / "model.safetensors")
    key = "model.layers.0.self_attn.q_proj.scales"
    tensors[key] = tensors[key][:, :1].contiguous()
    save_file(tensors, export_copy / "model.safetensors", metadata={"format": "pt"})
    _rewrite(export_copy, "model.safetensors", (export_copy / "model.safetensors").read_bytes())
    result = invoke(capsys, "inspect", export_copy)
    assert result.code == 2
    assert f"tensor {key} is (64, 1) F16, but int4 g32 sym of a 64x64 weight stores" in result.err
    assert "(64, 2) F16" in result.err and "hint:" in result.err


def test_inspect_checks_the_config_format_version(capsys, export_copy: Path) -> None:
    config = json.loads((export_copy / "config.json").read_text())
    config["quantization_config"]["format_version"] = 99
    _rewrite(export_copy, "config.json", json.dumps(config).encode())
    result = invoke(capsys, "inspect", export_copy)
    assert result.code == 2
    assert "quantization_config format_version 99" in result.err
    assert "hint: upgrade compress" in result.err


def test_inspect_an_unknown_module_format_exits_2(capsys, export_copy: Path) -> None:
    path = export_copy / "compress_manifest.json"
    manifest = json.loads(path.read_text())
    name = next(iter(manifest["modules"]))
    manifest["modules"][name]["format"]["codebook"] = "nf4"
    path.write_text(json.dumps(manifest))
    result = invoke(capsys, "inspect", export_copy)
    assert result.code == 2
    assert f"module {name!r}: unreadable entry" in result.err and "codebook" in result.err


def test_inspect_a_file_says_it_is_a_file(capsys, exported: Exported) -> None:
    shard = exported.directory / "model.safetensors"
    result = invoke(capsys, "inspect", shard)
    assert result.code == 2
    assert f"{shard}: is a file, not an export folder" in result.err
    assert f"hint: pass its folder: {exported.directory}" in result.err


# --- progress bars (issue 13, section 4) ----------------------------------------------------------


def test_a_bar_of_unknown_length_ends_at_its_count_and_stops_its_clock() -> None:
    from compress.cli import RichProgress

    with RichProgress() as progress:
        assert list(progress.track(iter(range(5)), "items")) == list(range(5))
        (task,) = progress._bar.tasks
        assert (task.total, task.completed, task.finished) == (5, 5, True)
        assert task.stop_time is not None  # elapsed no longer grows


def test_sigterm_in_a_command_exits_143(capsys, monkeypatch) -> None:
    import os
    import signal

    import compress.recipe

    def terminated(path):
        os.kill(os.getpid(), signal.SIGTERM)  # the handler raises here, as in a real run
        raise AssertionError("SIGTERM did not interrupt")

    monkeypatch.setattr(compress.recipe, "load_recipe", terminated)
    result = invoke(capsys, "recipes", "validate", RECIPES[0])
    assert result.code == 143
    assert "interrupted (SIGTERM)" in result.err
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # restored after the run
