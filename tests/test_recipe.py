"""Recipe schema: the shipped recipes load and round-trip; every bad recipe gets a located error."""

from __future__ import annotations

from pathlib import Path

import pytest

from compress.errors import RecipeError
from compress.quant.rtn import RTNConfig
from compress.recipe import (
    CalibrationSpec,
    EvaluateSpec,
    ExportSpec,
    ModelSpec,
    Recipe,
    load_recipe,
    parse_recipe,
    recipe_to_yaml,
    yaml_with_lines,
)
from compress.registry import available_passes

RECIPES = sorted((Path(__file__).resolve().parent.parent / "recipes").glob("*.yaml"))

# every registered pass, in the order the hint lists them
AVAILABLE = "available passes: " + ", ".join(sorted(available_passes()))


def write(tmp_path: Path, text: str, name: str = "bad.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def error_of(path: Path) -> RecipeError:
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    return info.value


# --- the shipped recipes ------------------------------------------------------------------------


def test_recipes_folder_is_not_empty() -> None:
    names = {path.name for path in RECIPES}
    assert {"quickstart.yaml", "smollm2-w8-rtn.yaml", "smollm2-w3-rtn.yaml"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_shipped_recipe_loads_and_round_trips(path: Path, tmp_path: Path) -> None:
    recipe = load_recipe(path)
    assert recipe.passes, "a shipped recipe should do something"
    assert recipe.export is not None and str(recipe.export.dir).startswith("out/")
    again = load_recipe(write(tmp_path, recipe_to_yaml(recipe), "resolved.yaml"))
    assert again == recipe
    assert again.resolved() == recipe.resolved()


def test_shipped_recipes_export_to_distinct_folders() -> None:
    dirs = [load_recipe(path).export.dir for path in RECIPES]  # type: ignore[union-attr]
    assert len(set(dirs)) == len(dirs)


def test_quickstart_settings() -> None:
    recipe = load_recipe(next(p for p in RECIPES if p.name == "quickstart.yaml"))
    assert recipe.pass_names() == ["gptq", "rtn"]
    gptq, embeddings = recipe.passes
    assert (gptq.bits, gptq.group_size, gptq.symmetric) == (4, 64, False)  # type: ignore[attr-defined]
    assert embeddings == RTNConfig(
        bits=8, group_size=None, targets=["model.embed_tokens", "lm_head"]
    )
    assert recipe.calibration.samples == 48
    assert recipe.evaluate is not None and recipe.evaluate.kl and recipe.evaluate.speed
    assert recipe.evaluate.max_windows is not None and recipe.evaluate.max_windows <= 32


# --- schema ------------------------------------------------------------------------------------


def test_model_string_and_mapping_forms_are_equal() -> None:
    short = parse_recipe({"model": "smollm2-135m", "passes": []})
    long = parse_recipe({"model": {"name": "smollm2-135m"}, "passes": []})
    assert short == long
    assert short.model == ModelSpec(name="smollm2-135m", dtype="auto", trust_remote_code=False)


def test_model_mapping_keeps_its_settings() -> None:
    recipe = parse_recipe(
        {"model": {"name": "m", "dtype": "bfloat16", "trust_remote_code": True}, "passes": []}
    )
    assert recipe.model.dtype == "bfloat16" and recipe.model.trust_remote_code


def test_resolved_fills_in_every_default() -> None:
    recipe = parse_recipe(
        {"model": "smollm2-135m", "passes": [{"pass": "rtn"}], "export": {"dir": "out/x"}}
    )
    resolved = recipe.resolved()
    assert resolved["model"] == {
        "name": "smollm2-135m",
        "dtype": "auto",
        "trust_remote_code": False,
        "offload": False,
    }
    assert resolved["calibration"] == {
        "dataset": "builtin:wiki",
        "samples": 128,
        "seq_len": 512,
        "seed": 0,
    }
    assert resolved["passes"] == [
        {"pass": "rtn", **RTNConfig().model_dump(mode="json")},
    ]
    assert resolved["passes"][0]["bits"] == 4
    assert resolved["export"] == {
        "dir": "out/x",
        "format": "compress",
        "overwrite": False,
        "sparse": True,
    }
    assert resolved["evaluate"] is None


def test_evaluate_defaults() -> None:
    recipe = parse_recipe({"model": "m", "passes": [], "evaluate": {}})
    assert recipe.evaluate == EvaluateSpec(
        perplexity=["builtin:wiki"], seq_len=512, max_windows=32, kl=True, batch_size=4
    )
    assert recipe.calibration == CalibrationSpec()
    assert parse_recipe({"model": "m", "passes": [], "evaluate": None}).evaluate is None
    assert recipe.evaluate is not None and recipe.evaluate.lm_eval is None


def test_evaluate_lm_eval_block() -> None:
    evaluate = {"lm_eval": {"tasks": "offline, offline_wiki_ppl", "limit": 200}}
    recipe = parse_recipe({"model": "m", "passes": [], "evaluate": evaluate})
    assert recipe.evaluate is not None and recipe.evaluate.lm_eval is not None
    assert recipe.evaluate.lm_eval.tasks == ["offline", "offline_wiki_ppl"]
    assert (recipe.evaluate.lm_eval.limit, recipe.evaluate.lm_eval.batch_size) == (200, 8)
    assert recipe.resolved()["evaluate"]["lm_eval"]["num_fewshot"] is None


@pytest.mark.parametrize(
    ("block", "message", "hint"),
    [
        ("{tasks: []}", "evaluate.lm_eval.tasks: [] is not valid", "lm-eval task names"),
        ("{tasks: [offline], limit: 0}", "evaluate.lm_eval.limit: 0 is not valid", "items"),
        ("{tasks: [offline], num_fewshot: -1}", "evaluate.lm_eval.num_fewshot: -1", "few-shot"),
        ("{tasks: [offline], batchsize: 4}", "unknown key 'batchsize'", "'batch_size'?"),
        ("{limit: 10}", "evaluate.lm_eval.tasks: missing", "add 'tasks:'"),
    ],
)
def test_evaluate_lm_eval_errors_name_the_key(
    tmp_path: Path, block: str, message: str, hint: str
) -> None:
    error = error_of(write(tmp_path, f"model: m\npasses: []\nevaluate:\n  lm_eval: {block}\n"))
    assert message in error.message and error.message.startswith(f"{tmp_path / 'bad.yaml'}:4: ")
    assert error.hint is not None and hint in error.hint


def test_resolved_is_json_serialisable() -> None:
    import json

    recipe = parse_recipe(
        {"model": "m", "passes": [{"pass": "rtn"}], "export": {"dir": "out/x"}, "evaluate": {}}
    )
    assert json.loads(json.dumps(recipe.resolved())) == recipe.resolved()


def test_round_trip_keeps_null_group_size_and_skipped_sections(tmp_path: Path) -> None:
    recipe = parse_recipe({"model": "m", "passes": [{"pass": "rtn", "group_size": None}]})
    again = load_recipe(write(tmp_path, recipe_to_yaml(recipe), "r.yaml"))
    assert again == recipe
    assert again.passes[0] == RTNConfig(group_size=None)
    assert again.export is None and again.evaluate is None


def test_passes_hold_config_objects_in_order() -> None:
    recipe = parse_recipe(
        {"model": "m", "passes": [{"pass": "rtn", "bits": 8}, {"pass": "rtn", "bits": 3}]}
    )
    assert [type(c) for c in recipe.passes] == [RTNConfig, RTNConfig]
    assert [c.bits for c in recipe.passes] == [8, 3]  # type: ignore[attr-defined]
    assert recipe.pass_names() == ["rtn", "rtn"]


def test_python_api_accepts_config_objects_and_mappings() -> None:
    recipe = Recipe(
        model="m",  # type: ignore[arg-type]
        passes=[RTNConfig(bits=3), {"pass": "rtn", "bits": 8}],  # type: ignore[list-item]
        export=ExportSpec(dir=Path("out/y")),
    )
    assert recipe.pass_names() == ["rtn", "rtn"]
    assert recipe.passes[1] == RTNConfig(bits=8)


def test_recipe_is_frozen() -> None:
    recipe = parse_recipe({"model": "m", "passes": []})
    with pytest.raises(ValueError, match="frozen"):
        recipe.model = ModelSpec(name="other")


def test_line_map_points_at_keys() -> None:
    data, lines = yaml_with_lines("# c\nmodel: m\npasses:\n  - pass: rtn\n    bits: 4\n")
    assert data == {"model": "m", "passes": [{"pass": "rtn", "bits": 4}]}
    assert lines[("model",)] == 2
    assert lines[("passes", 0)] == 4
    assert lines[("passes", 0, "bits")] == 5


# --- errors ------------------------------------------------------------------------------------


def test_unknown_pass_key(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "model: smollm2-135m\npasses:\n  - pass: rtn\n    bits: 4\n    grup_size: 64\n",
    )
    error = error_of(path)
    assert error.message == f"{path}:5: passes[0]: unknown key 'grup_size' (value 64)"
    assert error.hint is not None
    assert error.hint.startswith("did you mean 'group_size'? valid keys of pass 'rtn': bits, ")
    assert "symmetric" in error.hint


def test_unknown_pass_name(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "model: smollm2-135m\npasses:\n  - {pass: rtn}\n  - {pass: rnt, bits: 4}\n",
    )
    error = error_of(path)
    assert error.message == f"{path}:4: passes[1].pass: unknown pass 'rnt'"
    assert error.hint is not None
    assert "did you mean 'rtn'?" in error.hint
    assert AVAILABLE in error.hint


def test_unknown_pass_name_without_close_match(tmp_path: Path) -> None:
    path = write(tmp_path, "model: m\npasses:\n  - {pass: gtpq}\n")
    error = error_of(path)
    assert error.message == f"{path}:3: passes[0].pass: unknown pass 'gtpq'"
    assert error.hint is not None and AVAILABLE in error.hint


def test_value_out_of_range(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "model: m\npasses:\n  - pass: rtn\n    group_size: 64\n\n    bits: 9\n",
    )
    error = error_of(path)
    assert error.message == (
        f"{path}:6: passes[0].bits: 9 is not valid: Input should be less than or equal to 8"
    )
    assert error.hint is not None and "2..8" in error.hint


def test_wrong_type(tmp_path: Path) -> None:
    path = write(tmp_path, "model: m\npasses:\n  - {pass: rtn, bits: four}\n")
    error = error_of(path)
    assert error.message.startswith(f"{path}:3: passes[0].bits: 'four' is not valid: ")
    assert "valid integer" in error.message
    assert error.hint is not None and "bits" in error.hint


def test_bad_choice_names_allowed_values(tmp_path: Path) -> None:
    path = write(tmp_path, "model:\n  name: m\n  dtype: bf16\npasses: []\n")
    error = error_of(path)
    assert error.message.startswith(f"{path}:3: model.dtype: 'bf16' is not valid")
    assert error.hint == (
        "did you mean 'bfloat16'? allowed values: auto, float32, bfloat16, float16"
    )


def test_section_value_out_of_range(tmp_path: Path) -> None:
    path = write(tmp_path, "model: m\npasses: []\ncalibration:\n  samples: 0\n")
    error = error_of(path)
    assert error.message == (
        f"{path}:4: calibration.samples: 0 is not valid: Input should be greater than 0"
    )


def test_unknown_top_level_key(tmp_path: Path) -> None:
    path = write(tmp_path, "model: m\npasses: []\nevaluat: {kl: true}\n")
    error = error_of(path)
    assert error.message == f"{path}:3: top level: unknown key 'evaluat' (value {{\"kl\": true}})"
    assert error.hint is not None
    assert error.hint.startswith("did you mean 'evaluate'? valid keys of top level: model, ")


def test_unknown_section_key(tmp_path: Path) -> None:
    path = write(tmp_path, "model: m\npasses: []\nexport:\n  dir: out/x\n  overwrit: true\n")
    error = error_of(path)
    assert error.message == f"{path}:5: export: unknown key 'overwrit' (value true)"
    assert (
        error.hint
        == "did you mean 'overwrite'? valid keys of export: dir, format, overwrite, sparse"
    )


def test_missing_model(tmp_path: Path) -> None:
    path = write(tmp_path, "# my recipe\n\npasses:\n  - {pass: rtn}\n")
    error = error_of(path)
    assert error.message == f"{path}:3: model: missing"
    assert error.hint is not None
    assert "'model:'" in error.hint and "required keys of top level: model, passes" in error.hint


def test_missing_key_in_section(tmp_path: Path) -> None:
    path = write(tmp_path, "model: m\npasses: []\nexport: {format: compress}\n")
    error = error_of(path)
    assert error.message == f"{path}:3: export.dir: missing"


def test_pass_entry_without_pass(tmp_path: Path) -> None:
    path = write(tmp_path, "model: m\npasses:\n  - {pas: rtn, bits: 4}\n")
    error = error_of(path)
    assert error.message == (
        f'{path}:3: passes[0]: missing key \'pass\' (value {{"pas": "rtn", "bits": 4}})'
    )
    assert error.hint is not None
    assert "did you mean 'pass' instead of 'pas'?" in error.hint
    assert AVAILABLE in error.hint


def test_pass_entry_not_a_mapping(tmp_path: Path) -> None:
    path = write(tmp_path, "model: m\npasses:\n  - rtn\n")
    error = error_of(path)
    assert (
        error.message
        == f"{path}:3: passes[0]: expected a mapping with key 'pass', got the string 'rtn'"
    )
    assert error.hint is not None and "{pass: rtn" in error.hint


def test_passes_not_a_list(tmp_path: Path) -> None:
    path = write(tmp_path, "model: m\npasses:\n")
    error = error_of(path)
    assert error.message.startswith(f"{path}:2: passes: null is not valid: expected a list")


def test_model_of_wrong_type(tmp_path: Path) -> None:
    path = write(tmp_path, "passes: []\nmodel: [a, b]\n")
    error = error_of(path)
    assert error.message.startswith(f'{path}:2: model: ["a", "b"] is not valid')
    assert error.hint is not None and "name, dtype, trust_remote_code" in error.hint


def test_top_level_not_a_mapping(tmp_path: Path) -> None:
    path = write(tmp_path, "- model: m\n- passes: []\n")
    error = error_of(path)
    assert error.message.startswith(f"{path}:1: top level: expected a mapping of recipe keys")
    assert "got a list" in error.message
    assert error.hint is not None and "model, calibration, passes, export, evaluate" in error.hint


@pytest.mark.parametrize("text", ["", "# nothing but a comment\n", "---\n"])
def test_empty_file(tmp_path: Path, text: str) -> None:
    path = write(tmp_path, text)
    error = error_of(path)
    assert error.message == f"{path}:1: recipe is empty"
    assert error.hint is not None and "model" in error.hint and "passes" in error.hint


def test_yaml_syntax_error_has_the_line(tmp_path: Path) -> None:
    path = write(tmp_path, "model: m\npasses:\n  - {pass: rtn, bits: 4\nexport: {dir: out/x}\n")
    error = error_of(path)
    assert error.message.startswith(f"{path}:4: invalid YAML: ")
    assert "line 3" in error.message  # where the unclosed flow mapping began
    assert error.hint is not None and "line 4" in error.hint


def test_yaml_tab_indentation(tmp_path: Path) -> None:
    path = write(tmp_path, "model: m\npasses:\n\t- {pass: rtn}\n")
    error = error_of(path)
    assert error.message.startswith(f"{path}:3: invalid YAML")
    assert error.hint is not None and "tabs" in error.hint


def test_two_documents(tmp_path: Path) -> None:
    path = write(tmp_path, "model: m\npasses: []\n---\nmodel: n\n")
    error = error_of(path)
    assert error.message.startswith(f"{path}:3: invalid YAML")
    assert error.hint is not None and "---" in error.hint


def test_duplicate_key_names_both_lines(tmp_path: Path) -> None:
    path = write(tmp_path, "model: m\npasses:\n  - pass: rtn\n    bits: 4\n    bits: 3\n")
    error = error_of(path)
    assert error.message == f"{path}:5: passes[0]: duplicate key 'bits' (lines 4 and 5)"


def test_duplicate_top_level_key(tmp_path: Path) -> None:
    path = write(tmp_path, "model: a\npasses: []\nmodel: b\n")
    error = error_of(path)
    assert error.message == f"{path}:3: top level: duplicate key 'model' (lines 1 and 3)"


def test_merge_key_override_is_not_a_duplicate(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "base: &w4 {pass: rtn, bits: 4, group_size: 64}\n"
        "model: m\n"
        "passes:\n"
        "  - {<<: *w4, bits: 3}\n",
    )
    # The merge itself is fine; the anchor's holder 'base' is the only unknown key.
    error = error_of(path)
    assert error.message.startswith(f"{path}:1: top level: unknown key 'base'")
    data, _ = yaml_with_lines(path.read_text())
    assert data["passes"][0] == {"pass": "rtn", "bits": 3, "group_size": 64}


def test_file_not_found_suggests_a_sibling(tmp_path: Path) -> None:
    write(tmp_path, "model: m\npasses: []\n", "quickstart.yaml")
    missing = tmp_path / "quikstart.yaml"
    error = error_of(missing)
    assert error.message == f"{missing}: file not found"
    assert error.hint is not None
    assert f"did you mean {str(tmp_path / 'quickstart.yaml')!r}?" in error.hint


def test_file_not_found_in_missing_folder(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "r.yaml"
    error = error_of(missing)
    assert error.message == f"{missing}: file not found"
    assert error.hint is not None and "no folder" in error.hint


def test_folder_instead_of_file(tmp_path: Path) -> None:
    write(tmp_path, "model: m\npasses: []\n", "a.yaml")
    error = error_of(tmp_path)
    assert "is a folder" in error.message
    assert error.hint is not None and "a.yaml" in error.hint


def test_first_error_in_full_and_the_count_of_the_rest(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "model: m\npasses:\n  - {pass: rtn, bits: 1}\n  - {pass: nope}\nevaluate: {kl: maybe}\n",
    )
    error = error_of(path)
    first, more = error.message.split("\n")
    assert first.startswith(f"{path}:3: passes[0].bits: 1 is not valid")
    assert more.strip() == (
        "2 more errors after this one: passes[1].pass (line 4), evaluate.kl (line 5)"
    )


def test_str_of_error_has_message_and_hint(tmp_path: Path) -> None:
    path = write(tmp_path, "model: m\npasses: [{pass: rtn, symetric: true}]\n")
    text = str(error_of(path))
    assert text.splitlines()[0] == f"{path}:2: passes[0]: unknown key 'symetric' (value true)"
    assert text.splitlines()[1].startswith("  hint: did you mean 'symmetric'?")


def test_parse_recipe_without_lines_names_the_source() -> None:
    with pytest.raises(RecipeError) as info:
        parse_recipe({"model": "m", "passes": [{"pass": "rtn", "bits": 9}]}, source="api")
    assert info.value.message == (
        "api: passes[0].bits: 9 is not valid: Input should be less than or equal to 8"
    )


def test_python_api_unknown_pass_raises_recipe_error() -> None:
    with pytest.raises(RecipeError, match="unknown pass 'gtpq'"):
        Recipe(model="m", passes=[{"pass": "gtpq"}])  # type: ignore[arg-type, list-item]


def test_export_dir_must_name_a_folder(tmp_path: Path) -> None:
    path = write(tmp_path, "model: m\npasses: []\nexport: {dir: .}\n")
    error = error_of(path)
    assert error.message.startswith(f"{path}:3: export.dir: '.' is not valid: must name a folder")


# --- refused before any model is loaded (issue 13) ----------------------------------------------


def test_yaml_alias_bomb_is_refused_at_once(tmp_path: Path) -> None:
    import time

    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 8)]
    path = write(tmp_path, "\n".join([*lines, "model: m", "passes: *a7"]) + "\n")
    started = time.monotonic()
    error = error_of(path)
    assert time.monotonic() - started < 2
    assert error.message == f"{path}: the document expands to more than 100,000 values " + (
        "(each use of an alias *name repeats the whole &name value)"
    )
    assert error.hint is not None and "aliases" in error.hint


def test_recursive_alias_is_refused(tmp_path: Path) -> None:
    error = error_of(write(tmp_path, "a: &a [*a]\nmodel: m\npasses: []\n"))
    assert "expands to more than" in error.message


def test_small_aliases_still_work(tmp_path: Path) -> None:
    text = "model: m\ncalibration: {samples: &n 64, seq_len: *n}\npasses: [{pass: rtn}]\n"
    assert load_recipe(write(tmp_path, text)).calibration.seq_len == 64


def test_yaml_tag_hint_is_about_tags(tmp_path: Path) -> None:
    path = write(tmp_path, "model: m\npasses:\n  - pass: rtn\n    bits: !int 4\n")
    error = error_of(path)
    assert error.message.startswith(f"{path}:4: invalid YAML: could not determine a constructor")
    assert error.hint is not None and "YAML tags" in error.hint
    assert "indentation" not in error.hint


@pytest.mark.parametrize(
    ("value", "detail"),
    [('"null"', "'null' is not valid"), ("'1e3'", "'1e3' is not valid")],
)
def test_quoted_number_says_the_quotes_make_text(tmp_path: Path, value: str, detail: str) -> None:
    path = write(
        tmp_path, f"model: m\npasses:\n  - {{pass: rtn}}\nevaluate: {{max_windows: {value}}}\n"
    )
    error = error_of(path)
    assert error.message.startswith(f"{path}:4: evaluate.max_windows: {detail}")
    assert error.hint is not None and "quotes make" in error.hint and "unquoted" in error.hint


def test_boolean_where_a_number_belongs(tmp_path: Path) -> None:
    path = write(tmp_path, "model: m\npasses:\n  - {pass: rtn, bits: 4, group_size: true}\n")
    error = error_of(path)
    assert error.message == (
        f"{path}:3: passes[0].group_size: true is not valid: expected a number, not a boolean"
    )
    calibration = write(
        tmp_path, "model: m\ncalibration: {samples: false}\npasses: [{pass: rtn}]\n"
    )
    assert "calibration.samples: false is not valid" in error_of(calibration).message


def test_number_where_text_belongs_says_quote_it(tmp_path: Path) -> None:
    error = error_of(write(tmp_path, "model: m\ncalibration: {dataset: 2024}\npasses: []\n"))
    assert error.hint == "dataset takes text; quote it: dataset: '2024'"


def test_empty_passes_are_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "model: m\n\npasses: []\n")
    error = error_of(path)
    assert error.message.startswith(f"{path}:3: passes: empty list: nothing to compress")
    assert error.hint is not None and "pass: rtn" in error.hint


