"""lm-evaluation-harness on a compressed export (or any HF model), paired with its original.

A drop of two points on 200 items can be noise. So every task is scored on the same items for the
compressed model and for the original, and :func:`paired_scores` reports both, their difference,
and a 95% interval of the difference from a paired bootstrap over items (the items are resampled
together for both models, which cancels the item-difficulty variance two independent stderrs
would double count).

An export folder is loaded with ``AutoModelForCausalLM.from_pretrained`` after ``import compress``,
so lm-eval scores the packed modules through the registered HF quantizer, exactly what a user
deploys; the original is the model the export's recipe names. Any other model spec (builtin alias,
hub id, local HF folder) is evaluated as is, with an original only when one is given.

From Python::

    from compress.evaluate.lmeval import evaluate_tasks
    result = evaluate_tasks("out/smollm2-w4", ["offline_arc_easy"], limit=200)
    for row in result.paired:
        print(row.task, row.metric, row.original, row.compressed, row.ci_low, row.ci_high)
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from compress.errors import CompressError, DataError, ExportError, ModelLoadError
from compress.utils.progress import NullProgress, Progress

__all__ = [
    "LMEVAL_JSON",
    "LMEVAL_RESULTS_JSON",
    "LmEvalResult",
    "LmEvalSpec",
    "PairedScore",
    "check_tasks",
    "evaluate_models",
    "evaluate_tasks",
    "lm_eval_spec",
    "load_for_eval",
    "paired_scores",
    "run_lm_eval",
]

logger = logging.getLogger(__name__)

LMEVAL_JSON = "lm_eval.json"
"""Our paired summary, written next to ``report.json``."""
LMEVAL_RESULTS_JSON = "lm_eval_results.json"
"""lm-eval's own results (``{"compressed": ..., "original": ...}``), samples left out."""

_BOOTSTRAP = 2000
_CHUNK_REQUESTS = 128  # requests handed to lm-eval at once: the granularity of the progress bar
# Choices that share a context at least this long (tokens) are scored from one pass over it.
# Shorter contexts go through lm-eval's batched path, where padding is cheaper than a pass per
# item.
_SHARED_CONTEXT_TOKENS = 48

# lm-eval per-item values: a number averaged over items, or (loglikelihood, count) pairs that
# aggregate as exp(-sum ll / sum count) (perplexities) or -sum ll / sum count / ln 2 (bits).
_RATIO_METRICS = {"word_perplexity", "byte_perplexity", "bits_per_byte"}
_HIGHER_IS_BETTER = {"acc": True, "acc_norm": True, "exact_match": True, "f1": True}


@dataclass(frozen=True)
class LmEvalSpec:
    """What to run: tasks and lm-eval's knobs (the CLI flags and the recipe's ``lm_eval:``)."""

    tasks: tuple[str, ...]
    limit: int | None = None
    batch_size: int = 8
    num_fewshot: int | None = None
    include_path: tuple[str, ...] = ()
    max_length: int | None = None
    """Tokens per window; None = the model's context. Rolling perplexity windows use it."""
    bootstrap_seed: int = 0


@dataclass
class PairedScore:
    """One metric of one task for both models on the same items."""

    task: str
    metric: str
    items: int
    compressed: float
    original: float | None = None
    difference: float | None = None
    """compressed − original."""
    ci_low: float | None = None
    ci_high: float | None = None
    """95% paired-bootstrap interval of the difference."""
    compressed_stderr: float | None = None
    original_stderr: float | None = None
    """lm-eval's stderr of each score on its own."""
    higher_is_better: bool | None = None

    @property
    def significant(self) -> bool | None:
        """Whether the interval excludes 0 (the change is unlikely to be noise)."""
        if self.ci_low is None or self.ci_high is None:
            return None
        return self.ci_low > 0 or self.ci_high < 0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "significant": self.significant}


