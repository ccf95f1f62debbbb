"""Datasets: wiki markup stripping, builtin:wiki, local files, specs and token windows."""

from __future__ import annotations

import bz2
import copy
import json
from pathlib import Path

import datasets
import pytest
import torch
from tokenizers import processors

from compress.data import (
    calibration_batch,
    corpora,
    fetch_dataset,
    load_texts,
    strip_wiki_markup,
    token_windows,
    wiki,
)
from compress.errors import DataError
from compress.utils import wheels

# ---------------------------------------------------------------------------------------------
# markup stripping


@pytest.mark.parametrize(
    ("markup", "expected"),
    [
        ("'''Bold''' and ''italic'' and '''''both'''''.", "Bold and italic and both."),
        ("A [[political philosophy]] text.", "A political philosophy text."),
        ("A [[self-governance|self-governed]] society.", "A self-governed society."),
        ("Many [[anarchist]]s agree.", "Many anarchists agree."),
        ("See [[#History|below]] and [[:Category:Birds|bird pages]].", "See below and bird pages."),
        ("Cats{{citation needed|date=May 2010}} purr.", "Cats purr."),
        ("A{{outer|x={{inner|{{deepest}}}}|y}} B.", "A B."),
        ("A {{nowrap|New York}} trip of {{convert|5|km|mi}}.", "A New York trip of 5 km."),
        ("Word {{lang|fr|bonjour}} here.", "Word bonjour here."),
        ("Text.<ref>Smith, p. 3 [[Book]]</ref> More.<ref name=x/>", "Text. More."),
        ('Text.<ref name="a">note\nover lines</ref> End.', "Text. End."),
        ("Hidden <!-- editor note [[x]] --> text.", "Hidden text."),
        (
            "Para.\n{| class=wikitable\n|-\n| a || b\n|-\n{|\n| nested\n|}\n|}\nAfter.",
            "Para.\n\nAfter.",
        ),
        ("Seen [http://example.com the site] and [http://bare.org].", "Seen the site and."),
        ("[[File:X.jpg|thumb|Caption with [[link]] and [brackets].]]\nProse.", "Prose."),
        ("[[Image:Y.png|left|200px]]Prose.", "Prose."),
        ("Prose.\n[[Category:Philosophy]]\n[[de:Anarchismus]]", "Prose."),
        ("a&nbsp;b &ndash; c &amp; d", "a b – c & d"),
        ("x<sub>2</sub>O and<br/>y <small>small</small>", "x2O and y small"),
        (
            "* first item\n** second [[item]]\n# numbered\n: indented",
            "first item\nsecond item\nnumbered\nindented",
        ),
        (
            "Achilles ({{IPAc-en|ə|ˈ|k|ɪ|l|iː|z}}; Greek) was a hero.",
            "Achilles (Greek) was a hero.",
        ),
        ("Albedo ({{IPAc-en|æ|l}}) or reflection.", "Albedo or reflection."),
        ("At {{formatnum: 3003}} m.", "At 3003 m."),
        ("__NOTOC__Intro.", "Intro."),
    ],
)
def test_strip_wiki_markup(markup: str, expected: str) -> None:
    assert strip_wiki_markup(markup) == expected


def test_headings_kept_and_reference_sections_cut() -> None:
    markup = (
        "Intro text.\n\n== History ==\nOld times.\n\n=== Early ===\nVery old.\n\n"
        "== Empty section ==\n{| \n| only a table\n|}\n\n== Later ==\nNewer.\n\n"
        "== References ==\n{{reflist}}\n* Smith 2001\n\n== External links ==\n* [http://x.org X]"
    )
    assert strip_wiki_markup(markup) == (
        "Intro text.\n\nHistory\n\nOld times.\n\nEarly\n\nVery old.\n\nLater\n\nNewer."
    )


