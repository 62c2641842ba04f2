"""Small informational commands."""

from __future__ import annotations


def regularizers(_argv: list[str]) -> int:
    from ..regularizers import REGULARIZERS

    for name in sorted(REGULARIZERS):
        print(f"{name:16s} {REGULARIZERS[name].formula}")
    return 0


def version(_argv: list[str]) -> int:
    from .. import __version__

    print(__version__)
    return 0
