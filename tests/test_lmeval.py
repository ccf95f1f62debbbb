"""lm-eval on exports: packed modules scored, paired comparison, local tasks, bad input.

Fast tests use the tiny random Llama with a byte tokenizer and small local task files written
here (``--include-path``); the perplexity agreement with :mod:`compress.evaluate.quality` runs on
the real SmolLM2 over the offline wiki task (slow).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from transformers import PreTrainedTokenizerFast

from compress.errors import DataError, ExportError
from compress.evaluate.lmeval import (
    LMEVAL_JSON,
    LMEVAL_RESULTS_JSON,
    LmEvalSpec,
    check_tasks,
    evaluate_tasks,
    lm_eval_spec,
    load_for_eval,
    paired_scores,
    run_lm_eval,
)
from compress.evaluate.report import read_report, render_markdown
from compress.pipeline import Pipeline
from compress.quant.rtn import RTNConfig
from tests.conftest import make_byte_tokenizer

WORDS = [
    "the",
    "cat",
    "sat",
    "on",
    "a",
    "mat",
    "and",
    "the",
    "dog",
    "ran",
    "to",
    "the",
    "park",
    "while",
    "birds",
    "sang",
    "in",
    "trees",
]


def tokenizer_with_eos() -> PreTrainedTokenizerFast:
    """The byte tokenizer with an end-of-text token (lm-eval's rolling windows start with it)."""
    tokenizer = make_byte_tokenizer()
    tokenizer.eos_token = "Ċ"  # the byte-level symbol of "\n", already in the 256-token vocab
    return tokenizer


def write_local_tasks(folder: Path) -> Path:
    """A 2-choice task (12 items) and a rolling-perplexity task (4 documents) as YAML + JSONL."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    with (folder / "mc.jsonl").open("w") as stream:
        for number in range(12):
            words = [WORDS[i] for i in rng.integers(0, len(WORDS), 6)]
            record = {"query": " ".join(words) + ":", "choices": ["yes", "no"], "gold": number % 2}
            stream.write(json.dumps(record) + "\n")
    with (folder / "ppl.jsonl").open("w") as stream:
        for _ in range(4):
            stream.write(json.dumps({"text": " ".join(rng.choice(WORDS, 20))}) + "\n")
    (folder / "mc.yaml").write_text(
        json.dumps(
            {
                "task": "tiny_mc",
                "dataset_path": "json",
                "dataset_kwargs": {"data_files": {"test": str(folder / "mc.jsonl")}},
                "test_split": "test",
                "output_type": "multiple_choice",
                "doc_to_text": "{{query}}",
                "doc_to_choice": "{{choices}}",
                "doc_to_target": "{{gold}}",
                "metric_list": [{"metric": "acc"}],
            }
        )
    )
    (folder / "ppl.yaml").write_text(
        json.dumps(
            {
                "task": "tiny_ppl",
                "dataset_path": "json",
                "dataset_kwargs": {"data_files": {"test": str(folder / "ppl.jsonl")}},
                "test_split": "test",
                "output_type": "loglikelihood_rolling",
                "doc_to_text": "",
                "doc_to_target": "{{text}}",
                "metric_list": [{"metric": "word_perplexity"}, {"metric": "bits_per_byte"}],
            }
        )
    )
    return folder


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory: pytest.TempPathFactory, tiny_llama: Any) -> dict[str, Path]:
    """An int4 export of tiny_llama, the original as an HF folder, and the local task folder."""
    import copy

    root = tmp_path_factory.mktemp("lmeval")
    tokenizer = tokenizer_with_eos()
    original = root / "original"
    tiny_llama.save_pretrained(original)
    tokenizer.save_pretrained(original)
    export = root / "export-w4"
    Pipeline(
        copy.deepcopy(tiny_llama),
        [RTNConfig(bits=4, group_size=32)],
        tokenizer=tokenizer,
        export=export,
    ).run()
    return {"original": original, "export": export, "tasks": write_local_tasks(root / "tasks")}


# --- paired maths --------------------------------------------------------------------------------


def test_paired_accuracy_difference_and_interval() -> None:
    original = [1] * 60 + [0] * 40
    compressed = [1] * 50 + [0] * 50  # loses 10 of the 60 the original got right, gains none
    score = paired_scores("t", "acc", compressed, original, seed=0)
    assert (score.original, score.compressed) == (0.6, 0.5)
    assert score.difference == pytest.approx(-0.1)
    # the paired interval reflects 10 discordant items, not two independent binomials
    assert -0.17 < score.ci_low < -0.14 and -0.06 < score.ci_high < -0.03
    assert score.significant is True


def test_identical_models_have_a_zero_interval() -> None:
    values = [1, 0, 1, 1, 0, 0, 1]
    score = paired_scores("t", "acc", values, values)
    assert score.difference == 0 and score.ci_low == 0 and score.ci_high == 0
    assert score.significant is False


def test_perplexity_pairs_aggregate_as_a_ratio() -> None:
    compressed = [(-20.0, 10), (-5.0, 5)]
    original = [(-10.0, 10), (-5.0, 5)]
    score = paired_scores("t", "word_perplexity", compressed, original)
    assert score.compressed == pytest.approx(math.exp(25 / 15))
    assert score.original == pytest.approx(math.exp(15 / 15))
    assert score.higher_is_better is False
    bits = paired_scores("t", "bits_per_byte", compressed, None)
    assert bits.compressed == pytest.approx(25 / 15 / math.log(2))
    assert bits.original is None and bits.ci_low is None


def test_paired_scores_refuse_different_items() -> None:
    with pytest.raises(Exception, match="same items"):
        paired_scores("t", "acc", [1, 0], [1, 0, 1])


# --- loading -------------------------------------------------------------------------------------


def test_export_is_scored_through_packed_modules(tiny_setup: dict[str, Path]) -> None:
    from compress.formats.int.linear import QuantLinear

    model, _, original = load_for_eval(tiny_setup["export"])
    packed = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert len(packed) == 14  # 7 linears in each of 2 layers; lm_head is not quantized
    assert original is None  # made from an in-memory model: no original to load by name


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda root: root / "missing", "no such folder"),
        (lambda root: root, "neither a compress export"),
    ],
)
def test_bad_sources(tmp_path: Path, make: Any, match: str) -> None:
    with pytest.raises(ExportError, match=match):
        load_for_eval(make(tmp_path))


def test_unknown_task_names_the_nearest(tiny_setup: dict[str, Path]) -> None:
    with pytest.raises(DataError, match="unknown lm-eval task 'tiny_mcc'") as info:
        evaluate_tasks(
            tiny_setup["export"],
            ["tiny_mcc"],
            include_path=[tiny_setup["tasks"]],
            reference=None,
        )
    assert "did you mean 'tiny_mc'" in str(info.value.hint)


def test_offline_tasks_not_fetched_say_to_fetch_them(
    tiny_setup: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Told at once, before lm-eval's registry of hub tasks is indexed (~20 s), and with no
    "did you mean" pointing at an unrelated hub task."""
    import lm_eval.tasks

    def no_index(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("lm-eval's task registry was indexed")

    monkeypatch.setenv("COMPRESS_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(lm_eval.tasks, "TaskManager", no_index)
    with pytest.raises(DataError, match="'offline_arc_easy' is not fetched yet") as info:
        evaluate_tasks(tiny_setup["export"], ["offline"], reference=None)
    assert info.value.hint is not None and "compress fetch tasks" in info.value.hint
    assert "did you mean" not in info.value.hint
    with pytest.raises(DataError, match="unknown offline lm-eval task 'offline_goal_inference'"):
        check_tasks(lm_eval_spec(["offline_goal_inference"]))


def test_missing_include_path(tiny_setup: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such folder"):
        evaluate_tasks(tiny_setup["export"], ["tiny_mc"], include_path=[tmp_path / "nope"])


# --- end to end on the tiny model ----------------------------------------------------------------


def test_paired_evaluation_of_an_export(tiny_setup: dict[str, Path], tmp_path: Path) -> None:
    export = tiny_setup["export"]
    result = evaluate_tasks(
        export,
        ["tiny_mc", "tiny_ppl"],
        limit=8,
        batch_size=4,
        include_path=[tiny_setup["tasks"]],
        reference=str(tiny_setup["original"]),
        output_dir=tmp_path / "out",
    )
    assert result.packed_modules == 14
    by_key = {(row.task, row.metric): row for row in result.paired}
    accuracy = by_key[("tiny_mc", "acc")]
    assert accuracy.items == 8
    assert accuracy.original is not None and 0 <= accuracy.original <= 1
    assert (
        accuracy.ci_low is not None and accuracy.ci_low <= accuracy.difference <= accuracy.ci_high
    )
    ppl = by_key[("tiny_ppl", "word_perplexity")]
    # a random model: ppl near the byte-vocabulary size per word; int4 moves it, but a little
    assert ppl.items == 4 and ppl.original is not None
    assert ppl.compressed != ppl.original
    assert abs(ppl.compressed / ppl.original - 1) < 0.2
    ours = json.loads((tmp_path / "out" / LMEVAL_JSON).read_text())
    assert {s["task"] for s in ours["scores"]} == {"tiny_mc", "tiny_ppl"}
    theirs = json.loads((tmp_path / "out" / LMEVAL_RESULTS_JSON).read_text())
    assert theirs["compressed"]["results"]["tiny_mc"]["acc,none"] == pytest.approx(
        accuracy.compressed
    )
    assert "original" in theirs and "samples" not in theirs["compressed"]


def test_results_land_in_the_export_report(tiny_setup: dict[str, Path], tmp_path: Path) -> None:
    import shutil

    from compress.evaluate.report import write_report

    export = Path(shutil.copytree(tiny_setup["export"], tmp_path / "export"))
    write_report({"model": {"source": "tiny", "parameters": 1}, "passes": [], "size": {}}, export)
    evaluate_tasks(
        export,
        ["tiny_mc"],
        limit=4,
        include_path=[tiny_setup["tasks"]],
        reference=str(tiny_setup["original"]),
    )
    assert (export / LMEVAL_JSON).is_file() and (export / LMEVAL_RESULTS_JSON).is_file()
    report = read_report(export)
    assert report["lm_eval"]["scores"][0]["task"] == "tiny_mc"
    assert "## lm-eval tasks" in render_markdown(report)


def test_run_lm_eval_on_a_loaded_model(tiny_llama: Any, tiny_setup: dict[str, Path]) -> None:
    spec = LmEvalSpec(tasks=("tiny_ppl",), include_path=(str(tiny_setup["tasks"]),))
    results = run_lm_eval(tiny_llama, tokenizer_with_eos(), spec)
    samples = results["samples"]["tiny_ppl"]
    assert len(samples) == 4
    # lm-eval scores every token of a document: 20 words of text, one token per byte
    ll, words = samples[0]["word_perplexity"]
    assert words == 20 and ll < 0
    with torch.inference_mode():
        assert math.isfinite(ll)


# --- from a recipe's evaluate: block ------------------------------------------------------------


def test_recipe_evaluate_block_runs_lm_eval_on_the_export(
    tiny_llama: Any, tiny_setup: dict[str, Path], tmp_path: Path
) -> None:
    import copy

    from compress.recipe import EvaluateSpec, LmEvalTasksSpec

    export = tmp_path / "export"
    evaluate = EvaluateSpec(
        perplexity=["builtin:wiki"],
        seq_len=32,
        max_windows=2,
        lm_eval=LmEvalTasksSpec(
            tasks=["tiny_mc"], limit=6, batch_size=4, include_path=[str(tiny_setup["tasks"])]
        ),
    )
    run = Pipeline(
        copy.deepcopy(tiny_llama),
        [RTNConfig(bits=4, group_size=32)],
        tokenizer=tokenizer_with_eos(),
        export=export,
        evaluate=evaluate,
    ).run()
    scores = run.report["lm_eval"]["scores"]
    assert [(s["task"], s["metric"], s["items"]) for s in scores] == [("tiny_mc", "acc", 6)]
    assert scores[0]["original"] is not None and scores[0]["ci_low"] is not None
    assert run.report["lm_eval"]["packed_modules"] == 14  # the reloaded export was scored
    report = read_report(export)
    assert report["lm_eval"]["scores"][0]["task"] == "tiny_mc"
    assert "## lm-eval tasks" in render_markdown(report)
    assert (export / LMEVAL_JSON).is_file() and (export / LMEVAL_RESULTS_JSON).is_file()


def test_recipe_with_an_unknown_task_fails_before_the_passes(
    tiny_llama: Any, tiny_setup: dict[str, Path], tmp_path: Path
) -> None:
    from compress.recipe import EvaluateSpec, LmEvalTasksSpec

    evaluate = EvaluateSpec(
        lm_eval=LmEvalTasksSpec(tasks=["tiny_mcc"], include_path=[str(tiny_setup["tasks"])])
    )
    pipeline = Pipeline(
        tiny_llama, [RTNConfig(bits=4)], tokenizer=tokenizer_with_eos(), evaluate=evaluate
    )
    with pytest.raises(DataError, match="unknown lm-eval task 'tiny_mcc'"):
        pipeline.run()


def test_shared_context_scores_match_lm_eval(tiny_llama: Any) -> None:
    """Choices scored from one pass over their shared context = lm-eval's pass per choice."""
    from lm_eval.models.huggingface import HFLM

    from compress.evaluate.lmeval import _make_lm
    from compress.utils.progress import NullProgress

    tokenizer = tokenizer_with_eos()
    spec = LmEvalSpec(tasks=("x",), batch_size=4)
    lm = _make_lm(tiny_llama, tokenizer, spec, NullProgress(), "tiny")
    rng = np.random.default_rng(1)
    requests = []
    for item in range(3):
        context = " ".join(rng.choice(WORDS, 20 + 5 * item)) + ":"  # > 48 byte tokens
        for choice in (" yes", " no", " the cat sat", "."):  # a one-token choice too
            context_enc, continuation_enc = lm._encode_pair(context, choice)
            requests.append(((context, choice), context_enc, continuation_enc))
    requests.append((("a:", " b"), *lm._encode_pair("a:", " b")))  # short: lm-eval's own path
    ours = lm._loglikelihood_tokens(requests, disable_tqdm=True)
    theirs = HFLM._loglikelihood_tokens(lm, requests, disable_tqdm=True)
    assert [greedy for _, greedy in ours] == [greedy for _, greedy in theirs]
    np.testing.assert_allclose([s for s, _ in ours], [s for s, _ in theirs], rtol=1e-5, atol=1e-4)
