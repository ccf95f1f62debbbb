"""The ``compress`` command line: thin wrappers that parse, call the library and print.

Exit codes: 0 success; 2 for every :class:`~compress.errors.CompressError` (bad recipe, missing
model, corrupted export, unwritable target...) and every usage error (unknown command or
option, missing argument), each with its message; 130 after Ctrl-C and 143 after SIGTERM, with
a line saying what was kept and how to resume.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.progress import Progress as RichBar
from rich.table import Table

from compress.errors import CompressError

__all__ = ["app", "main", "run"]

T = TypeVar("T")

console = Console(stderr=True)
out = Console()

app = typer.Typer(
    name="compress",
    help="Compress Hugging Face causal LMs: quantize, pack, export, load, evaluate.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
recipes_app = typer.Typer(help="List and validate recipes.", no_args_is_help=True)
app.add_typer(recipes_app, name="recipes")


class RichProgress:
    """:class:`compress.utils.progress.Progress` drawn with rich bars on stderr."""

    def __init__(self) -> None:
        self._bar = RichBar(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=console,
            transient=False,
        )
        self._running: list[TaskID] = []

    def __enter__(self) -> RichProgress:
        self._bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._bar.stop()

    def track(self, items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
        if total is None and hasattr(items, "__len__"):
            total = len(items)  # type: ignore[arg-type]
        task = self._bar.add_task(description, total=total)
        self._running.append(task)
        done = 0
        try:
            for item in items:
                yield item
                # not held while the next item is made: in a streamed export that would keep
                # the previous tensor (a 400 MB embedding) alive beside the next layer
                del item
                self._bar.advance(task)
                done += 1
        finally:
            # a bar whose total was unknown (or guessed) ends at what was done, and its clock
            # stops here rather than running on through the steps after it
            if total is None or done != total:
                self._bar.update(task, total=done, completed=done)
            self._bar.stop_task(task)
            self._running.remove(task)

    def describe(self, description: str) -> None:
        if self._running:
            self._bar.update(self._running[-1], description=description)

    def log(self, message: str) -> None:
        self._bar.console.log(escape(message))


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(message)s",
        handlers=[RichHandler(console=console, show_path=False)],
    )
    # huggingface_hub prints through a handler of its own and then again through ours
    hub_logger = logging.getLogger("huggingface_hub")
    for handler in list(hub_logger.handlers):
        hub_logger.removeHandler(handler)
    if not verbose:
        hub_logger.setLevel(logging.ERROR)  # each retry of an unreachable hub, one by one
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
        import datasets

        datasets.disable_progress_bars()
        datasets.logging.set_verbosity_error()


Verbose = Annotated[bool, typer.Option("--verbose", "-v", help="Log library details.")]


class _Interrupted(Exception):
    """A command stopped by a signal; ``run`` prints ``message`` and returns ``code``.

    An ``Exception`` (not a ``KeyboardInterrupt``) so that typer passes it through unchanged.
    """

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


def _show_version(value: bool) -> None:
    if value:
        from compress import __version__

        out.print(f"compress {__version__}", markup=False, highlight=False)
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_show_version, is_eager=True, help="Print the version."),
    ] = False,
) -> None:
    """Compress Hugging Face causal LMs: quantize, pack, export, load, evaluate."""


@app.command()
def apply(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML file.")],
    export_dir: Annotated[
        Path | None, typer.Option("--export-dir", "-o", help="Override export.dir.")
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing export folder.")] = False,
    evaluate: Annotated[bool, typer.Option(help="Run the recipe's evaluate block.")] = True,
    strict: Annotated[bool, typer.Option(help="Fail when a pass skips a module.")] = False,
    resume: Annotated[
        bool,
        typer.Option(help="Continue a killed run from its last finished layer (same recipe)."),
    ] = False,
    offload: Annotated[
        bool | None,
        typer.Option(
            "--offload/--no-offload",
            help="Keep weights on disk, one decoder layer in memory (default: model.offload).",
        ),
    ] = None,
    verbose: Verbose = False,
) -> None:
    """Run a recipe: load, compress, export, evaluate, report."""
    from compress.evaluate.report import summary_rows
    from compress.pipeline import Pipeline, RunInterrupted
    from compress.recipe import ExportSpec, load_recipe

    _setup_logging(verbose)
    loaded = load_recipe(recipe)
    updates: dict[str, Any] = {}
    if overwrite and export_dir is None and loaded.export is None:
        raise CompressError(
            f"{recipe}: --overwrite given but the recipe has no export section",
            hint="add export: {dir: ...} to the recipe, or pass --export-dir DIR",
        )
    if export_dir is not None:
        # The recipe's overwrite names the recipe's folder: -o DIR elsewhere does not inherit it.
        same = loaded.export is not None and _same_path(export_dir, loaded.export.dir)
        base = loaded.export or ExportSpec(dir=export_dir)
        keep = base.overwrite if same else False
        updates["export"] = base.model_copy(
            update={"dir": export_dir, "overwrite": overwrite or keep}
        )
    elif overwrite and loaded.export is not None:
        updates["export"] = loaded.export.model_copy(update={"overwrite": True})
    if not evaluate:
        updates["evaluate"] = None
    if updates:
        loaded = loaded.model_copy(update=updates)
    try:
        with RichProgress() as progress:
            result = Pipeline.from_recipe(
                loaded, progress=progress, strict=strict, resume=resume, offload=offload
            ).run()
    except RunInterrupted as stop:
        rerun = f"compress apply {recipe}"
        if export_dir is not None:
            rerun += f" -o {export_dir}"
        raise _Interrupted(stop.describe(rerun), stop.exit_code) from None
    except KeyboardInterrupt as stop:
        code = 128 + getattr(stop, "signum", signal.SIGINT)
        raise _Interrupted("interrupted: no export was written", code) from None
    process = result.report.get("process", {})
    if process.get("writes") is False:
        out.print(
            f"process {process['rank']} of {process['processes']}: passes done; process 0 "
            "writes the export and the report",
            markup=False,
        )
        return
    table = Table(title=escape(f"compress apply {recipe}"))
    table.add_column("metric")
    table.add_column("original", justify="right")
    table.add_column("compressed", justify="right")
    for row in summary_rows(result.report):
        table.add_row(*row)
    out.print(table)
    if result.export_dir is not None:
        report_path = result.export_dir / "report.md"
        out.print(f"export: {result.export_dir}  (report: {report_path})", markup=False)


def _same_path(a: Path, b: Path) -> bool:
    return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


@app.command()
def fetch(
    names: Annotated[list[str], typer.Argument(help="Builtin models or datasets to cache.")],
    verbose: Verbose = False,
) -> None:
    """Download and convert builtin models (smollm2-135m), datasets (builtin:wiki) and the
    offline lm-eval tasks (tasks)."""
    from compress.data import fetch_dataset
    from compress.evaluate.tasks import fetch_tasks
    from compress.models import fetch_model

    _setup_logging(verbose)
    with RichProgress() as progress:
        for name in names:
            path = fetch_tasks(progress) if name == "tasks" else None
            path = path or (fetch_dataset(name, progress) if name.startswith("builtin:") else None)
            path = path or fetch_model(name, progress)
            out.print(f"{name}: {path}", markup=False)


@app.command()
def inspect(
    directory: Annotated[Path, typer.Argument(help="An export folder.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    verify: Annotated[bool, typer.Option(help="Check file checksums.")] = True,
) -> None:
    """Show what an export holds: formats, sizes, bits per weight, kernels, recipe."""
    from compress.export.summary import summarize_export

    summary = summarize_export(directory, verify=verify)
    if as_json:
        kernel_paths = {label: sorted(v) for label, v in _kernels(directory).items()}
        out.print_json(json.dumps(summary.to_dict() | {"cpu_kernels": kernel_paths}))
        return
    table = Table(title=escape(f"{directory}  (format v{summary.format_version})"))
    for column in ("format", "modules", "params", "stored MB", "bits/weight", "nominal"):
        table.add_column(column, justify="left" if column == "format" else "right")
    for label, group in summary.per_format.items():
        table.add_row(
            label,
            str(group.modules),
            f"{group.params:,}",
            f"{group.stored_bytes / 1e6:.2f}",
            f"{group.bits_per_weight:.3f}",
            f"{group.nominal_bits_per_weight:.3f}",
        )
    out.print(table)
    out.print(
        f"tensors {summary.tensor_bytes / 1e6:.1f} MB, files {summary.files_bytes / 1e6:.1f} MB; "
        f"{summary.params:,} params, {summary.model_bits_per_weight:.3f} bits/weight overall, "
        f"{summary.quantized_bits_per_weight:.3f} in quantized layers"
    )
    if summary.adapter_bytes:
        out.print(
            f"adapter/ {summary.adapter_bytes / 1e6:.2f} MB: "
            f"{summary.corrected_bits_per_weight:.3f} bits/weight in quantized layers with it"
        )
    for label, paths in sorted(_kernels(directory).items()):
        out.print(f"CPU kernels, {label}: {', '.join(sorted(paths))}", markup=False)
    if summary.recipe:
        out.print("recipe:")
        out.print_json(json.dumps(summary.recipe))


def _kernels(directory: Path) -> dict[str, set[str]]:
    """Per format of an export, the CPU kernel paths its modules take (decode, prefill)."""
    from compress.export.manifest import read_manifest
    from compress.formats import format_from_dict, runtime_for

    paths: dict[str, set[str]] = {}
    for entry in read_manifest(directory)["modules"].values():
        fmt = format_from_dict(entry["format"])
        describe = runtime_for(fmt).describe_kernels
        text = describe(fmt, entry["shape"][1]) if describe else "reference"
        paths.setdefault(fmt.label(), set()).add(text)
    return paths


@app.command()
def report(
    directories: Annotated[
        list[Path], typer.Argument(help="Export folders with a report (one or several runs).")
    ],
    output: Annotated[
        Path | None,
        typer.Option(
            "--output", "-o", help="Folder for the HTML/markdown/JSON comparison of the runs."
        ),
    ] = None,
    verify: Annotated[
        bool, typer.Option(help="Check each export's files, shapes and versions first.")
    ] = True,
) -> None:
    """Print a run's report; write an HTML page comparing the runs (table and plots).

    One run without -o: prints its markdown and writes report.html into the run folder (if it
    can: a read-only export gets a warning). Several runs: writes report.html, comparison.md and
    comparison.json into -o (default ./compress-report). Nothing is written into a run folder
    when -o names another one.
    """
    from compress.evaluate.html import write_comparison
    from compress.evaluate.report import read_report, render_markdown
    from compress.export.manifest import MANIFEST_NAME
    from compress.export.summary import verify_export

    results = [read_report(directory) for directory in directories]  # checks every folder first
    for directory in directories:
        if not verify:
            break
        folder = directory.parent if directory.is_file() else directory  # report.json given
        if (folder / MANIFEST_NAME).is_file():
            verify_export(folder)  # a damaged export fails like `compress inspect`
        else:
            console.print(
                f"[yellow]warning:[/yellow] {escape(str(folder))}: export not verified "
                f"(no {MANIFEST_NAME})",
                highlight=False,
            )
    if len(directories) == 1 and output is None:
        out.print(render_markdown(results[0]), markup=False, highlight=False, end="")
        run_folder = directories[0].parent if directories[0].is_file() else directories[0]
        try:
            paths = write_comparison(directories, run_folder)
        except OSError as error:
            where = error.filename or run_folder
            console.print(
                f"[yellow]warning:[/yellow] report.html not written: {escape(str(where))}: "
                f"{escape(error.strerror or str(error))}",
                highlight=False,
            )
            console.print("  [yellow]hint:[/yellow] pass -o DIR to write it elsewhere")
            return
    else:
        target = output or Path("compress-report")
        try:
            paths = write_comparison(directories, target)
        except OSError as error:
            where = error.filename or target
            raise CompressError(
                f"{where}: cannot write the report: {error.strerror or error}",
                hint="choose a folder you can write to with -o DIR",
            ) from None
    console.print(f"html report: {paths['html']}", markup=False, highlight=False)


@app.command("eval")
def eval_(
    source: Annotated[
        str, typer.Argument(help="Export folder, HF model folder, builtin alias or hub id.")
    ],
    tasks: Annotated[
        str,
        typer.Option(
            "--tasks",
            "-t",
            help="Comma-separated lm-eval tasks; 'offline' = the default offline set.",
        ),
    ] = "offline",
    limit: Annotated[int | None, typer.Option(help="Items per task (the first N).")] = None,
    batch_size: Annotated[int, typer.Option(help="Requests per forward pass.")] = 8,
    num_fewshot: Annotated[int | None, typer.Option(help="Few-shot examples per item.")] = None,
    include_path: Annotated[
        list[Path] | None, typer.Option(help="Folder of local lm-eval task YAML files.")
    ] = None,
    max_length: Annotated[
        int | None, typer.Option(help="Context length in tokens (rolling perplexity windows).")
    ] = None,
    reference: Annotated[
        str | None,
        typer.Option(help="Original model to pair with; default: the export's source model."),
    ] = None,
    no_reference: Annotated[
        bool, typer.Option("--no-reference", help="Score the model alone.")
    ] = False,
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="Folder for the results (default: the export)."),
    ] = None,
    verbose: Verbose = False,
) -> None:
    """Run lm-evaluation-harness tasks on a model, paired with its original on the same items."""
    from compress.evaluate.lmeval import evaluate_tasks
    from compress.evaluate.report import lm_eval_rows

    _setup_logging(verbose)
    if not verbose:
        # lm-eval's own tqdm bars and info logs would interleave with the rich progress
        os.environ.setdefault("TQDM_DISABLE", "1")
        logging.getLogger("lm_eval").setLevel(logging.ERROR)
    names = [name.strip() for name in tasks.split(",") if name.strip()]
    with RichProgress() as progress:
        result = evaluate_tasks(
            source,
            names,
            limit=limit,
            batch_size=batch_size,
            num_fewshot=num_fewshot,
            include_path=include_path or [],
            max_length=max_length,
            reference=None if no_reference else (reference or "auto"),
            output_dir=output,
            progress=progress,
        )
    table = Table(title=escape(f"compress eval {source}"))
    for column in ("task", "metric", "items", "original", "compressed", "difference [95% CI]"):
        table.add_column(column, justify="left" if column in ("task", "metric") else "right")
    for row in lm_eval_rows({"lm_eval": result.to_dict()}):
        table.add_row(*(escape(cell) for cell in row))
    out.print(table)
    out.print(
        "± lm-eval stderr; [95% CI] paired bootstrap over items; * = interval excludes 0",
        markup=False,
    )
    if result.output_dir is not None:
        out.print(f"results: {result.output_dir}", markup=False)


@recipes_app.command("validate")
def recipes_validate(
    files: Annotated[list[Path], typer.Argument(help="Recipe YAML files.")],
) -> None:
    """Check recipes against the schema; exit 2 on the first invalid one."""
    from compress.recipe import load_recipe

    for path in files:
        recipe = load_recipe(path)
        passes = ", ".join(recipe.pass_names()) or "-"
        out.print(f"[green]ok[/green] {escape(str(path))}: passes {escape(passes)}")


@recipes_app.command("list")
def recipes_list() -> None:
    """List the registered passes and their options."""
    from compress.registry import available_passes

    table = Table(title="passes")
    table.add_column("pass")
    table.add_column("options")
    table.add_column("summary")
    for name, entry in available_passes().items():
        table.add_row(name, ", ".join(entry.config_cls.model_fields), entry.summary)
    out.print(table)


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised wherever the process is, so cleanup runs as it does for Ctrl-C."""

    signum = signal.SIGTERM


