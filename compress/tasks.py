"""Offline lm-eval task folders, built from benchmark data that ships on PyPI.

The lm-eval task registry downloads its data from the Hugging Face hub, which many machines cannot
reach. PyPI usually is reachable, and the source distribution of ``bigbench==1.0.0`` carries the
BIG-bench task files (Apache-2.0) as JSON. :func:`fetch_tasks` downloads that archive with pip,
reads the task files of :data:`OFFLINE_TASKS` out of it with :mod:`tarfile` (nothing is installed
or imported) and writes, for each task, a JSONL file and an lm-eval task YAML into the compress
cache. A perplexity task over the evaluation split of ``builtin:wiki`` (scored with lm-eval's
``loglikelihood_rolling``) is written beside them.

The folder is passed to lm-eval as an include path (:func:`task_dir`); the tasks are named
``offline_<name>``. A task's items are split once, by a hash of their text, into a small few-shot
pool and the test items, so ``--num-fewshot`` never shows a model the item it is scored on.

Prompt format of the multiple-choice tasks: the task's own prefix (if any), then
``"<input prefix> <input>\\n<output prefix>"`` (BIG-bench's defaults are ``Q:`` and ``A:``), and
each choice is scored as the continuation ``" <choice>"``. Choices are not listed in the prompt:
a 135M model cannot use a lettered list, but it can rank continuations.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tarfile
import tempfile
import urllib.request
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compress.errors import DataError, nearest
from compress.utils.fs import atomic_directory, sha256_file
from compress.utils.paths import cache_dir
from compress.utils.progress import NullProgress, Progress

__all__ = [
    "BIGBENCH_REQUIREMENT",
    "DEFAULT_METRICS",
    "DEFAULT_TASKS",
    "OFFLINE_TASKS",
    "PERPLEXITY_TASK",
    "TASK_PREFIX",
    "BigBenchTask",
    "check_task_names",
    "convert_bigbench",
    "expand_task_names",
    "fetch_tasks",
    "offline_task_names",
    "task_dir",
    "tasks_ready",
    "wiki_documents",
]

BIGBENCH_REQUIREMENT = "bigbench==1.0.0"
BIGBENCH_SHA256 = "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2"
_BIGBENCH_ROOT = "bigbench-1.0.0/bigbench/benchmark_tasks/"
_DOWNLOAD_MB = 358

TASK_PREFIX = "offline_"
PERPLEXITY_TASK = "offline_wiki_ppl"
"""lm-eval ``loglikelihood_rolling`` over the evaluation split of ``builtin:wiki``."""

# Bump when the conversion changes, so folders written by an older compress are rebuilt.
_CACHE_VERSION = 1
_FEWSHOT_ITEMS = 16
_WIKI_DOC_CHARS = 1500  # a document is a run of whole paragraphs of at most about this many chars
_PIP_TIMEOUT_S = 1800


@dataclass(frozen=True)
class BigBenchTask:
    """One multiple-choice BIG-bench task file and why it is here."""

    path: str
    """Folder of ``task.json`` under ``bigbench/benchmark_tasks``."""
    choices: str
    """How many choices an item has, for the reader (chance level is measured per item)."""


OFFLINE_TASKS: dict[str, BigBenchTask] = {
    "goal_inference": BigBenchTask("goal_step_wikihow/goal_inference", "4"),
    "step_inference": BigBenchTask("goal_step_wikihow/step_inference", "4"),
    "social_iqa": BigBenchTask("social_iqa", "2-3"),
    "timedial": BigBenchTask("timedial", "3"),
    "strategyqa": BigBenchTask("strategyqa", "2"),
    "hyperbaton": BigBenchTask("hyperbaton", "2"),
    "sports_understanding": BigBenchTask("sports_understanding", "2"),
    "date_understanding": BigBenchTask("date_understanding", "5-6"),
    "language_identification": BigBenchTask("language_identification", "11"),
    "emoji_movie": BigBenchTask("emoji_movie", "5"),
    "unit_identification": BigBenchTask("unit_conversion/unit_identification", "3"),
    "abstract_narrative": BigBenchTask("abstract_narrative_understanding/4_distractors", "5"),
    "general_knowledge": BigBenchTask("general_knowledge", "4-13"),
    "intent_recognition": BigBenchTask("intent_recognition", "7"),
    "movie_recommendation": BigBenchTask("movie_recommendation", "4"),
    "understanding_fables": BigBenchTask("understanding_fables", "5"),
    "winowhy": BigBenchTask("winowhy", "2"),
    "physics": BigBenchTask("physics", "3-4"),
}
"""Short name → BIG-bench task; lm-eval names them ``offline_<short name>``."""

DEFAULT_METRICS: dict[str, str] = {
    "offline_goal_inference": "acc_norm",
    "offline_step_inference": "acc",
    "offline_timedial": "acc_norm",
    "offline_movie_recommendation": "acc_norm",
    "offline_physics": "acc_norm",
    "offline_general_knowledge": "acc",
    "offline_emoji_movie": "acc",
    "offline_date_understanding": "acc",
    "offline_language_identification": "acc",
}
"""The default tasks and the metric on which SmolLM2-135M (zero-shot) scores above chance by
more than 2 standard errors on the first 200 test items, or all of them where a task has fewer
(measured; the table and the commands are in docs/evaluation.md). Both metrics are reported
for every task; this one is the task's headline. ``acc_norm`` divides a choice's
loglikelihood by its length in characters, which matters where the choices differ in length."""

DEFAULT_TASKS: tuple[str, ...] = tuple(DEFAULT_METRICS)
"""Tasks ``--tasks offline`` runs (see :data:`DEFAULT_METRICS`). The other offline tasks were
measured at or near chance for SmolLM2-135M (or, unit_identification, at its ceiling) and run
only when named or with ``offline_all``."""


# --- conversion (pure) ---------------------------------------------------------------------------


def _item_rank(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _prompt(task: Mapping[str, Any], example: Mapping[str, Any]) -> str:
    prefix = str(task.get("task_prefix") or "").strip()
    input_prefix = str(task.get("example_input_prefix", "Q:")).strip()
    output_prefix = str(task.get("example_output_prefix", "A:")).strip()
    question = " ".join(part for part in (input_prefix, str(example["input"]).strip()) if part)
    lines = [prefix] if prefix else []
    lines += [question, output_prefix]
    return "\n".join(lines)


def convert_bigbench(task: Mapping[str, Any], source: str) -> list[dict[str, Any]]:
    """BIG-bench ``task.json`` → ``{"id", "query", "choices", "gold"}`` records.

    Keeps items with one best choice (``target_scores`` with a unique maximum) and distinct
    choices; anything else cannot be scored as accuracy. ``source`` names the file in errors.
    """
    examples = task.get("examples")
    if not isinstance(examples, list) or not examples:
        raise DataError(f"{source}: no 'examples' list", hint="not a BIG-bench JSON task file")
    records = []
    for number, example in enumerate(examples):
        scores = example.get("target_scores") if isinstance(example, Mapping) else None
        if not isinstance(scores, Mapping) or len(scores) < 2 or "input" not in example:
            continue
        choices = [str(choice).strip() for choice in scores]
        values = [float(value) for value in scores.values()]
        best = max(values)
        if values.count(best) != 1 or len(set(choices)) != len(choices) or not all(choices):
            continue
        records.append(
            {
                "id": number,
                "query": _prompt(task, example),
                "choices": choices,
                "gold": values.index(best),
            }
        )
    if not records:
        raise DataError(f"{source}: no multiple-choice item with a single best answer")
    return records


def _split(records: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(few-shot pool, test items): the pool is the items whose text hashes lowest."""
    ranked = sorted(records, key=lambda r: _item_rank(r["query"] + "\x00".join(r["choices"])))
    pool_ids = {id(r) for r in ranked[:_FEWSHOT_ITEMS]}
    pool = [r for r in records if id(r) in pool_ids]
    return pool, [r for r in records if id(r) not in pool_ids]