@dataclass
class LmEvalResult:
    """Paired scores plus lm-eval's raw results (samples stripped) for both models."""

    source: str
    reference: str | None
    spec: LmEvalSpec
    paired: list[PairedScore] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    packed_modules: int = 0
    """QuantLinear modules in the evaluated model: > 0 means packed weights were scored."""
    output_dir: Path | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "reference": self.reference,
            "spec": {**asdict(self.spec), "tasks": list(self.spec.tasks)},
            "packed_modules": self.packed_modules,
            "scores": [row.to_dict() for row in self.paired],
            "timings": self.timings,
        }

    def write(self, directory: Path) -> tuple[Path, Path]:
        """``lm_eval.json`` (paired) and ``lm_eval_results.json`` (lm-eval's) into ``directory``."""
        directory.mkdir(parents=True, exist_ok=True)
        ours, theirs = directory / LMEVAL_JSON, directory / LMEVAL_RESULTS_JSON
        ours.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        theirs.write_text(json.dumps(self.raw, indent=2, default=str) + "\n")
        return ours, theirs


# --- maths: paired bootstrap ---------------------------------------------------------------------


def _aggregate(values: Any, metric: str) -> Any:
    """Aggregate per-item values along the last axis: (..., n) or (..., n, 2) → (...)."""
    import numpy as np

    if metric not in _RATIO_METRICS:
        return values.mean(axis=-1)
    ll, count = values[..., 0].sum(axis=-1), values[..., 1].sum(axis=-1)
    if metric == "bits_per_byte":
        return -ll / count / math.log(2)
    return np.exp(-ll / count)


def paired_scores(
    task: str,
    metric: str,
    compressed: Sequence[Any],
    original: Sequence[Any] | None,
    *,
    seed: int = 0,
    resamples: int = _BOOTSTRAP,
) -> PairedScore:
    """Both scores, their difference and its 95% paired-bootstrap interval.

    ``compressed[i]`` and ``original[i]`` are the per-item values of the same item: a number
    (accuracy-like metrics, averaged) or a ``(loglikelihood, count)`` pair (perplexities).
    """
    import numpy as np

    ours = np.asarray(compressed, dtype=np.float64)
    score = PairedScore(
        task=task,
        metric=metric,
        items=len(ours),
        compressed=float(_aggregate(ours, metric)),
        higher_is_better=_HIGHER_IS_BETTER.get(metric, metric not in _RATIO_METRICS),
    )
    if original is None:
        return score
    theirs = np.asarray(original, dtype=np.float64)
    if theirs.shape != ours.shape:
        raise CompressError(
            f"{task}: {metric} has {len(theirs)} items for the original but {len(ours)} for the "
            "compressed model; paired scores need the same items"
        )
    score.original = float(_aggregate(theirs, metric))
    score.difference = score.compressed - score.original
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, len(ours), size=(resamples, len(ours)))  # (B, n) item indices
    differences = _aggregate(ours[rows], metric) - _aggregate(theirs[rows], metric)
    low, high = np.percentile(differences, [2.5, 97.5])
    score.ci_low, score.ci_high = float(low), float(high)
    return score


# --- loading -------------------------------------------------------------------------------------


def _is_export(path: Path) -> bool:
    from compress.export.manifest import MANIFEST_NAME

    return (path / MANIFEST_NAME).is_file()


def _looks_like_path(spec: str) -> bool:
    # a hub id has a slash too, but never starts with one of these
    return spec.startswith((".", "/", "~"))


def _check_source(spec: str | Path) -> Path | None:
    """The folder ``spec`` names (checked to be an export or an HF model folder), else None."""
    path = Path(spec).expanduser()
    if not (path.exists() or _looks_like_path(str(spec))):
        return None
    if not path.exists():
        raise ExportError(
            f"{spec}: no such folder",
            hint="pass an export folder made by `compress apply`, a HF model folder, a "
            "builtin alias (smollm2-135m) or a hub id",
        )
    if not path.is_dir():
        raise ExportError(f"{spec}: not a folder", hint="pass an export folder or a model id")
    if not _is_export(path) and not (path / "config.json").is_file():
        raise ExportError(
            f"{spec}: neither a compress export (no compress_manifest.json) nor a Hugging "
            "Face model folder (no config.json)",
            hint="pass the folder `compress apply` exported (-o DIR), or a HF model folder",
        )
    return path


