"""Small informational commands."""

from __future__ import annotations


def regularizers(_argv: list[str]) -> int:
    from ..penalties import registered

    for cls in registered():
        combine = f"   (combine: l2_sp+{cls.name})" if cls.kind == "feature" else ""
        print(f"{cls.name:16s} {cls.formula}{combine}")
    return 0


def version(_argv: list[str]) -> int:
    from ..utils.version import __version__

    print(__version__)
    return 0