def test_unbalanced_markup_does_not_eat_the_article() -> None:
    text = strip_wiki_markup(
        "Apollo ([[Genitive x); the god.\n\nKept {{Infobox\n| a = b\n\nNext para. {{cn}"
    )
    assert text == "Apollo (Genitive x); the god.\n\nKept\n\nNext para."


def _dump(path: Path, pages: list[tuple[str, int, str, bool]]) -> Path:
    ns = "http://www.mediawiki.org/xml/export-0.10/"
    body = "".join(
        f"<page><title>{title}</title><ns>{namespace}</ns><id>{i}</id>"
        + ('<redirect title="Target" />' if redirect else "")
        + f'<revision><text xml:space="preserve">{text}</text></revision></page>'
        for i, (title, namespace, text, redirect) in enumerate(pages)
    )
    path.write_bytes(bz2.compress(f'<mediawiki xmlns="{ns}">{body}</mediawiki>'.encode()))
    return path


def test_dump_reader_skips_redirects_and_other_namespaces(tmp_path: Path) -> None:
    dump = _dump(
        tmp_path / "dump.xml.bz2",
        [
            ("Alpha", 0, "'''Alpha''' is a letter &lt;ref&gt;x&lt;/ref&gt;.", False),
            ("AlphaRedirect", 0, "#REDIRECT [[Alpha]]", True),
            ("OldRedirect", 0, "#redirect [[Alpha]]", False),
            ("Talk:Alpha", 1, "Discussion.", False),
            ("Wikipedia:About", 4, "Project page.", False),
            ("Beta", 0, "Beta is another letter.", False),
        ],
    )
    articles = list(wiki.iter_articles(dump))
    assert [title for title, _ in articles] == ["Alpha", "Beta"]
    assert strip_wiki_markup(articles[0][1]) == "Alpha is a letter."


# ---------------------------------------------------------------------------------------------
# builtin:wiki (downloads the 28 MB gensim wheel from PyPI once)