def load_for_eval(
    spec: str | Path,
    progress: Progress = NullProgress(),  # noqa: B008  (stateless default)
) -> tuple[Any, Any, str | None]:
    """``(model, tokenizer, original)`` for ``spec``; ``original`` is an export's source model.

    An export folder loads through transformers with the compress quantizer (packed modules);
    a non-export folder must be a Hugging Face model folder; anything else goes to
    :func:`compress.models.load_model` (builtin alias or hub id).
    """
    path = _check_source(spec)
    if path is not None and _is_export(path):
        return _load_export(path, progress)
    from compress.models import load_model

    progress.log(f"loading {spec}")
    model, tokenizer = load_model(str(spec))
    return model.eval(), tokenizer, None


def _load_export(path: Path, progress: Progress) -> tuple[Any, Any, str | None]:
    import compress  # noqa: F401  (registers the quantizer with transformers)
    from compress.export.manifest import read_manifest

    manifest = read_manifest(path)
    progress.log(f"loading export {path} (packed modules)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(str(path))
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as error:
        raise ExportError(f"{path}: cannot load the export: {error}") from None
    recipe_model = (manifest.get("recipe") or {}).get("model")
    original = recipe_model.get("name") if isinstance(recipe_model, Mapping) else recipe_model
    # a recipe run on an in-memory model records its (possibly empty) class or path name only
    return model.eval(), tokenizer, original if isinstance(original, str) and original else None


def _load_reference(name: str, progress: Progress) -> tuple[Any, Any]:
    from compress.models import load_model

    progress.log(f"loading original {name}")
    try:
        model, tokenizer = load_model(name)
    except ModelLoadError as error:
        raise ModelLoadError(
            f"cannot load the original model {name!r} to compare with: {error.message}",
            hint="pass --reference MODEL, or --no-reference to score the export alone",
        ) from None
    return model.eval(), tokenizer


def _count_packed(model: Any) -> int:
    from compress.formats.int.linear import QuantLinear

    return sum(isinstance(module, QuantLinear) for module in model.modules())


# --- running lm-eval -----------------------------------------------------------------------------


def _task_manager(include_path: Sequence[str], tasks: Sequence[str] = ()) -> Any:
    """lm-eval's task index over ``include_path`` and the offline tasks, if they are ready.

    Indexing lm-eval's own registry reads some 27 000 YAML files (~20 s on a loaded 2-core
    machine), so when every task in ``tasks`` is in the local folders only those are indexed.
    """
    from lm_eval.tasks import TaskManager

    from compress.evaluate.tasks import task_dir, tasks_ready

    paths = [str(Path(p).expanduser()) for p in include_path]
    for path in paths:
        if not Path(path).is_dir():
            raise DataError(
                f"--include-path {path}: no such folder", hint="pass a folder of task YAML files"
            )
    if tasks_ready():
        paths.append(str(task_dir()))
    if paths and tasks:
        local = TaskManager(include_path=paths, include_defaults=False)
        if set(tasks) <= set(_known_tasks(local)):
            return local
    return TaskManager(include_path=paths or None)


def _known_tasks(manager: Any) -> list[str]:
    names = getattr(manager, "all_tasks", None)
    return list(names) if names is not None else []


def _chunked(requests: list[Any]) -> Iterator[list[Any]]:
    for start in range(0, len(requests), _CHUNK_REQUESTS):
        yield requests[start : start + _CHUNK_REQUESTS]


def _request_order(request: Any) -> tuple[int, str]:
    """Longest context first, and the choices of one item (same context) side by side."""
    args = [arg for arg in getattr(request, "args", ()) if isinstance(arg, str)]
    return (-len(args[0]), args[0]) if args else (0, "")


def _shared_context_scores(
    model: Any, context: list[int], continuations: list[list[int]]
) -> list[tuple[float, bool]]:
    """``(log p(continuation | context), greedy?)`` for each continuation of one context.

    The context runs through the model once; its KV cache, repeated once per continuation,
    feeds one batched pass over the continuations (right-padded: causal attention keeps the
    padding out of every real token's view). lm-eval instead runs context + continuation for
    each choice, which for long contexts costs the number of choices times more.
    """
    import torch
    import torch.nn.functional as F

    with torch.inference_mode():
        out = model(torch.tensor([context], device=model.device), use_cache=True)
        first = F.log_softmax(out.logits[0, -1:].float(), dim=-1)  # (1, V): predicts cont[0]
        longest = max(len(c) for c in continuations)
        rest = None
        if longest > 1:
            cache = out.past_key_values
            cache.batch_repeat_interleave(len(continuations))
            tokens = torch.zeros((len(continuations), longest - 1), dtype=torch.long)
            for row, continuation in enumerate(continuations):
                tokens[row, : len(continuation) - 1] = torch.tensor(continuation[:-1])
            logits = model(tokens.to(model.device), past_key_values=cache, use_cache=True).logits
            rest = F.log_softmax(logits.float(), dim=-1)  # (k, longest - 1, V)
        scores = []
        for row, continuation in enumerate(continuations):
            parts = [first] if rest is None else [first, rest[row, : len(continuation) - 1]]
            log_probs = torch.cat(parts)  # (len(continuation), V)
            target = torch.tensor(continuation, device=log_probs.device)
            total = log_probs.gather(1, target[:, None]).sum()
            scores.append((float(total), bool((log_probs.argmax(dim=-1) == target).all())))
    return scores


def _make_lm(model: Any, tokenizer: Any, spec: LmEvalSpec, progress: Progress, label: str) -> Any:
    """lm-eval's HFLM around an already loaded model, reporting progress chunk by chunk."""
    import torch
    from lm_eval.models.huggingface import HFLM

    class _TrackedHFLM(HFLM):
        def _tracked(self, method: Callable[..., list[Any]], requests: list[Any], what: str) -> Any:
            # lm-eval sorts by length only within what it is handed: chunks of unsorted requests
            # would pad every batch to the longest of a random sample (and split the choices of
            # an item across chunks), so the chunks are cut from the requests sorted by length
            requests = list(requests)
            order = sorted(range(len(requests)), key=lambda i: _request_order(requests[i]))
            results: list[Any] = [None] * len(requests)
            chunks = list(_chunked(order))
            for chunk in progress.track(chunks, f"{label}: {what}", total=len(chunks)):
                for index, value in zip(
                    chunk, method([requests[i] for i in chunk], disable_tqdm=True), strict=True
                ):
                    results[index] = value
            return results

        def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> Any:
            return self._tracked(super().loglikelihood, requests, "loglikelihood")

        def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> Any:
            return self._tracked(super().loglikelihood_rolling, requests, "rolling loglikelihood")

        def _loglikelihood_tokens(
            self, requests: list[Any], disable_tqdm: bool = False, override_bs: int | None = None
        ) -> Any:
            # requests: ((context, continuation), context tokens, continuation tokens)
            groups: dict[tuple[int, ...], list[int]] = {}
            for index, (_, context, continuation) in enumerate(requests):
                if len(context) + len(continuation) <= self.max_length + 1:
                    groups.setdefault(tuple(context), []).append(index)
            results: list[Any] = [None] * len(requests)
            for context, members in groups.items():
                if len(members) < 2 or len(context) < _SHARED_CONTEXT_TOKENS:
                    continue
                scores = _shared_context_scores(
                    self.model, list(context), [requests[i][2] for i in members]
                )
                for index, score in zip(members, scores, strict=True):
                    results[index] = score
            rest = [index for index, value in enumerate(results) if value is None]
            if rest:
                scored = super()._loglikelihood_tokens(
                    [requests[i] for i in rest], disable_tqdm=disable_tqdm, override_bs=override_bs
                )
                for index, score in zip(rest, scored, strict=True):
                    results[index] = score
            return results

    return _TrackedHFLM(
        pretrained=model,
        tokenizer=tokenizer,
        batch_size=spec.batch_size,
        max_length=spec.max_length,
        device=str(getattr(model, "device", "cpu")),
        # log-probabilities summed in float32 whatever the model's dtype: in bf16 a 300-token
        # total is rounded to multiples of 4, and would disagree with the shared-context path
        softmax_dtype=torch.float32,
    )


def run_lm_eval(
    model: Any,
    tokenizer: Any,
    spec: LmEvalSpec,
    *,
    progress: Progress = NullProgress(),  # noqa: B008  (stateless default)
    label: str = "model",
    manager: Any = None,
) -> dict[str, Any]:
    """lm-eval's ``simple_evaluate`` on a loaded model, with per-item samples kept."""
    import lm_eval

    manager = manager or _task_manager(spec.include_path, spec.tasks)
    lm = _make_lm(model, tokenizer, spec, progress, label)
    results = lm_eval.simple_evaluate(
        model=lm,
        tasks=list(spec.tasks),
        num_fewshot=spec.num_fewshot,
        limit=spec.limit,
        task_manager=manager,
        log_samples=True,
        random_seed=0,
        numpy_random_seed=0,
        torch_random_seed=0,
        fewshot_random_seed=0,
    )
    if not isinstance(results, dict):
        raise CompressError("lm-eval returned no results (not the main process?)")
    return results


def _per_item(samples: list[Mapping[str, Any]]) -> dict[str, list[Any]]:
    """Metric → per-item values ordered by doc id (the pairing key)."""
    ordered = sorted(samples, key=lambda s: int(s["doc_id"]))
    metrics = [k for k in (ordered[0].get("metrics") or ()) if k in ordered[0]] if ordered else []
    return {metric: [s[metric] for s in ordered] for metric in metrics}


def _scores(
    compressed: Mapping[str, Any], original: Mapping[str, Any] | None, seed: int
) -> list[PairedScore]:
    rows = []
    for task, samples in compressed.get("samples", {}).items():
        ours = _per_item(samples)
        theirs = _per_item(original["samples"].get(task, [])) if original else {}
        task_results = compressed.get("results", {}).get(task, {})
        reference_results = original.get("results", {}).get(task, {}) if original else {}
        for metric, values in ours.items():
            row = paired_scores(task, metric, values, theirs.get(metric), seed=seed)
            row.compressed_stderr = _stderr(task_results, metric)
            row.original_stderr = _stderr(reference_results, metric)
            rows.append(row)
    return rows


def _stderr(task_results: Mapping[str, Any], metric: str) -> float | None:
    for key, value in task_results.items():
        if key.startswith(f"{metric}_stderr,") and isinstance(value, int | float):
            return float(value) if math.isfinite(value) else None
    return None


def _strip_samples(results: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in results.items() if k != "samples"}


def lm_eval_spec(
    tasks: Sequence[str],
    *,
    limit: int | None = None,
    batch_size: int = 8,
    num_fewshot: int | None = None,
    include_path: Sequence[str | Path] = (),
    max_length: int | None = None,
) -> LmEvalSpec:
    """A checked :class:`LmEvalSpec`: ``offline``/``offline_all`` expanded, knobs in range."""
    from compress.evaluate.tasks import expand_task_names

    if limit is not None and limit < 1:
        raise DataError(f"--limit must be at least 1, got {limit}")
    if batch_size < 1:
        raise DataError(f"--batch-size must be at least 1, got {batch_size}")
    if num_fewshot is not None and num_fewshot < 0:
        raise DataError(f"--num-fewshot must be at least 0, got {num_fewshot}")
    spec = LmEvalSpec(
        tasks=tuple(expand_task_names(tasks)),
        limit=limit,
        batch_size=batch_size,
        num_fewshot=num_fewshot,
        include_path=tuple(str(p) for p in include_path),
        max_length=max_length,
    )
    if not spec.tasks:
        raise DataError(
            "no lm-eval task given",
            hint="e.g. --tasks offline (run `compress fetch tasks` once first)",
        )
    return spec


def check_tasks(spec: LmEvalSpec) -> Any:
    """lm-eval's task index for ``spec``; a :class:`DataError` names an unknown task."""
    from compress.evaluate.tasks import check_offline_names, check_task_names

    if not spec.include_path:  # an include path may define offline_* tasks of its own
        check_offline_names(spec.tasks)  # before indexing lm-eval's registry (~20 s)
    manager = _task_manager(spec.include_path, spec.tasks)
    check_task_names(spec.tasks, _known_tasks(manager))
    return manager


def evaluate_models(
    model: Any,
    tokenizer: Any,
    spec: LmEvalSpec,
    *,
    reference: Any = None,
    reference_tokenizer: Any = None,
    source: str = "model",
    reference_name: str | None = None,
    manager: Any = None,
    progress: Progress = NullProgress(),  # noqa: B008  (stateless default)
) -> LmEvalResult:
    """Score loaded models: ``model`` and, if given, ``reference`` on the same items.

    The core of :func:`evaluate_tasks`, and what a recipe's ``evaluate: {lm_eval: ...}`` runs
    on the export it has just reloaded and the original it still holds. Writes nothing.
    """
    manager = manager or check_tasks(spec)
    result = LmEvalResult(source=source, reference=reference_name, spec=spec)
    result.packed_modules = _count_packed(model)
    start = time.perf_counter()
    compressed = run_lm_eval(
        model, tokenizer, spec, progress=progress, label="compressed", manager=manager
    )
    result.timings["compressed_s"] = time.perf_counter() - start
    original = None
    if reference is not None:
        start = time.perf_counter()
        original = run_lm_eval(
            reference,
            reference_tokenizer or tokenizer,
            spec,
            progress=progress,
            label="original",
            manager=manager,
        )
        result.timings["original_s"] = time.perf_counter() - start
    _assemble(result, compressed, original)
    return result


def _assemble(
    result: LmEvalResult, compressed: Mapping[str, Any], original: Mapping[str, Any] | None
) -> None:
    result.paired = _scores(compressed, original, result.spec.bootstrap_seed)
    result.raw = {"compressed": _strip_samples(compressed)}
    if original is not None:
        result.raw["original"] = _strip_samples(original)


def evaluate_tasks(
    source: str | Path,
    tasks: Sequence[str],
    *,
    limit: int | None = None,
    batch_size: int = 8,
    num_fewshot: int | None = None,
    include_path: Sequence[str | Path] = (),
    max_length: int | None = None,
    reference: str | None = "auto",
    output_dir: Path | None = None,
    progress: Progress = NullProgress(),  # noqa: B008  (stateless default)
) -> LmEvalResult:
    """Score ``source`` on lm-eval ``tasks`` and, unless ``reference`` is None, its original.

    ``reference="auto"`` uses the model an export was made from (none for a plain model); a
    model spec names one explicitly. Writes :data:`LMEVAL_JSON` and :data:`LMEVAL_RESULTS_JSON`
    into ``output_dir`` (default: the export folder; nothing for a plain model).
    """
    spec = lm_eval_spec(
        tasks,
        limit=limit,
        batch_size=batch_size,
        num_fewshot=num_fewshot,
        include_path=include_path,
        max_length=max_length,
    )
    _check_source(source)  # a bad folder is reported before tasks are looked up
    manager = check_tasks(spec)

    start = time.perf_counter()
    model, tokenizer, original_name = load_for_eval(source, progress)
    load_s = time.perf_counter() - start
    reference_name = original_name if reference == "auto" else reference
    if Path(str(source)).expanduser().is_dir() and _is_export(Path(str(source)).expanduser()):
        output_dir = output_dir or Path(str(source)).expanduser()

    result = LmEvalResult(source=str(source), reference=reference_name, spec=spec)
    result.packed_modules = _count_packed(model)
    result.timings["load_s"] = load_s
    start = time.perf_counter()
    compressed = run_lm_eval(
        model, tokenizer, spec, progress=progress, label="compressed", manager=manager
    )
    result.timings["compressed_s"] = time.perf_counter() - start
    del model  # one model in memory at a time: the original is loaded next
    original = None
    if reference_name is not None:
        start = time.perf_counter()
        ref_model, ref_tokenizer = _load_reference(reference_name, progress)
        original = run_lm_eval(
            ref_model, ref_tokenizer, spec, progress=progress, label="original", manager=manager
        )
        result.timings["original_s"] = time.perf_counter() - start
        del ref_model
    _assemble(result, compressed, original)
    if output_dir is not None:
        result.output_dir = Path(output_dir)
        result.write(result.output_dir)
        _merge_into_report(Path(output_dir), result)
    return result


def _merge_into_report(directory: Path, result: LmEvalResult) -> None:
    """Add the paired scores to the run's ``report.json``/``report.md`` when there is one."""
    from compress.evaluate.report import JSON_NAME, read_report, write_report

    if not (directory / JSON_NAME).is_file():
        return
    report = read_report(directory)
    report["lm_eval"] = result.to_dict()
    write_report(report, directory)