def test_awq_after_rtn_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "model: m\npasses:\n  - {pass: rtn}\n  - {pass: awq}\n")
    error = error_of(path)
    assert error.message.startswith(f"{path}:4: passes[1].pass: awq comes after rtn (passes[0])")
    assert error.hint == "move awq before rtn, with the same bits and group_size"


@pytest.mark.parametrize(
    ("pass_line", "key", "reason"),
    [
        ("{pass: rtn, bits: 3, group_size: 64}", "bits", "3-bit codes"),
        ("{pass: gptq, bits: 4, group_size: 16}", "group_size", "group_size 16"),
        ("{pass: rtn, bits: 8, group_size: 64, symmetric: false}", "symmetric", "asymmetric"),
        ("{pass: entropy_code}", "pass", "entropy_code cannot be exported"),
    ],
)
def test_formats_the_compressed_tensors_export_cannot_hold(
    tmp_path: Path, pass_line: str, key: str, reason: str
) -> None:
    text = f"model: m\npasses:\n  - {pass_line}\nexport: {{dir: out, format: compressed-tensors}}\n"
    path = write(tmp_path, text)
    error = error_of(path)
    assert error.message.startswith(f"{path}:3: passes[0].{key}: ")
    assert reason in error.message
    assert error.hint is not None and "format: compress" in error.hint


