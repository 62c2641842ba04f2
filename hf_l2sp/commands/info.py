"""Small informational commands."""

from __future__ import annotations


def regularizers(_argv: list[str]) -> int:
    from ..features import FEATURE_REGULARIZERS
    from ..regularizers import REGULARIZERS

    for name in sorted(REGULARIZERS):
        print(f"{name:16s} {REGULARIZERS[name].formula}")
    for name in sorted(FEATURE_REGULARIZERS):
        print(f"{name:16s} {FEATURE_REGULARIZERS[name].formula}   (combine: l2_sp+{name})")
    return 0


def version(_argv: list[str]) -> int:
    from .. import __version__

    print(__version__)
    return 0