def wiki_documents(texts: Iterable[str], max_chars: int = _WIKI_DOC_CHARS) -> list[str]:
    """Articles cut into documents of whole paragraphs, each at most about ``max_chars``.

    Short documents keep lm-eval's rolling loglikelihood to one window per document at usual
    context lengths, so its windows are the ones :mod:`compress.evaluate` scores too.
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


def _mc_yaml(name: str, data: Path, fewshot: Path, description: str) -> str:
    config = {
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
        "metadata": {"version": _CACHE_VERSION, "source": description},
    }
    return json.dumps(config, indent=2) + "\n"  # JSON is YAML, and needs no quoting rules


def _ppl_yaml(data: Path) -> str:
    config = {
        "task": PERPLEXITY_TASK,
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


def _download_sdist(requirement: str, dest: Path) -> Path:
    """The sdist file of ``requirement`` (``name==version``) from the package index.

    Read straight from the index's JSON simple API (PEP 691; ``$PIP_INDEX_URL`` or PyPI): recent
    pip refuses to even download bigbench's sdist, whose metadata names a direct-URL dependency.
    """
    name, _, version = requirement.partition("==")
    index = os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple").rstrip("/")
    wanted = f"{name}-{version}.tar.gz"
    hint = f"check that the package index is reachable: {index}/{name}/"
    request = urllib.request.Request(
        f"{index}/{name}/", headers={"Accept": "application/vnd.pypi.simple.v1+json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            files = json.load(response).get("files", [])
        url = next((f["url"] for f in files if f.get("filename") == wanted), None)
        if url is None:
            raise DataError(f"{index}/{name}/ lists no {wanted}", hint=hint)
        path = dest / wanted
        with (
            urllib.request.urlopen(url, timeout=_PIP_TIMEOUT_S) as response,
            open(path, "wb") as out,
        ):
            shutil.copyfileobj(response, out, 1 << 20)
    except (OSError, ValueError) as error:
        raise DataError(
            f"could not download the source archive {requirement!r}: {error}", hint=hint
        ) from error
    return path


def _read_task_files(archive: Path) -> dict[str, dict[str, Any]]:
    """The ``task.json`` of every task in :data:`OFFLINE_TASKS`, keyed by its folder."""
    wanted = {
        _BIGBENCH_ROOT + task.path + "/task.json": task.path for task in OFFLINE_TASKS.values()
    }
    found: dict[str, dict[str, Any]] = {}
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar:
                if member.name in wanted and member.isfile():
                    stream = tar.extractfile(member)
                    if stream is not None:
                        found[wanted[member.name]] = json.loads(stream.read().decode("utf-8"))
    except (tarfile.TarError, OSError, ValueError) as error:
        raise DataError(f"cannot read {archive.name}: {error}") from error
    missing = sorted(set(wanted.values()) - set(found))
    if missing:
        raise DataError(
            f"{archive.name} lacks the BIG-bench task files {', '.join(missing)}",
            hint=f"the archive layout changed; compress expects {BIGBENCH_REQUIREMENT}",
        )
    return found


def _write_tasks(folder: Path, task_files: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    from compress.data import load_texts

    counts: dict[str, Any] = {}
    for name, task in OFFLINE_TASKS.items():
        records = convert_bigbench(task_files[task.path], f"{task.path}/task.json")
        pool, test = _split(records)
        sub = folder / name
        sub.mkdir()
        _write_jsonl(sub / "test.jsonl", test)
        _write_jsonl(sub / "fewshot.jsonl", pool)
        description = f"BIG-bench {task.path} ({BIGBENCH_REQUIREMENT} sdist, Apache-2.0)"
        (sub / f"{name}.yaml").write_text(
            _mc_yaml(TASK_PREFIX + name, sub / "test.jsonl", sub / "fewshot.jsonl", description)
        )
        counts[TASK_PREFIX + name] = {"test": len(test), "fewshot": len(pool)}
    documents = wiki_documents(load_texts("builtin:wiki", "evaluation")["text"])
    sub = folder / "wiki_ppl"
    sub.mkdir()
    _write_jsonl(sub / "test.jsonl", ({"text": text} for text in documents))
    (sub / "wiki_ppl.yaml").write_text(_ppl_yaml(sub / "test.jsonl"))
    counts[PERPLEXITY_TASK] = {"test": len(documents)}
    return counts


def fetch_tasks(
    progress: Progress = NullProgress(),  # noqa: B008  (stateless default)
    *,
    archive: Path | None = None,
) -> Path:
    """Build the offline task folders into the cache (once); return the include path.

    ``archive`` is a ``bigbench-1.0.0.tar.gz`` already on disk; without it pip downloads one
    (~360 MB, deleted afterwards). The YAML files name their JSONL files by absolute path, so
    the folder works from any working directory.
    """
    target = task_dir()
    if tasks_ready():
        return target
    with tempfile.TemporaryDirectory(prefix="compress-tasks-") as scratch:
        if archive is None:
            progress.log(f"fetching {BIGBENCH_REQUIREMENT} source archive ({_DOWNLOAD_MB} MB)…")
            archive = _download_sdist(BIGBENCH_REQUIREMENT, Path(scratch))
            digest = sha256_file(archive)
            if digest != BIGBENCH_SHA256:
                raise DataError(
                    f"{archive.name} has SHA-256 {digest}, expected {BIGBENCH_SHA256}",
                    hint="the download is corrupted or the release was replaced; retry the fetch",
                )
        progress.log(f"reading {len(OFFLINE_TASKS)} BIG-bench tasks out of {Path(archive).name}…")
        task_files = _read_task_files(Path(archive))
        try:
            with atomic_directory(target, overwrite=target.exists()) as tmp:
                counts = _write_tasks_relocated(tmp, target, task_files)
                meta = {"cache_version": _CACHE_VERSION, "source": BIGBENCH_REQUIREMENT}
                (tmp / "meta.json").write_text(json.dumps({**meta, "tasks": counts}, indent=2))
        except FileExistsError:
            if not tasks_ready():  # another process finished first: use its folder
                raise
    progress.log(f"offline lm-eval tasks ready in {target}")
    return target


def _write_tasks_relocated(
    tmp: Path, target: Path, task_files: Mapping[str, Mapping[str, Any]]
) -> dict[str, Any]:
    """Write into ``tmp`` but name data files by where they will live after the rename."""
    counts = _write_tasks(tmp, task_files)
    for yaml_file in tmp.glob("*/*.yaml"):
        yaml_file.write_text(yaml_file.read_text().replace(str(tmp), str(target)))
    return counts


def check_task_names(names: Iterable[str], known: Iterable[str]) -> None:
    """Raise a :class:`DataError` naming the first unknown task and the nearest known one."""
    known = list(known)
    known_set = set(known)
    for name in names:
        if name not in known_set:
            guess = nearest(name, known)
            raise DataError(
                f"unknown lm-eval task {name!r}",
                hint=(f"did you mean {guess!r}? " if guess else "")
                + "offline tasks: "
                + ", ".join(offline_task_names())
                + " (run `compress fetch tasks` first); hub tasks need network access",
            )
