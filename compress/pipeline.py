"""Run a recipe: load the model, apply the passes in order, export, evaluate, report.

From Python::

    from compress.pipeline import Pipeline
    from compress.quant.rtn import RTNConfig

    result = Pipeline(model="smollm2-135m", passes=[RTNConfig(bits=4, group_size=64)]).run()
    result = Pipeline.from_yaml("recipes/quickstart.yaml").run()
"""

from __future__ import annotations

import copy
import errno
import gc
import hashlib
import json
import os
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from compress import __version__
from compress.data import calibration_batch, load_texts, token_windows
from compress.errors import CompressError, ModelLoadError, PassError, RecipeError
from compress.evaluate.quality import compare_to_reference, generation_sample, perplexity
from compress.evaluate.report import collect_environment, write_report
from compress.export.manifest import MANIFEST_NAME
from compress.export.summary import summarize_export
from compress.export.writer import (
    DEFAULT_SHARD_BYTES,
    check_export_target,
    export_model,
    unwritable_target,
)
from compress.ir import quantized_modules
from compress.models import load_model, load_tokenizer, model_folder
from compress.offload import (
    LayerStore,
    SourceWeights,
    empty_skeleton,
    finished_layers,
    pass_checkpoints,
    remove_work_dir,
    work_dir_for,
)
from compress.recipe import (
    CalibrationSpec,
    EvaluateSpec,
    ExportSpec,
    LmEvalTasksSpec,
    ModelSpec,
    Recipe,
    check_plan,
    load_recipe,
    parse_recipe,
)
from compress.registry import PassConfig, PassContext, PassReport, config_for
from compress.utils.fs import remove_stale_temporaries, target_lock
from compress.utils.memory import map_large_blocks
from compress.utils.processes import process_rank
from compress.utils.progress import NullProgress, Progress

__all__ = ["Pipeline", "RunInterrupted", "RunResult"]

SAMPLE_PROMPT = "The capital of France is"
# offloaded exports hold one shard in memory while writing it: keep that small next to a layer
OFFLOAD_SHARD_BYTES = 512 * 1024**2
Q4_1_CAVEAT = (
    "smollm2-135m is rebuilt from a GGUF Q4_1 file (4-bit, blocks of 32, asymmetric): int4 "
    "with group 32 asymmetric would look unrealistically good on it; compare at group 64+ "
    "symmetric."
)


# What a full disk, a read-only one or a missing permission raise while the export is written.
_WRITE_ERRNOS = frozenset(
    {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR}
)


class RunInterrupted(KeyboardInterrupt):
    """A run stopped by Ctrl-C (SIGINT) or SIGTERM, after cleaning up; says what was kept.

    A ``KeyboardInterrupt``, so Python callers see the usual exception; ``exit_code`` is the
    shell's 128 + signal number (130, 143).
    """

    def __init__(self, signum: int, kept: str, *, resumable: bool, advice: str) -> None:
        super().__init__(kept)
        self.signum = signum
        self.kept = kept
        self.resumable = resumable
        self.advice = advice

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    def describe(self, command: str = "compress apply RECIPE") -> str:
        """One line: which signal, what is left on disk, and how to go on from there."""
        name = signal.Signals(self.signum).name
        then = f"continue with `{command} --resume`" if self.resumable else self.advice
        return f"interrupted ({name}): {self.kept}; {then}"


