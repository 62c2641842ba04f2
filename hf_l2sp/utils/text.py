"""Short lists in error messages."""

from __future__ import annotations

from collections.abc import Iterable


def first_few(items: Iterable[str], limit: int = 5) -> str:
    """'a, b, c (and 7 more)': the first `limit` items and how many were left out."""
    items = list(items)
    shown = ", ".join(items[:limit])
    return shown + (f" (and {len(items) - limit} more)" if len(items) > limit else "")
