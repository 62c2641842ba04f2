"""Plain text for the language-model study, from the files the registry packages ship: the King James Bible
(training text and target), Wikipedia articles and news stories (retention; disjoint parts heal the weights and are
replayed). Pure functions over bytes, so the tests feed them small inputs."""

from __future__ import annotations

import html
import json
import re
from dataclasses import dataclass, field

# The Bible's first 39 books are the Old Testament; Matthew opens the New.
NEW_TESTAMENT_FIRST_BOOK = "Matthew"


@dataclass
class Corpora:
    """Documents (lists of strings) by role."""

    train: list[str]  # fine-tuning text (the Old Testament, one document per chapter)
    target: list[str]  # held-out target text (New Testament chapters): its loss is the gain, its KL the drift
    retention: dict[str, list[str]]  # general text the model was good at, never trained on
    general: list[str] = field(default_factory=list)  # other general text: heals the 4-bit weights, and is replayed


def bible_chapters(jsonl: str) -> tuple[list[str], list[str]]:
    """(Old Testament chapters, New Testament chapters), each chapter its verses joined by spaces."""
    chapters: dict[tuple[str, int], list[str]] = {}
    order: list[tuple[str, int]] = []
    for line in jsonl.splitlines():
        if not line.strip():
            continue
        verse = json.loads(line)
        key = (verse["book"], int(verse["chapter"]))
        if key not in chapters:
            chapters[key] = []
            order.append(key)
        chapters[key].append(verse["text"].strip())
    books = [book for book, _ in order]
    if NEW_TESTAMENT_FIRST_BOOK not in books:
        raise ValueError(f"The Bible text has no book {NEW_TESTAMENT_FIRST_BOOK!r}; books found: {sorted(set(books))}.")
    first_new = books.index(NEW_TESTAMENT_FIRST_BOOK)
    texts = [" ".join(chapters[key]) for key in order]
    return texts[:first_new], texts[first_new:]


_TEMPLATE = re.compile(r"\{\{[^{}]*\}\}")
_TABLE = re.compile(r"\{\|.*?\|\}", re.S)
_REF = re.compile(r"<ref[^>/]*/>|<ref[^>]*>.*?</ref>", re.S)
_COMMENT = re.compile(r"<!--.*?-->", re.S)
_TAG = re.compile(r"<[^>]+>")
_FILE_LINK = re.compile(r"\[\[(?:File|Image|Category|[a-z]{2,3}):[^\[\]]*(?:\[\[[^\]]*\]\][^\[\]]*)*\]\]")
_LINK = re.compile(r"\[\[(?:[^\]|]*\|)?([^\]]*)\]\]")
_EXTERNAL = re.compile(r"\[https?://\S+ ?([^\]]*)\]")
_HEADING = re.compile(r"^=+\s*(.*?)\s*=+\s*$", re.M)


def wiki_plain(markup: str) -> str:
    """Readable prose from MediaWiki markup: templates, tables, references, files and tags removed, links reduced to
    their text, lists and headings kept as lines."""
    text = html.unescape(markup)
    text = _COMMENT.sub("", text)
    text = _REF.sub("", text)
    previous = None
    while previous != text:  # nested templates, innermost first
        previous, text = text, _TEMPLATE.sub("", text)
    text = _TABLE.sub("", text)
    text = _FILE_LINK.sub("", text)
    text = _LINK.sub(r"\1", text)
    text = _EXTERNAL.sub(r"\1", text)
    text = _HEADING.sub(r"\1", text)
    text = _TAG.sub("", text).replace("'''", "").replace("''", "")
    lines = [line.strip().lstrip("*#:; ").strip() for line in text.splitlines()]
    lines = [line for line in lines if line and not line.startswith(("|", "!", "{", "}"))]
    return "\n".join(lines)


def wiki_articles(xml: str, min_chars: int = 2000) -> list[str]:
    """Articles of a MediaWiki XML dump as plain text (redirects and short pages left out), in dump order."""
    articles = []
    for match in re.finditer(r"<page>(.*?)</page>", xml, re.S):
        page = match.group(1)
        namespace = re.search(r"<ns>(\d+)</ns>", page)
        body = re.search(r"<text[^>]*>(.*?)</text>", page, re.S)
        if body is None or (namespace and namespace.group(1) != "0") or "#REDIRECT" in body.group(1)[:20].upper():
            continue
        text = wiki_plain(body.group(1))
        if len(text) >= min_chars:
            articles.append(text)
    return articles


def split_alternate(documents: list[str]) -> tuple[list[str], list[str]]:
    """Even-indexed and odd-indexed documents: two disjoint halves drawn from the whole collection."""
    return documents[0::2], documents[1::2]