class _Signalled(KeyboardInterrupt):
    """Raised by the SIGTERM handler, so cleanup runs as for Ctrl-C."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@dataclass
class RunResult:
    """What a run produced: the compressed model in memory, the export folder, the report."""

    model: nn.Module
    tokenizer: Any
    export_dir: Path | None
    report: dict[str, Any] = field(default_factory=dict)
    pass_reports: list[PassReport] = field(default_factory=list)


class Pipeline:
    """A recipe bound to a model; :meth:`run` executes it."""

    def __init__(
        self,
        model: str | ModelSpec | nn.Module,
        passes: Sequence[PassConfig] = (),
        *,
        tokenizer: Any = None,
        calibration: CalibrationSpec | None = None,
        export: ExportSpec | str | Path | None = None,
        evaluate: EvaluateSpec | None = None,
        recipe: Recipe | None = None,
        progress: Progress | None = None,
        strict: bool = False,
        resume: bool = False,
        offload: bool | None = None,
    ) -> None:
        if isinstance(export, str | Path):
            export = ExportSpec(dir=Path(export))
        self.model_source = model
        self.passes = list(passes)
        self.calibration = calibration or CalibrationSpec()
        self.tokenizer = tokenizer
        self.export = export
        self.evaluate = evaluate
        self.recipe = recipe
        self.progress = progress or NullProgress()
        self.strict = strict
        self.resume = resume
        self._follower = False  # rank > 0 of a multi-process launch (set by run)
        spec_offload = isinstance(model, ModelSpec) and model.offload
        self.offload = spec_offload if offload is None else offload
        if self.offload and isinstance(model, nn.Module):
            raise ValueError("offload needs a model name or folder, not a model in memory")

    @classmethod
    def from_recipe(cls, recipe: Recipe, **kwargs: Any) -> Pipeline:
        return cls(
            recipe.model,
            recipe.passes,
            calibration=recipe.calibration,
            export=recipe.export,
            evaluate=recipe.evaluate,
            recipe=recipe,
            **kwargs,
        )

    @classmethod
    def from_yaml(cls, path: str | Path, **kwargs: Any) -> Pipeline:
        return cls.from_recipe(load_recipe(path), **kwargs)

    def resolved_recipe(self) -> dict[str, Any]:
        """The recipe with defaults filled in, as saved into the export."""
        if self.recipe is not None:
            return self.recipe.resolved()
        spec = self.model_source
        data: dict[str, Any] = {
            "model": spec if isinstance(spec, str | ModelSpec) else type(spec).__name__,
            "passes": [{"pass": config_for(c).name, **c.model_dump()} for c in self.passes],
        }
        if isinstance(spec, nn.Module):
            data["model"] = {"name": getattr(spec, "name_or_path", type(spec).__name__)}
            return data
        data["calibration"] = self.calibration.model_dump(mode="json")
        if self.export is not None:
            data["export"] = self.export.model_dump(mode="json")
        if self.evaluate is not None:
            data["evaluate"] = self.evaluate.model_dump(mode="json")
        return parse_recipe(data).resolved()

    def run(self) -> RunResult:
        """Load, compress, export, evaluate, report.

        Everything that can be checked without the model is checked first (the export target
        is writable and may be replaced, the datasets exist, the passes fit the export format).
        The export target is locked for the whole run, so a second run into it fails at once.
        Ctrl-C and SIGTERM remove what is half-written and raise :class:`RunInterrupted`.
        """
        rank, world = process_rank()
        if world > 1 and self.offload:
            raise RecipeError(
                f"--offload with {world} processes: the layer store is one process's",
                hint="offload in a single process, or run several processes without offload",
            )
        self._follower = rank > 0
        if self._follower:
            return self._follow(rank, world)
        self._check_early()
        target = self.export.dir if self.export is not None else None
        before = _identity(target) if target is not None else None
        try:
            with _terminate_as_interrupt():
                if target is None:
                    return self._run()
                with target_lock(target):
                    for folder in remove_stale_temporaries(target):
                        self.progress.log(f"removed {folder}, left behind by a killed run")
                    return self._run()
        except KeyboardInterrupt as stop:
            raise self._interrupted(stop, before) from None
        except OSError as error:
            if target is None or error.errno not in _WRITE_ERRNOS:
                raise
            raise self._write_error(error, target) from None

    def _context(
        self, tokenizer: Any, reference: nn.Module | None, store: LayerStore | None
    ) -> PassContext:
        """What the passes get: progress, tokenizer, the teacher, layers, calibration."""
        context = PassContext(
            progress=self.progress,
            strict=self.strict,
            tokenizer=tokenizer,
            teacher_loader=self._teacher(reference),
        )
        if store is not None:
            context.layers = store
        if any(config_for(c).calibrated for c in self.passes):
            spec = self.calibration
            self.progress.log(
                f"calibration: {spec.samples} x {spec.seq_len} tokens of {spec.dataset}"
            )
            context.calibration = calibration_batch(
                tokenizer, spec.dataset, spec.samples, spec.seq_len, spec.seed
            )
            context.calibration_source = spec.dataset
        return context

    def _run_passes(
        self, model: nn.Module, context: PassContext, store: LayerStore | None
    ) -> list[PassReport]:
        """Every pass in order (each told to the layer store), ``--strict`` checked after each."""
        reports = []
        for index, config in enumerate(self.passes):
            entry = config_for(config)
            self.progress.log(f"pass {entry.name}")
            if store is not None:
                store.begin_pass(index)
            pass_report = entry.fn(model, config, context)
            pass_report.check_strict(self.strict)
            reports.append(pass_report)
        return reports

    def _follow(self, rank: int, world: int) -> RunResult:
        """Rank ``rank`` > 0 of ``accelerate launch`` / torchrun: the same passes as rank 0 (a
        ``distill`` pass trains in step with it), reading rank 0's checkpoints on ``--resume``;
        no export, evaluation or lock of its own: rank 0 writes."""
        check_plan(self.passes, calibration=self.calibration, export=None, evaluate=None)
        self.progress = NullProgress()  # rank 0 shows the bars and logs
        _prepare_runtimes(self.passes)
        model, tokenizer, _ = self._load()
        store = self._layer_store(model)
        reports = self._run_passes(model, self._context(tokenizer, None, store), store)
        report = {"process": {"rank": rank, "processes": world, "writes": False}}
        return RunResult(model, tokenizer, None, report, reports)

    def _check_early(self) -> None:
        """What would otherwise fail after the expensive part: refused before loading."""
        if self.export is not None:
            check_export_target(self.export.dir, overwrite=self.export.overwrite)
        elif self.resume:
            raise RecipeError(
                "--resume needs an export folder: checkpoints live beside it",
                hint="add export: {dir: ...} to the recipe (or pass -o DIR)",
            )
        if not isinstance(self.model_source, nn.Module):
            _refuse_export_as_model(self._spec().name)
        check_plan(
            self.passes,
            calibration=self.calibration,
            export=self.export,
            evaluate=self.evaluate,
        )
        if not self.passes:
            self.progress.log("no passes: the model is exported and evaluated as it is")
        if self.evaluate is not None and self.evaluate.lm_eval is not None:
            _lm_eval_spec(self.evaluate.lm_eval)  # an unknown task fails now, not after the passes

    def _interrupted(
        self, stop: KeyboardInterrupt, before: tuple[int, int] | None
    ) -> RunInterrupted:
        """What an interrupted run left: finished layers to resume from, or a whole export."""
        signum = getattr(stop, "signum", signal.SIGINT)
        if self.export is None:
            return RunInterrupted(
                signum, "nothing was written", resumable=False, advice="run again to start over"
            )
        target = self.export.dir
        work_dir = work_dir_for(target)
        layers = finished_layers(work_dir)
        passes = pass_checkpoints(work_dir)
        written = (target / MANIFEST_NAME).is_file() and _identity(target) != before
        if written:
            return RunInterrupted(
                signum,
                f"the export {target} is complete, but its evaluation was cut short (no "
                "report.json)",
                resumable=False,
                advice="run again with --overwrite for the report, or `compress eval` it",
            )
        if layers or passes:
            saved = [f"{layers} finished layer checkpoint(s)"] if layers else []
            saved += [f"the {name.split('-', 1)[1]} pass's checkpoint" for name in passes]
            return RunInterrupted(
                signum,
                f"no export yet; {' and '.join(saved)} kept in {work_dir}",
                resumable=True,
                advice="",
            )
        kept = "no export was written" + (f" ({target} is as it was)" if before is not None else "")
        return RunInterrupted(signum, kept, resumable=False, advice="run again to start over")

    def _write_error(self, error: OSError, target: Path) -> CompressError:
        """An OSError met while writing: the path and a hint; a full disk gets its space back."""
        where = Path(str(error.filename)) if error.filename else None
        if where is not None and not _is_within(where, target.parent):
            return CompressError(  # not the export's side of the disk: the model, a dataset...
                f"{where}: {error.strerror or error}",
                hint="check that the path exists and that you may read and write it",
            )
        mapped = unwritable_target(target, error)
        if error.errno in (errno.ENOSPC, errno.EDQUOT) and remove_work_dir(target):
            mapped = type(mapped)(
                f"{mapped.message} (the layer checkpoints in {work_dir_for(target)} were "
                "removed to free the space)",
                hint=mapped.hint,
            )
        return mapped

    def _run(self) -> RunResult:
        timings: dict[str, float] = {}
        _prepare_runtimes(self.passes)  # native kernels build while the model loads
        start = time.perf_counter()
        model, tokenizer, source = self._load()
        timings["load_s"] = time.perf_counter() - start

        # offloaded: the reference is loaded from disk only when evaluation starts
        reference = copy.deepcopy(model) if self.evaluate is not None and not self.offload else None
        original_bytes = _parameter_bytes(model)
        store = self._layer_store(model)
        try:
            return self._compress(
                model, tokenizer, source, reference, store, timings, original_bytes
            )
        except CompressError:
            if store is not None:
                store.close()  # a deterministic failure: resuming would only meet it again
            raise
        except BaseException:
            if store is not None and self.export is None:
                store.close()  # a temporary offload folder: nothing can resume from it
            raise

    def _compress(
        self,
        model: nn.Module,
        tokenizer: Any,
        source: str,
        reference: nn.Module | None,
        store: LayerStore | None,
        timings: dict[str, float],
        original_bytes: int,
    ) -> RunResult:
        start = time.perf_counter()
        context = self._context(tokenizer, reference, store)
        reports = self._run_passes(model, context, store)
        timings["passes_s"] = time.perf_counter() - start

        result: dict[str, Any] = {
            "recipe": self.resolved_recipe(),
            "model": {"source": source, "parameters": sum(p.numel() for p in model.parameters())},
            "passes": [r.to_dict() for r in reports],
            "size": {"original_bytes": original_bytes},
            "timings": timings,
            "environment": dict(collect_environment()),
            "caveats": _caveats(source),
        }

        export_dir = None
        if self.export is not None:
            start = time.perf_counter()
            self.progress.log(f"export → {self.export.dir}")
            export_dir = export_model(
                model,
                tokenizer,
                self.export.dir,
                recipe=result["recipe"],
                overwrite=self.export.overwrite,
                progress=self.progress,
                layers=store,
                max_shard_bytes=OFFLOAD_SHARD_BYTES if self.offload else DEFAULT_SHARD_BYTES,
                format=self.export.format,
                sparse=self.export.sparse,
            )
            if store is not None:
                store.close()  # the export is complete: the checkpoints are not needed now
                store = None
            timings["export_s"] = time.perf_counter() - start
            summary = summarize_export(export_dir)
            result["size"].update(
                export_bytes=summary.tensor_bytes,
                export_files_bytes=summary.files_bytes,
                quantized_params=summary.quantized_params,
                quantized_bits_per_weight=summary.quantized_bits_per_weight,
                model_bits_per_weight=summary.model_bits_per_weight,
                **(
                    {
                        "adapter_bytes": summary.adapter_bytes,
                        "corrected_bits_per_weight": summary.corrected_bits_per_weight,
                    }
                    if summary.adapter_bytes
                    else {}
                ),
                per_format={k: v for k, v in summary.to_dict()["per_format"].items()},
            )
        elif quantized_modules(model):
            result["size"]["note"] = "no export: sizes of the packed format are not measured"

        if store is not None:
            store.close()
        if self.evaluate is not None and self.offload and export_dir is not None:
            self.progress.log("offloaded run: loading the original model for evaluation")
            reference = self._load_dense()
        if self.evaluate is not None and reference is not None:
            start = time.perf_counter()
            candidate = self._candidate(model, export_dir)
            result["quality"], result["samples"] = self._evaluate(
                candidate, reference, tokenizer, self.evaluate
            )
            timings["evaluate_s"] = time.perf_counter() - start
            if self.evaluate.lm_eval is not None:
                start = time.perf_counter()
                result["lm_eval"] = self._evaluate_tasks(
                    candidate, reference, tokenizer, self.evaluate.lm_eval, source, export_dir
                )
                timings["lm_eval_s"] = time.perf_counter() - start
            del reference
            gc.collect()
        if self.evaluate is not None and self.evaluate.speed and export_dir is not None:
            start = time.perf_counter()
            result["speed"] = self._measure_speed(export_dir)
            timings["speed_s"] = time.perf_counter() - start

        if export_dir is not None:
            write_report(result, export_dir)
        return RunResult(model, tokenizer, export_dir, result, reports)

    def _teacher(self, reference: nn.Module | None) -> Callable[[], nn.Module]:
        """How a pass gets the original model: the evaluation's untouched copy when there is
        one, else a fresh load of the model the recipe names."""

        def load() -> nn.Module:
            if reference is not None:
                return reference
            if isinstance(self.model_source, nn.Module):
                raise PassError(
                    "this pass needs the original model, and Pipeline(model=<module>) has none "
                    "once the passes changed it",
                    hint="pass evaluate=EvaluateSpec() (which keeps a copy) or a model name",
                )
            self.progress.log("loading the original model as the teacher")
            return self._load_dense()

        return load

    def _measure_speed(self, export_dir: Path) -> dict[str, Any]:
        """Decode tokens/s and peak memory of the export and of the original model folder, each
        in a process of its own (:mod:`compress.evaluate.speed`); a failure is noted, not fatal."""
        from compress.evaluate.speed import measure_generation

        speed: dict[str, Any] = {}
        self.progress.log("speed: decode tokens/s and peak memory, export and original")
        try:
            mine = measure_generation(export_dir)
            speed.update(
                tokens_per_s=mine.tokens_per_s,
                peak_memory_bytes=mine.peak_memory_bytes,
                threads=mine.threads,
            )
            folder = self._reference_folder()
            if folder is not None:
                theirs = measure_generation(folder)
                speed.update(
                    reference_tokens_per_s=theirs.tokens_per_s,
                    reference_peak_memory_bytes=theirs.peak_memory_bytes,
                )
        except CompressError as error:
            self.progress.log(f"speed not measured: {error.message}")
            speed["note"] = f"not measured: {error.message}"
        return speed

    def _reference_folder(self) -> Path | None:
        """The original model as a folder a fresh process can load, if there is one."""
        source = self.model_source
        if isinstance(source, nn.Module):
            return None
        name = self._spec().name
        if name.lower().endswith(".gguf"):
            return None
        return self._folder()

    def _fingerprint(self, passes: int | None = None) -> str:
        """What the checkpoints depend on: model, calibration and passes (not export, eval);
        with ``passes``, only the first that many (what their checkpoints depend on)."""
        recipe = self.resolved_recipe()
        key = {k: recipe.get(k) for k in ("model", "calibration", "passes")}
        if passes is not None:
            key["passes"] = (key["passes"] or [])[:passes]
        key["compress"] = __version__
        return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()

    def _layer_store(self, model: nn.Module) -> LayerStore | None:
        """Per-layer checkpoints beside the export (for --resume); the disk store if offloading."""
        if self.export is not None:
            work_dir = work_dir_for(self.export.dir)
        elif self.offload:
            work_dir = Path(tempfile.mkdtemp(prefix="compress-offload-"))
        else:
            return None
        source = SourceWeights(self._folder()) if self.offload else None
        store = LayerStore(
            model,
            work_dir,
            fingerprint=self._fingerprint(),
            pass_fingerprints=[self._fingerprint(i + 1) for i in range(len(self.passes))],
            resume=self.resume,
            source=source,
            read_only=self._follower,
        )
        if self.resume:
            self.progress.log(f"resuming from the checkpoints in {work_dir}")
        if store.kept_passes is not None:
            names = [config_for(c).name for c in self.passes]
            kept = store.kept_passes
            redo = "nothing to redo"
            if kept < len(names):
                redo = f"passes {kept + 1}-{len(names)} run again"
            self.progress.log(
                f"the recipe changed after its first {kept} pass(es) "
                f"({', '.join(names[:kept])}): their checkpoints are kept; {redo}"
            )
        return store

    def _spec(self) -> ModelSpec:
        source = self.model_source
        assert not isinstance(source, nn.Module)
        return source if isinstance(source, ModelSpec) else ModelSpec(name=source)

    def _folder(self) -> Path:
        return model_folder(self._spec().name, self.progress)

    def _load_dense(self) -> nn.Module:
        spec = self._spec()
        model, _ = load_model(
            spec.name,
            dtype=spec.dtype,
            trust_remote_code=spec.trust_remote_code,
            progress=self.progress,
        )
        return model

    def _load(self) -> tuple[nn.Module, Any, str]:
        source = self.model_source
        if isinstance(source, nn.Module):
            if self.tokenizer is None and (self.export is not None or self.evaluate is not None):
                raise ValueError("Pipeline(model=<module>) needs tokenizer= to export or evaluate")
            return source, self.tokenizer, type(source).__name__
        spec = self._spec()
        if self.offload:
            folder = self._folder()
            self.progress.log(f"offloading: {folder} stays on disk, one layer loaded at a time")
            map_large_blocks()  # freed layers go straight back to the OS, not to heap holes
            model = empty_skeleton(folder, spec.dtype, trust_remote_code=spec.trust_remote_code)
            tokenizer = self.tokenizer or load_tokenizer(
                str(folder), trust_remote_code=spec.trust_remote_code
            )
            return model, tokenizer, spec.name
        model, tokenizer = load_model(
            spec.name,
            dtype=spec.dtype,
            trust_remote_code=spec.trust_remote_code,
            progress=self.progress,
        )
        return model, self.tokenizer or tokenizer, spec.name

    def _candidate(self, model: nn.Module, export_dir: Path | None) -> nn.Module:
        """Evaluate what the user gets: the export reloaded through transformers, if any."""
        if export_dir is None:
            return model
        from transformers import AutoModelForCausalLM

        self.progress.log("reload export through transformers for evaluation")
        reloaded = AutoModelForCausalLM.from_pretrained(str(export_dir))
        return reloaded.eval()

    def _evaluate(
        self, candidate: nn.Module, reference: nn.Module, tokenizer: Any, spec: EvaluateSpec
    ) -> tuple[dict[str, Any], list[dict[str, str]]]:
        quality: dict[str, Any] = {}
        for dataset in spec.perplexity:
            windows = token_windows(
                tokenizer, load_texts(dataset, "evaluation"), spec.seq_len, spec.max_windows
            )
            if spec.kl:
                metrics = compare_to_reference(
                    candidate,
                    reference,
                    windows,
                    batch_size=spec.batch_size,
                    progress=self.progress,
                )
            else:
                metrics = perplexity(
                    candidate, windows, batch_size=spec.batch_size, progress=self.progress
                )
            quality[dataset] = metrics.to_dict()
        samples = [
            {
                "prompt": SAMPLE_PROMPT,
                "original": generation_sample(reference, tokenizer, SAMPLE_PROMPT),
                "compressed": generation_sample(candidate, tokenizer, SAMPLE_PROMPT),
            }
        ]
        return quality, samples

    def _evaluate_tasks(
        self,
        candidate: nn.Module,
        reference: nn.Module,
        tokenizer: Any,
        spec: LmEvalTasksSpec,
        source: str,
        export_dir: Path | None,
    ) -> dict[str, Any]:
        """lm-eval tasks on the reloaded export (packed modules) paired with the original."""
        from compress.evaluate.lmeval import evaluate_models

        result = evaluate_models(
            candidate,
            tokenizer,
            _lm_eval_spec(spec),
            reference=reference,
            source=str(export_dir) if export_dir is not None else "in-memory compressed model",
            reference_name=source,
            progress=self.progress,
        )
        if export_dir is not None:
            result.write(export_dir)  # lm_eval.json + lm-eval's own results, as `compress eval`
        return result.to_dict()


def _lm_eval_spec(spec: LmEvalTasksSpec) -> Any:
    """The recipe's ``evaluate.lm_eval``, checked (:class:`compress.evaluate.lmeval.LmEvalSpec`)."""
    from compress.evaluate.lmeval import check_tasks, lm_eval_spec

    checked = lm_eval_spec(
        spec.tasks,
        limit=spec.limit,
        batch_size=spec.batch_size,
        num_fewshot=spec.num_fewshot,
        include_path=spec.include_path,
        max_length=spec.max_length,
    )
    check_tasks(checked)
    return checked


@contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """Let SIGTERM unwind like Ctrl-C, so half-written folders are removed on the way out.

    Only where Python can take signals (the main thread), and only if nobody installed a
    SIGTERM handler of their own.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)
    if previous is not signal.SIG_DFL:
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise _Signalled(signum)

    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _is_within(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
    except (OSError, ValueError):
        return False
    return True


def _identity(path: Path) -> tuple[int, int] | None:
    """Inode and change time of ``path``: tells whether a run replaced it."""
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return stat.st_ino, stat.st_ctime_ns


def _refuse_export_as_model(spec: str) -> None:
    """Compressing an export again would quantize packed codes; say what to point at instead."""
    folder = Path(spec).expanduser()
    if not (folder / MANIFEST_NAME).is_file():
        return
    try:
        recipe = json.loads((folder / MANIFEST_NAME).read_text()).get("recipe") or {}
        model = recipe.get("model")
        original = model.get("name") if isinstance(model, dict) else model
    except (OSError, ValueError, AttributeError):
        original = None
    hint = "point model: at the original model" + (
        f" ({original!r}, from the export's manifest)" if original else ""
    )
    raise ModelLoadError(
        f"model {spec!r} is already a compress export (it holds {MANIFEST_NAME}); its "
        "weights are packed, not a model to compress again",
        hint=f"{hint}; to measure the export itself, run `compress eval {spec}`",
    )


def _prepare_runtimes(passes: Sequence[PassConfig]) -> None:
    """Start building what the runtimes of the passes' formats need (the native kernels'
    first-use build takes about a minute), so that it overlaps with fetching and loading the
    model instead of stalling the first evaluation."""
    from compress.formats import runtime_for

    jobs = []
    for config in passes:
        formats = getattr(config, "formats", None)
        for fmt in formats() if callable(formats) else []:
            prepare = runtime_for(fmt).prepare
            if prepare is not None and prepare not in jobs:
                jobs.append(prepare)
    for job in jobs:
        job()


def _parameter_bytes(model: nn.Module) -> int:
    # parameters() yields tied weights once; works on meta (offloaded) parameters too
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _caveats(source: str) -> list[str]:
    return [Q4_1_CAVEAT] if source == "smollm2-135m" else []
