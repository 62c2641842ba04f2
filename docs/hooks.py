"""mkdocs hooks: the reference tables are generated from the code when the site is built, so they cannot drift.

    <!-- sp-options -->   SPArguments' fields: name, default, and the description its docstring gives
    <!-- penalties -->    every registered penalty: name, kind, formula, title
    <!-- commands -->     every `hf-l2sp` command with its one-line summary
"""

from __future__ import annotations

import dataclasses
import re


def field_descriptions() -> dict[str, str]:
    """Field name -> the description SPArguments' docstring gives it (its `name (`type`, ...):` entries)."""
    from hf_l2sp import SPArguments

    doc = SPArguments.__doc__ or ""
    entries = re.findall(r"^ {8}(\w+) \(`[^`]*`[^)]*\):\n((?: {12}.*\n?)+)", doc, flags=re.M)
    return {name: " ".join(line.strip() for line in body.strip().splitlines()) for name, body in entries}


def table_text(text: str) -> str:
    """A description as a table cell: `|` as its HTML entity (a raw one splits the cell), `*` and `_` escaped
    outside code spans (a formula such as lr*alpha*(w - w0) is not emphasis)."""
    parts = re.split(r"(`[^`]*`)", text)
    out = []
    for part in parts:
        if part.startswith("`"):
            out.append(table_code(part[1:-1]))
        else:
            out.append(part.replace("|", "&#124;").replace("*", "\\*").replace("_", "\\_"))
    return "".join(out)


def table_code(code: str) -> str:
    """Code in a table cell, `|` included: inline HTML, since a Markdown code span cannot hold a table's `|`."""
    escaped = code.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("|", "&#124;")
    return f"<code>{escaped}</code>"


def options_table() -> str:
    from hf_l2sp import SPArguments

    described = field_descriptions()
    rows = ["| option | default | meaning |", "| --- | --- | --- |"]
    for field in dataclasses.fields(SPArguments):
        default = field.default if field.default is not dataclasses.MISSING else None
        text = described.get(field.name) or field.metadata.get("help", "")
        rows.append(f"| `{field.name}` | `{default!r}` | {table_text(text)} |")
    return "\n".join(rows) + "\n"


def penalties_table() -> str:
    from hf_l2sp.penalties import FEATURE_REGULARIZERS, registered

    rows = ["| name | kind | Omega | method |", "| --- | --- | --- | --- |"]
    for penalty in registered():
        kind = "feature" if penalty.name in FEATURE_REGULARIZERS else "weight"
        rows.append(f"| `{penalty.name}` | {kind} | {table_code(penalty.formula)} | {penalty.title} |")
    return "\n".join(rows) + "\n"


def commands_table() -> str:
    from hf_l2sp.cli import COMMANDS

    rows = ["| command | what it does |", "| --- | --- |"]
    for name, (_, summary) in COMMANDS.items():
        rows.append(f"| `hf-l2sp {name}` | {summary} |")
    return "\n".join(rows) + "\n"


GENERATED = {"<!-- sp-options -->": options_table, "<!-- penalties -->": penalties_table,
             "<!-- commands -->": commands_table}


def on_page_markdown(markdown, page, config, files):
    for marker, make in GENERATED.items():
        if marker in markdown:
            markdown = markdown.replace(marker, make())
    return markdown