def _jsonl(path: Path) -> list[dict[str, str]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_builtin_wiki_splits_are_disjoint_and_sized() -> None:
    folder = fetch_dataset("builtin:wiki")
    calibration = _jsonl(folder / "calibration.jsonl")
    evaluation = _jsonl(folder / "evaluation.jsonl")
    meta = json.loads((folder / "meta.json").read_text())

    titles_cal = {record["title"] for record in calibration}
    titles_eval = {record["title"] for record in evaluation}
    assert titles_cal.isdisjoint(titles_eval)
    assert len(titles_cal) == len(calibration) and len(titles_eval) == len(evaluation)

    words = {
        split: sum(len(record["text"].split()) for record in records)
        for split, records in (("calibration", calibration), ("evaluation", evaluation))
    }
    total = words["calibration"] + words["evaluation"]
    assert 300_000 <= total <= 700_000
    assert 0.08 <= words["evaluation"] / total <= 0.2
    for split in words:
        assert meta["splits"][split]["words"] == words[split]
    assert meta["splits"]["calibration"]["articles"] == len(calibration)
    assert meta["source"]["wheel"].startswith("gensim-4.4.0-")

    texts = [record["text"] for record in calibration + evaluation]
    assert all(text.strip() for text in texts)
    joined = "\n".join(texts)
    for leftover in ("{{", "}}", "[[", "]]", "<ref", "'''", "&nbsp;", "[http"):
        assert leftover not in joined, leftover
    assert "Anarchism is a political philosophy" in joined


def test_builtin_wiki_is_cached(monkeypatch: pytest.MonkeyPatch) -> None:
    folder = fetch_dataset("builtin:wiki")
    stamp = (folder / "calibration.jsonl").stat().st_mtime_ns

    def fail(*args, **kwargs):
        raise AssertionError("builtin:wiki should come from the cache")

    monkeypatch.setattr(wheels, "download_wheel", fail)
    assert fetch_dataset("wiki") == folder
    assert len(load_texts("builtin:wiki", "calibration")) > 50
    assert (folder / "calibration.jsonl").stat().st_mtime_ns == stamp


def test_builtin_wiki_texts(wiki_eval_texts) -> None:
    assert "text" in wiki_eval_texts.column_names
    calibration = load_texts("builtin:wiki", "calibration")
    assert len(calibration) > 5 * len(wiki_eval_texts) > 0
    assert set(calibration["title"]).isdisjoint(wiki_eval_texts["title"])


def test_wiki_fetch_falls_back_to_any_platform(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COMPRESS_CACHE", str(tmp_path / "cache"))
    seen: list[tuple] = []

    def download(requirement, dest_dir, *, fallback_args=()):
        seen.append(tuple(tuple(args) for args in fallback_args))
        raise wheels.WheelError("no wheel for this platform")

    monkeypatch.setattr(wheels, "download_wheel", download)
    with pytest.raises(DataError, match="could not fetch builtin:wiki"):
        fetch_dataset("builtin:wiki")
    assert any("--platform" in args for args in seen[0])
    assert not (tmp_path / "cache" / "data" / "wiki").exists()


# ---------------------------------------------------------------------------------------------
# other specs


def test_local_txt_file(tmp_path: Path) -> None:
    path = tmp_path / "corpus.txt"
    path.write_text("first line of text\nsecond line\nthird\n", encoding="utf-8")
    for split in ("calibration", "evaluation"):
        texts = load_texts(str(path), split)
        assert texts["text"] == ["first line of text", "second line", "third"]


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_local_json_file(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"corpus{suffix}"
    records = [{"text": "alpha beta", "id": 1}, {"text": "gamma", "id": 2}]
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n", encoding="utf-8")
    assert load_texts(str(path), "evaluation")["text"] == ["alpha beta", "gamma"]


def test_local_json_without_text_column(tmp_path: Path) -> None:
    path = tmp_path / "corpus.jsonl"
    path.write_text('{"content": "x"}\n', encoding="utf-8")
    with pytest.raises(DataError, match="no 'text' column") as info:
        load_texts(str(path), "calibration")
    assert "content" in info.value.message


def test_missing_local_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_texts(str(tmp_path / "nope.txt"), "calibration")


@pytest.mark.parametrize(
    ("spec", "suggestion"),
    [("builtin:wikki", "builtin:wiki"), ("wikitxt", "wikitext"), ("something-else", None)],
)
def test_unknown_spec(spec: str, suggestion: str | None) -> None:
    with pytest.raises(DataError) as info:
        load_texts(spec, "calibration")
    assert repr(spec) in info.value.message
    assert info.value.hint is not None
    if suggestion:
        assert f"did you mean {suggestion!r}" in info.value.hint


def test_unknown_split() -> None:
    with pytest.raises(DataError, match="'train'"):
        load_texts("builtin:wiki", "train")  # type: ignore[arg-type]


@pytest.mark.usefixtures("hub_offline")
@pytest.mark.parametrize("spec", ["wikitext", "c4", "hub:Salesforce/wikitext:wikitext-2-raw-v1"])
def test_hub_spec_offline(spec: str) -> None:
    with pytest.raises(DataError) as info:
        load_texts(spec, "evaluation")
    assert repr(spec) in info.value.message
    assert info.value.hint is not None and "builtin:wiki" in info.value.hint


@pytest.mark.parametrize("spec", ["hub:", "hub:org/name:", "hub:org/name@"])
def test_malformed_hub_spec(spec: str) -> None:
    with pytest.raises(DataError, match="hub:<dataset id>"):
        load_texts(spec, "calibration")


def test_hub_spec_parsing() -> None:
    assert corpora._parse_hub_spec("hub:org/name:cfg@validation") == (
        {"path": "org/name", "name": "cfg"},
        "validation",
    )
    assert corpora._parse_hub_spec("hub:org/name") == ({"path": "org/name"}, None)


# ---------------------------------------------------------------------------------------------
# token windows and calibration batches


def test_token_windows_shape_and_order(byte_tokenizer, wiki_eval_texts) -> None:
    windows = token_windows(byte_tokenizer, wiki_eval_texts, 64, None)
    assert windows.dtype == torch.int64 and windows.dim() == 2 and windows.shape[1] == 64
    stream = "\n\n".join(wiki_eval_texts["text"]).encode("utf-8")
    assert windows.shape[0] == len(stream) // 64  # one token per byte; the tail is dropped
    assert byte_tokenizer.decode(windows[:3].flatten()) == stream[: 3 * 64].decode("utf-8")

    first = token_windows(byte_tokenizer, wiki_eval_texts, 64, 5)
    assert first.shape == (5, 64) and first.equal(windows[:5])


def test_token_windows_starts_each_window_with_bos(byte_tokenizer) -> None:
    tokenizer = copy.deepcopy(byte_tokenizer)
    tokenizer.add_special_tokens({"bos_token": "<s>"})
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tokenizer.bos_token_id)]
    )
    plain = byte_tokenizer
    texts = datasets.Dataset.from_dict({"text": ["abcdefgh", "ijklmnop"]})
    with_bos = token_windows(tokenizer, texts, 4, None)
    without = token_windows(plain, texts, 4, None)
    assert with_bos[:, 0].eq(tokenizer.bos_token_id).all()
    assert with_bos[0, 1:].tolist() == plain("abc")["input_ids"]
    assert with_bos.shape == (6, 4)  # 18 text tokens (incl. "\n\n"), 3 per window
    assert without.shape == (4, 4) and tokenizer.bos_token_id not in without


