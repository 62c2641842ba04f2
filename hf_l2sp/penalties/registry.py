"""The one registry of penalties: name -> class, for weight penalties (`REGULARIZERS`) and feature penalties
(`FEATURE_REGULARIZERS`). Names are unique across both. The package imports every module of `hf_l2sp.penalties`,
so a decorated class in a new module is registered without touching any other file."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from ..utils.errors import ConfigError

if TYPE_CHECKING:
    from .base import Penalty

REGULARIZERS: dict[str, type] = {}
FEATURE_REGULARIZERS: dict[str, type] = {}

_NAME = re.compile(r"^[a-z][a-z0-9]*(_[a-z0-9]+)*$")


def _register(registry: dict, kind: str, name: str):
    if not _NAME.match(name):
        raise ConfigError(f"Penalty name {name!r} must be lower snake_case (e.g. 'l2_sp').")

    def decorate(cls):
        if getattr(cls, "kind", None) != kind:
            raise TypeError(f"{cls.__qualname__} is registered as a {kind} penalty but is a {cls.kind or 'plain'} "
                            "class; subclass Regularizer (weight) or FeatureRegularizer (feature).")
        if not cls.formula:
            raise ConfigError(f"{cls.__qualname__} ({name!r}) must set `formula`.")
        if bool(cls.search_fields) != bool(cls.search_grid):
            raise ConfigError(f"{cls.__qualname__} ({name!r}): search_fields and search_grid go together.")
        owner = REGULARIZERS.get(name) or FEATURE_REGULARIZERS.get(name)
        if owner is not None and owner is not cls:
            raise ConfigError(f"Penalty {name!r} is already registered by {owner.__qualname__}.")
        cls.name = name
        registry[name] = cls
        return cls

    return decorate


def register_regularizer(name: str):
    """Class decorator: a weight penalty, usable as `SPConfig(regularizer=name)`."""
    return _register(REGULARIZERS, "weight", name)


def register_feature_regularizer(name: str):
    """Class decorator: a feature penalty, usable alone or as `SPConfig(regularizer="l2_sp+" + name)`."""
    return _register(FEATURE_REGULARIZERS, "feature", name)


def registered() -> list[type[Penalty]]:
    """Every penalty class, weight and feature, in listing order."""
    classes = [*REGULARIZERS.values(), *FEATURE_REGULARIZERS.values()]
    return sorted(classes, key=lambda cls: (cls.listing_order, cls.name))


def all_names() -> list[str]:
    return [cls.name for cls in registered()]


def get_penalty_class(name: str) -> type[Penalty]:
    cls = REGULARIZERS.get(name) or FEATURE_REGULARIZERS.get(name)
    if cls is None:
        raise ConfigError(f"Unknown penalty {name!r}. Valid choices: {', '.join(all_names())}.")
    return cls


def list_regularizers() -> list[str]:
    return sorted(REGULARIZERS)


def get_regularizer_class(name: str) -> type:
    try:
        return REGULARIZERS[name]
    except KeyError:
        raise ConfigError(
            f"Unknown regularizer {name!r}. Valid choices: {', '.join(list_regularizers())}."
        ) from None
