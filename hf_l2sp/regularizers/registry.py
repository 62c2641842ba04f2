"""Name -> regularizer class. Adding a regularizer = one module with a decorated class, imported in __init__."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .base import Regularizer

REGULARIZERS: dict[str, type[Regularizer]] = {}

_NAME = re.compile(r"^[a-z][a-z0-9]*(_[a-z0-9]+)*$")


def registrar(registry: dict, kind: str):
    """A class decorator factory that files classes in `registry` under checked, unique snake_case names."""

    def register(name: str):
        if not _NAME.match(name):
            raise ValueError(f"{kind} name {name!r} must be lower snake_case (e.g. 'l2_sp').")

        def decorate(cls):
            if name in registry and registry[name] is not cls:
                raise ValueError(f"{kind} {name!r} is already registered by {registry[name].__qualname__}.")
            cls.name = name
            registry[name] = cls
            return cls

        return decorate

    return register


#: Class decorator: make ``cls`` available as ``SPConfig(regularizer=name)``.
register_regularizer = registrar(REGULARIZERS, "Regularizer")


def list_regularizers() -> list[str]:
    return sorted(REGULARIZERS)


def get_regularizer_class(name: str) -> type[Regularizer]:
    try:
        return REGULARIZERS[name]
    except KeyError:
        raise ValueError(
            f"Unknown regularizer {name!r}. Valid choices: {', '.join(list_regularizers())}."
        ) from None