def test_compressed_tensors_int4_is_accepted(tmp_path: Path) -> None:
    text = (
        "model: m\npasses:\n  - {pass: awq, bits: 4, group_size: 64}\n"
        "  - {pass: gptq, bits: 4, group_size: 64}\n"
        "export: {dir: out, format: compressed-tensors}\n"
    )
    assert load_recipe(write(tmp_path, text)).export is not None


@pytest.mark.parametrize(
    ("spec", "message", "hint"),
    [
        (
            "builtin:wikki",
            "'builtin:wikki' is not a builtin dataset",
            "did you mean 'builtin:wiki'?",
        ),
        ("wikitxt", "unknown dataset 'wikitxt'", "did you mean 'wikitext'?"),
        ("hub:", "dataset spec 'hub:' is not of the form", "e.g. hub:"),
        ("no/such/file.txt", "dataset file no/such/file.txt does not exist", "check the path"),
    ],
)
def test_unknown_evaluation_dataset_is_refused(
    tmp_path: Path, spec: str, message: str, hint: str
) -> None:
    text = (
        f"model: m\npasses:\n  - {{pass: rtn}}\nevaluate:\n  perplexity: [builtin:wiki, '{spec}']\n"
    )
    path = write(tmp_path, text)
    error = error_of(path)
    assert error.message.startswith(f"{path}:5: evaluate.perplexity[1]: {message}")
    assert error.hint is not None and hint in error.hint


def test_empty_calibration_file_is_refused_for_a_calibrated_pass(tmp_path: Path) -> None:
    empty = tmp_path / "calib.txt"
    empty.write_text("")
    text = f"model: m\ncalibration: {{dataset: '{empty}'}}\npasses:\n  - {{pass: PASS}}\n"
    error = error_of(write(tmp_path, text.replace("PASS", "gptq")))
    assert error.message.endswith(f"calibration.dataset: dataset file {empty} is empty")
    # rtn reads no calibration text: the same block is not its problem
    assert load_recipe(write(tmp_path, text.replace("PASS", "rtn"))).passes