@contextmanager
def _sigterm_unwinds() -> Iterator[list[int]]:
    """While the CLI runs, SIGTERM raises :class:`_Terminated`; the list records that it did."""
    received: list[int] = []
    installable = threading.current_thread() is threading.main_thread()
    if not installable or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield received
        return

    def handler(signum: int, frame: Any) -> None:
        received.append(signum)
        raise _Terminated

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield received
    finally:
        signal.signal(signal.SIGTERM, previous)


def run(argv: list[str] | None = None) -> int:
    """Run the CLI on ``argv``; return the exit code (2 for bad input or usage, 130 for Ctrl-C,
    143 for SIGTERM).

    typer brings its own click-compatible module, so its exceptions (not ``click``'s) are the
    ones to catch: usage errors derive from ``typer.TyperException``.
    """
    try:
        with _sigterm_unwinds() as terminated:
            code = app(args=argv, prog_name="compress", standalone_mode=False)
    except CompressError as error:
        console.print(f"[bold red]error:[/bold red] {escape(error.message)}", highlight=False)
        if error.hint:
            console.print(f"  [yellow]hint:[/yellow] {escape(error.hint)}", highlight=False)
        return 2
    except _Interrupted as stop:
        console.print(escape(stop.message), highlight=False)
        return stop.code
    except typer.TyperException as error:
        show = getattr(error, "show", None)
        if callable(show):
            show()  # click's usage line, "Try 'compress --help'", then "Error: ..." (or help)
        else:  # pragma: no cover
            console.print(f"Error: {escape(error.format_message())}", highlight=False)
        return error.exit_code
    except typer.Abort:
        console.print("aborted")
        return 1
    if code == 130:  # typer turns a KeyboardInterrupt of the other commands into exit 130
        if terminated:
            code = 128 + signal.SIGTERM
        console.print(f"interrupted ({'SIGTERM' if terminated else 'Ctrl-C'})", highlight=False)
    return code if isinstance(code, int) else 0


def main() -> None:
    """Console entry point."""
    sys.exit(run(sys.argv[1:]))


if __name__ == "__main__":
    main()