def test_token_windows_bad_arguments(byte_tokenizer, wiki_eval_texts) -> None:
    with pytest.raises(DataError, match="seq_len"):
        token_windows(byte_tokenizer, wiki_eval_texts, 1, None)
    with pytest.raises(DataError, match="max_windows"):
        token_windows(byte_tokenizer, wiki_eval_texts, 16, 0)


def test_token_windows_chunked_like_whole(byte_tokenizer, monkeypatch) -> None:
    texts = datasets.Dataset.from_dict({"text": [f"text number {i}." for i in range(50)]})
    whole = token_windows(byte_tokenizer, texts, 8, None)
    monkeypatch.setattr(corpora, "_CHUNK_CHARS", 40)  # many pieces
    assert token_windows(byte_tokenizer, texts, 8, None).equal(whole)


def test_calibration_batch_is_seeded(byte_tokenizer, wiki_eval_texts, tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.jsonl"  # a small corpus keeps the byte-level tokenizing quick
    wiki_eval_texts.select_columns(["text"]).to_json(corpus, lines=True)
    spec = str(corpus)
    first = calibration_batch(byte_tokenizer, spec, 16, 128, seed=0)
    again = calibration_batch(byte_tokenizer, spec, 16, 128, seed=0)
    other = calibration_batch(byte_tokenizer, spec, 16, 128, seed=1)
    assert first.shape == (16, 128) and first.dtype == torch.int64
    assert first.equal(again)
    assert not first.equal(other)
    assert len({tuple(row.tolist()) for row in first}) == 16  # distinct windows
    windows = token_windows(byte_tokenizer, load_texts(spec, "calibration"), 128, None)
    rows = {tuple(row.tolist()) for row in windows}
    assert all(tuple(row.tolist()) in rows for row in first)


def test_calibration_batch_from_builtin_wiki(byte_tokenizer) -> None:
    batch = calibration_batch(byte_tokenizer, "builtin:wiki", 8, 256, seed=3)
    assert batch.shape == (8, 256) and batch.dtype == torch.int64
    assert batch.max() < 256


def test_calibration_batch_needs_enough_text(byte_tokenizer, tmp_path: Path) -> None:
    path = tmp_path / "small.txt"
    path.write_text("only a few words here\n", encoding="utf-8")
    with pytest.raises(DataError, match="2 samples were asked for") as info:
        calibration_batch(byte_tokenizer, str(path), 2, 16)
    assert "1 windows" in info.value.message
