"""Offline lm-eval tasks: BIG-bench conversion, the cache folder, and perplexity agreement.

The conversion and the folder are tested on a small archive in BIG-bench's layout written here;
the real archive (``bigbench==1.0.0`` sdist from PyPI) and the agreement of lm-eval's rolling
perplexity with :func:`compress.evaluate.perplexity` on SmolLM2 are slow tests.
"""

from __future__ import annotations

import io
import json
import math
import tarfile
from pathlib import Path
from typing import Any

import pytest
import torch

from compress import tasks
from compress.errors import DataError
from compress.evaluate import perplexity
from compress.lmeval import LmEvalSpec, run_lm_eval
from compress.tasks import (
    DEFAULT_METRICS,
    DEFAULT_TASKS,
    OFFLINE_TASKS,
    PERPLEXITY_TASK,
    TASK_PREFIX,
    check_task_names,
    convert_bigbench,
    expand_task_names,
    fetch_tasks,
    offline_task_names,
    wiki_documents,
)


def bigbench_task(count: int = 40, **extra: Any) -> dict[str, Any]:
    examples = [
        {"input": f"Question {i}?", "target_scores": {f"right {i}": 1, f"wrong {i}": 0}}
        for i in range(count)
    ]
    return {"name": "t", "examples": examples, **extra}


# --- conversion ----------------------------------------------------------------------------------


def test_convert_uses_the_task_prefixes_and_finds_the_gold_choice() -> None:
    task = bigbench_task(
        2,
        task_prefix="Decide.",
        example_input_prefix="\nStatement: ",
        example_output_prefix="\nPlausible? ",
    )
    task["examples"][1]["target_scores"] = {"no": 0, "maybe": 0.5, "yes": 1}
    records = convert_bigbench(task, "t/task.json")
    assert records[0] == {
        "id": 0,
        "query": "Decide.\nStatement: Question 0?\nPlausible?",
        "choices": ["right 0", "wrong 0"],
        "gold": 0,
    }
    assert records[1]["gold"] == 2


def test_convert_defaults_to_q_and_a() -> None:
    records = convert_bigbench(bigbench_task(1), "t/task.json")
    assert records[0]["query"] == "Q: Question 0?\nA:"


def test_convert_skips_items_that_cannot_be_scored() -> None:
    task = bigbench_task(4)
    task["examples"][0]["target_scores"] = {"a": 1, "b": 1}  # two best answers
    task["examples"][1]["target_scores"] = {"a": 1}  # one choice
    del task["examples"][2]["target_scores"]  # generative item
    assert [r["id"] for r in convert_bigbench(task, "t/task.json")] == [3]


def test_convert_rejects_a_file_without_examples() -> None:
    with pytest.raises(DataError, match=r"x/task\.json: no 'examples'"):
        convert_bigbench({"name": "x"}, "x/task.json")
    with pytest.raises(DataError, match="single best answer"):
        convert_bigbench({"examples": [{"input": "q", "target": "a"}]}, "x/task.json")


def test_fewshot_pool_is_disjoint_and_stable() -> None:
    records = convert_bigbench(bigbench_task(40), "t/task.json")
    pool, test = tasks._split(records)
    assert len(pool) == 16 and len(test) == 24
    assert {r["id"] for r in pool}.isdisjoint(r["id"] for r in test)
    assert tasks._split(list(reversed(records)))[0] == list(reversed(pool))


def test_wiki_documents_keep_whole_paragraphs_under_the_bound() -> None:
    article = "\n".join(f"Paragraph {i} " + "word " * 50 for i in range(20))
    documents = wiki_documents([article, "short one"], max_chars=600)
    assert documents[-1] == "short one"
    assert all(len(d) <= 600 for d in documents[:-1])
    assert "\n".join(documents[:-1]) == "\n".join(p.strip() for p in article.split("\n"))


def test_defaults_declare_a_headline_metric() -> None:
    assert set(DEFAULT_METRICS) == set(DEFAULT_TASKS)
    assert set(DEFAULT_METRICS.values()) <= {"acc", "acc_norm"}
    assert all(name.removeprefix(TASK_PREFIX) in OFFLINE_TASKS for name in DEFAULT_TASKS)


def test_task_names() -> None:
    assert expand_task_names(["offline", "x", DEFAULT_TASKS[0]]) == [*DEFAULT_TASKS, "x"]
    assert expand_task_names(["offline_all"]) == offline_task_names()
    assert offline_task_names()[0] == PERPLEXITY_TASK
    with pytest.raises(DataError, match="unknown lm-eval task 'offline_goal_inferenc'") as info:
        check_task_names(["offline_goal_inferenc"], offline_task_names())
    assert "did you mean 'offline_goal_inference'" in str(info.value.hint)


# --- the cache folder ----------------------------------------------------------------------------


