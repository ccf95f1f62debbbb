"""Run reports: summary rows, markdown rendering of full and partial results, JSON storage."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import pytest

from compress.errors import ExportError
from compress.evaluate.quality import QualityMetrics
from compress.evaluate.report import (
    JSON_NAME,
    MARKDOWN_NAME,
    Environment,
    QualityDict,
    RunResult,
    collect_environment,
    read_report,
    render_markdown,
    summary_rows,
    top_errors,
    write_report,
)


def full_result() -> RunResult:
    per_module = {
        f"model.layers.{i}.mlp.down_proj": {"relative_error": 0.01 * (i + 1)} for i in range(12)
    }
    per_module["model.layers.0.self_attn.q_proj"] = {"relative_error": 0.5}
    return {
        "recipe": {
            "model": "smollm2-135m",
            "passes": [{"pass": "rtn", "bits": 4, "group_size": 64}],
            "export": {"dir": "out/smollm2-w4", "format": "compress"},
        },
        "model": {"source": "HuggingFaceTB/SmolLM2-135M", "parameters": 134_515_008},
        "passes": [
            {
                "name": "rtn",
                "touched": list(per_module),
                "skipped": {"lm_head": "ignored by recipe"},
                "metrics": {"mean_relative_error": 0.0712345, "max_relative_error": 0.5},
                "per_module": per_module,
                "notes": ["widths: int4 100.0% of weights"],
            }
        ],
        "size": {
            "original_bytes": 269_060_552,
            "export_bytes": 89_234_567,
            "quantized_params": 106_168_320,
            "quantized_bits_per_weight": 4.25,
            "model_bits_per_weight": 5.3071,
            "per_format": {
                "int4 g64 sym": {"modules": 210, "params": 106_168_320, "bits_per_weight": 4.25}
            },
        },
        "quality": {
            "builtin:wiki": {
                "tokens": 65_408,
                "windows": 128,
                "seq_len": 512,
                "perplexity": 21.98765,
                "reference_perplexity": 20.12345,
                "kl_mean": 0.0456789,
                "top1_agreement": 0.87654,
            }
        },
        "samples": [
            {
                "prompt": "The capital of France is",
                "original": " Paris, a city of ```lights```.",
                "compressed": " Paris.\nIt is",
            }
        ],
        "timings": {"load_s": 3.21, "passes_s": 75.5, "export_s": 4.0, "evaluate_s": 30.25},
        "environment": {
            "compress": "0.1.0",
            "torch": "2.13.0+cpu",
            "transformers": "5.23.0",
            "python": "3.11.9",
            "machine": "Linux x86_64",
            "cpu_count": 2,
        },
        "caveats": ["lm_head kept in bf16 (ignored by recipe)"],
    }


def minimal_result() -> dict[str, Any]:
    return {
        "recipe": {"model": "tiny", "passes": []},
        "model": {"source": "tiny", "parameters": 1000},
        "passes": [],
        "size": {"original_bytes": 2000, "export_bytes": 2000},
        "timings": {"load_s": 0.1},
        "environment": {},
        "caveats": [],
    }


# --- summary ---------------------------------------------------------------------------------


def test_summary_rows_of_a_full_result() -> None:
    assert summary_rows(full_result()) == [
        ("perplexity (builtin:wiki)", "20.12", "21.99"),
        ("KL vs original, nats/token (builtin:wiki)", "0.0000", "0.0457"),
        ("top-1 agreement (builtin:wiki)", "100.0%", "87.7%"),
        ("size on disk", "269.1 MB", "89.2 MB (3.02× smaller)"),
        # before: 8 * 269_060_552 bytes / 134_515_008 parameters
        ("bits/weight, whole model", "16.002", "5.307"),
        ("bits/weight, quantized layers", "16.002", "4.250"),
        ("quantized parameters", "0", "106,168,320 (78.9% of the model)"),
    ]


def test_summary_prefers_an_explicit_original_bits_per_weight() -> None:
    result = full_result()
    result["size"]["original_bits_per_weight"] = 16.0
    rows = dict((metric, before) for metric, before, _ in summary_rows(result))
    assert rows["bits/weight, whole model"] == "16.000"


def test_summary_without_reference_shows_no_kl() -> None:
    result = full_result()
    result["quality"] = {"builtin:wiki": QualityMetrics(10, 2, 6, 33.333).to_dict()}  # type: ignore[dict-item]
    rows = summary_rows(result)
    assert rows[0] == ("perplexity (builtin:wiki)", "—", "33.33")
    assert not any(metric.startswith(("KL", "top-1")) for metric, _, _ in rows)


def test_summary_says_when_the_export_is_larger() -> None:
    result = minimal_result()
    result["size"]["export_bytes"] = 5000
    assert ("size on disk", "0.0 MB", "0.0 MB (2.50× larger)") in summary_rows(result)


def test_markdown_explains_missing_sizes() -> None:
    result = minimal_result()
    result["size"] = {"original_bytes": 2000, "note": "no export: packed sizes not measured"}
    text = render_markdown(result)
    assert "| size on disk | 0.0 MB | — |" in text
    assert "- size: no export: packed sizes not measured" in text


def test_summary_shows_a_diverged_model() -> None:
    result = full_result()
    result["quality"]["builtin:wiki"]["perplexity"] = math.inf
    result["quality"]["builtin:wiki"]["kl_mean"] = math.nan
    rows = summary_rows(result)
    assert rows[0][2] == "inf"
    assert rows[1][2] == "nan"


def test_top_errors_are_the_ten_worst_worst_first() -> None:
    worst = top_errors(full_result())
    assert len(worst) == 10
    assert worst[0] == ("model.layers.0.self_attn.q_proj", "rtn", 0.5)
    assert worst[1] == ("model.layers.11.mlp.down_proj", "rtn", pytest.approx(0.12))
    errors = [error for _, _, error in worst]
    assert errors == sorted(errors, reverse=True)
    assert "model.layers.0.mlp.down_proj" not in {module for module, _, _ in worst}


def test_top_errors_put_nan_first_and_skip_modules_without_error() -> None:
    result = full_result()
    per_module = result["passes"][0]["per_module"]
    per_module["model.layers.3.mlp.up_proj"] = {"relative_error": math.nan}
    per_module["model.layers.4.mlp.up_proj"] = {"sparsity": 0.5}
    worst = top_errors(result)
    assert worst[0][0] == "model.layers.3.mlp.up_proj"
    assert "model.layers.4.mlp.up_proj" not in {module for module, _, _ in worst}


# --- markdown --------------------------------------------------------------------------------


def test_markdown_of_a_full_result_holds_the_key_numbers() -> None:
    text = render_markdown(full_result())
    assert text.startswith("# compress report: HuggingFaceTB/SmolLM2-135M\n")
    for expected in [
        "| perplexity (builtin:wiki) | 20.12 | 21.99 |",
        "| KL vs original, nats/token (builtin:wiki) | 0.0000 | 0.0457 |",
        "| top-1 agreement (builtin:wiki) | 100.0% | 87.7% |",
        "| size on disk | 269.1 MB | 89.2 MB (3.02× smaller) |",
        "| bits/weight, whole model | 16.002 | 5.307 |",
        "| bits/weight, quantized layers | 16.002 | 4.250 |",
        "65,408 predicted tokens in 128 windows of 512",
        "| rtn | 13 | 1 | mean_relative_error 0.07123, max_relative_error 0.5 |",
        "- `lm_head`: ignored by recipe",
        "Notes of rtn:\n- widths: int4 100.0% of weights",
        "| `model.layers.0.self_attn.q_proj` | rtn | 0.5000 |",
        "| int4 g64 sym | 210 | 106,168,320 | 4.250 |",
        "The capital of France is",
        "- lm_head kept in bf16 (ignored by recipe)",
        "| passes | 1 min 16 s |",
        "| total | 1 min 53 s |",
        "| load | 3.2 s |",
        "| torch | 2.13.0+cpu |",
        '"group_size": 64',
        "passes: rtn",
        "export: `out/smollm2-w4`",
    ]:
        assert expected in text, expected
    # only the ten worst layers are listed
    assert "model.layers.2.mlp.down_proj`" not in text
    assert "model.layers.3.mlp.down_proj`" in text


def test_markdown_sections_come_in_reading_order() -> None:
    text = render_markdown(full_result())
    headings = [line for line in text.splitlines() if line.startswith("## ")]
    assert headings == [
        "## Summary",
        "## Passes",
        "## Largest quantization error (10 layers)",
        "## Formats",
        "## Samples",
        "## Caveats",
        "## Timings",
        "## Environment",
        "## Recipe",
    ]


def test_markdown_fences_model_output_containing_backticks() -> None:
    text = render_markdown(full_result())
    # the original continuation holds a run of 3 backticks, so its fence needs 4
    assert "````text\n Paris, a city of ```lights```.\n````" in text
    assert "```text\n Paris.\nIt is\n```" in text


@pytest.mark.parametrize(
    ("seconds", "shown"),
    [
        (0.04, "0.0 s"),
        (59.9, "59.9 s"),
        (60.0, "1 min 0 s"),
        (119.7, "2 min 0 s"),
        (3725, "62 min 5 s"),
    ],
)
def test_timings_are_readable(seconds: float, shown: str) -> None:
    text = render_markdown({"timings": {"passes_s": seconds}})
    assert f"| passes | {shown} |" in text


def test_markdown_escapes_table_cells() -> None:
    result = full_result()
    result["passes"][0]["name"] = "weird|name"
    text = render_markdown(result)
    assert "| weird\\|name | 13 |" in text


def test_markdown_of_a_minimal_result() -> None:
    text = render_markdown(minimal_result())
    assert text.startswith("# compress report: tiny\n")
    assert "| size on disk | 0.0 MB | 0.0 MB (1.00× smaller) |" in text
    for absent in ["## Samples", "## Passes", "perplexity", "## Caveats", "## Environment"]:
        assert absent not in text
    assert text.endswith("\n") and not text.endswith("\n\n")


@pytest.mark.parametrize(
    "result",
    [
        {},
        {"quality": {"builtin:wiki": {}}},
        {"quality": None, "samples": None, "passes": None, "size": None},
        {"passes": [{"name": "rtn"}], "samples": [{"prompt": "hi"}]},
        {"passes": [{"per_module": {"a": None, "b": {"relative_error": "x"}}}]},
        {"size": {"per_format": {"int8": {}}}, "timings": {"load_s": None}},
    ],
)
def test_markdown_of_partial_results_does_not_crash(result: dict[str, Any]) -> None:
    text = render_markdown(result)
    assert text.startswith("# compress report")
    summary_rows(result)


# --- files -----------------------------------------------------------------------------------


def test_write_and_read_round_trip(tmp_path: Path) -> None:
    result = full_result()
    result["quality"]["builtin:wiki"]["perplexity"] = math.inf  # non-finite values survive
    json_path, markdown_path = write_report(result, tmp_path / "out")
    assert json_path == tmp_path / "out" / JSON_NAME
    assert markdown_path == tmp_path / "out" / MARKDOWN_NAME
    assert read_report(tmp_path / "out") == result
    assert read_report(json_path) == result
    assert markdown_path.read_text(encoding="utf-8") == render_markdown(result)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [JSON_NAME, MARKDOWN_NAME]


def test_write_replaces_an_earlier_report(tmp_path: Path) -> None:
    write_report(minimal_result(), tmp_path)
    write_report(full_result(), tmp_path)
    assert read_report(tmp_path) == full_result()
    assert sorted(p.name for p in tmp_path.iterdir()) == [JSON_NAME, MARKDOWN_NAME]


def test_write_stores_paths_as_strings(tmp_path: Path) -> None:
    result = minimal_result()
    result["recipe"]["export"] = {"dir": tmp_path / "out"}
    write_report(result, tmp_path)
    assert read_report(tmp_path)["recipe"]["export"]["dir"] == str(tmp_path / "out")


def test_unserialisable_result_leaves_the_earlier_report(tmp_path: Path) -> None:
    write_report(minimal_result(), tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    bad = copy.deepcopy(minimal_result())
    bad["caveats"] = [object()]
    with pytest.raises(TypeError, match="not JSON-serialisable"):
        write_report(bad, tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_read_report_of_a_missing_folder(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(ExportError, match="no such report folder") as info:
        read_report(missing)
    assert str(missing) in str(info.value)
    assert info.value.hint


def test_read_report_of_a_folder_without_report(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="is missing") as info:
        read_report(tmp_path)
    assert str(tmp_path / JSON_NAME) in str(info.value)


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b'{"recipe": {', "is not valid JSON"),
        (b"\xff\xfe not utf-8", "is not valid JSON"),
        (b"[1, 2]", "holds a JSON list, not an object"),
    ],
)
def test_read_report_of_a_corrupt_file(tmp_path: Path, content: bytes, match: str) -> None:
    (tmp_path / JSON_NAME).write_bytes(content)
    with pytest.raises(ExportError, match=match) as info:
        read_report(tmp_path)
    assert str(tmp_path / JSON_NAME) in str(info.value)
    assert info.value.hint


def test_result_is_plain_json() -> None:
    result = full_result()
    assert json.loads(json.dumps(result)) == result


# --- shape -----------------------------------------------------------------------------------


def test_quality_dict_matches_quality_metrics() -> None:
    assert list(QualityDict.__annotations__) == [f.name for f in dataclasses.fields(QualityMetrics)]


def test_collect_environment_fills_every_field() -> None:
    environment = collect_environment()
    assert list(environment) == list(Environment.__annotations__)
    assert environment["cpu_count"] >= 1
    assert environment["torch"] != "not installed"
    assert environment["python"].count(".") == 2
