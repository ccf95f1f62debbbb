"""MediaWiki markup to plain prose, and the articles of a MediaWiki XML dump.

What ``builtin:wiki`` is made of: templates, tables, references, media and category links,
markup quotes and headings of empty sections are removed; link text and the prose stay.
"""

from __future__ import annotations

import bz2
import html
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["iter_articles", "strip_wiki_markup"]


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


def iter_articles(dump: Path) -> Iterator[tuple[str, str]]:
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