def small_archive(path: Path) -> Path:
    """A .tar.gz with a 30-item task.json at every path OFFLINE_TASKS reads (and one extra)."""
    with tarfile.open(path, "w:gz") as tar:
        for task in [*OFFLINE_TASKS.values(), tasks.BigBenchTask("unused", "2")]:
            data = json.dumps(bigbench_task(30)).encode()
            info = tarfile.TarInfo(f"{tasks._BIGBENCH_ROOT}{task.path}/task.json")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty compress cache that still sees the real builtin:wiki corpus."""
    from compress.data import fetch_dataset

    real = fetch_dataset("builtin:wiki")
    cache = tmp_path / "cache"
    (cache / "data").mkdir(parents=True)
    (cache / "data" / real.name).symlink_to(real)
    monkeypatch.setenv("COMPRESS_CACHE", str(cache))
    return cache


def test_fetch_writes_loadable_tasks(private_cache: Path, tmp_path: Path, tiny_llama: Any) -> None:
    from lm_eval.tasks import TaskManager

    folder = fetch_tasks(archive=small_archive(tmp_path / "bb.tar.gz"))
    assert folder.is_relative_to(private_cache) and tasks.tasks_ready()
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["tasks"][DEFAULT_TASKS[0]] == {"test": 14, "fewshot": 16}
    assert meta["tasks"][PERPLEXITY_TASK]["test"] > 50
    manager = TaskManager(include_path=str(folder))
    assert set(offline_task_names()) <= set(manager.all_tasks)
    assert fetch_tasks() == folder  # cached: no archive needed the second time

    from tests.test_lmeval import tokenizer_with_eos

    spec = LmEvalSpec(tasks=(DEFAULT_TASKS[0],), limit=3, num_fewshot=2)
    results = run_lm_eval(tiny_llama, tokenizer_with_eos(), spec)
    samples = results["samples"][DEFAULT_TASKS[0]]
    assert len(samples) == 3
    prompt = samples[0]["arguments"][0][0]  # (context, continuation) of the first choice
    assert prompt.count("Q: Question") == 3 and prompt.endswith("\nA:")  # 2 shots + the item


def test_fetch_refuses_an_archive_without_the_tasks(private_cache: Path, tmp_path: Path) -> None:
    archive = tmp_path / "empty.tar.gz"
    with tarfile.open(archive, "w:gz"):
        pass
    with pytest.raises(DataError, match="lacks the BIG-bench task files"):
        fetch_tasks(archive=archive)
    assert not tasks.tasks_ready()


# --- real data (slow) ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def offline_tasks() -> Path:
    return fetch_tasks()


@pytest.mark.slow
def test_real_archive_gives_the_documented_item_counts(offline_tasks: Path) -> None:
    meta = json.loads((offline_tasks / "meta.json").read_text())
    assert meta["tasks"]["offline_goal_inference"] == {"test": 1687, "fewshot": 16}
    assert meta["tasks"]["offline_social_iqa"] == {"test": 1938, "fewshot": 16}
    first = json.loads((offline_tasks / "goal_inference" / "test.jsonl").open().readline())
    assert first["query"].startswith("Q: The most reasonable goal of")


@pytest.mark.slow
def test_lm_eval_perplexity_agrees_with_ours(offline_tasks: Path, smollm2: Any) -> None:
    """The same documents, tokens and windows scored by lm-eval and by compress.evaluate.

    lm-eval's rolling loglikelihood puts the prefix token (BOS, else EOS) in front of a document
    and predicts every token after it; a document shorter than the context is one window. Our
    windows are therefore ``[prefix] + tokens`` per document, and both sides must agree.
    """
    model, tokenizer = smollm2
    documents = 6
    max_length = 1024
    spec = LmEvalSpec(tasks=(PERPLEXITY_TASK,), limit=documents, max_length=max_length)
    results = run_lm_eval(model, tokenizer, spec)
    samples = sorted(results["samples"][PERPLEXITY_TASK], key=lambda s: s["doc_id"])
    prefix = (
        tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    )
    their_nll = our_nll = 0.0
    words = 0
    for sample in samples:
        ids = tokenizer(sample["doc"]["text"], add_special_tokens=False)["input_ids"]
        assert len(ids) < max_length  # one window each: the windows are the same on both sides
        window = torch.tensor([[prefix, *ids]])  # (1, n + 1): n predicted tokens
        metrics = perplexity(model, window, batch_size=1)
        nll = math.log(metrics.perplexity) * metrics.tokens
        ll, doc_words = sample["word_perplexity"]
        assert -ll == pytest.approx(nll, rel=5e-3)
        their_nll, our_nll, words = their_nll - ll, our_nll + nll, words + doc_words
    lm_eval_ppl = results["results"][PERPLEXITY_TASK]["word_perplexity,none"]
    assert lm_eval_ppl == pytest.approx(math.exp(their_nll / words), rel=1e-9)
    assert math.exp(our_nll / words) == pytest.approx(lm_eval_ppl, rel=5e-3)
