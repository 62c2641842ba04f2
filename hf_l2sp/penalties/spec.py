"""`regularizer` strings (one weight penalty, feature penalties, or both joined by '+', e.g. 'l2_sp+bss') and what
searching one means. Everything here is read from the registry."""

from __future__ import annotations

from dataclasses import dataclass

from .registry import FEATURE_REGULARIZERS, REGULARIZERS, all_names
from ..utils.errors import ConfigError


@dataclass(frozen=True)
class RegularizerSpec:
    weight: str  # the weight penalty; 'l2' with alpha=0 (head L2 only) or 'none' when only features were named
    features: tuple[str, ...]
    weight_named: bool  # False when the weight part was implied by feature penalties alone

    @property
    def label(self) -> str:
        return "+".join(([self.weight] if self.weight_named else []) + list(self.features))

    @property
    def names(self) -> tuple[str, ...]:
        """Every penalty that runs, the implied weight part included."""
        return (self.weight, *self.features)


@dataclass(frozen=True)
class SearchSpace:
    """What searching a regularizer means: the SPConfig fields one value sets, and the default grid."""

    fields: tuple[str, ...]
    grid: tuple[float, ...]

    def overrides(self, value: float | None) -> dict[str, float]:
        return {} if value is None else {name: value for name in self.fields}


def _searched(spec: str):
    """The class whose coefficient is searched: the weight penalty when one is named (`l2_sp+bss` searches alpha),
    else the first feature penalty."""
    parsed = parse_regularizer(spec)
    if parsed.weight_named or not parsed.features:
        return REGULARIZERS[parsed.weight]
    return FEATURE_REGULARIZERS[parsed.features[0]]


def search_space(spec: str) -> SearchSpace:
    owner = _searched(spec)
    return SearchSpace(tuple(owner.search_fields), tuple(owner.search_grid))


def grid_point(spec: str, value: float | None) -> dict[str, float]:
    """SPConfig fields for one grid value in the transfer study: the searched fields set to `value`, the others at
    the paper's values (`protocol_fixed`)."""
    owner = _searched(spec)
    return {**owner.protocol_fixed, **search_space(spec).overrides(value)}


def grid_parameter(spec: str) -> str:
    """A short label of what the grid varies, e.g. 'alpha', 'alpha=beta', 'delta_alpha'; '-' for nothing."""
    fields = _searched(spec).search_fields
    return "=".join(f.removeprefix("sp_") for f in fields) or "-"


def parse_regularizer(spec: str) -> RegularizerSpec:
    parts = [p.strip() for p in str(spec).split("+") if p.strip()]
    unknown = [p for p in parts if p not in REGULARIZERS and p not in FEATURE_REGULARIZERS]
    if not parts or unknown:
        raise ConfigError(f"Unknown regularizer {spec!r}. Valid choices: {', '.join(all_names())}, or one weight "
                          "penalty and feature penalties joined by '+' (e.g. 'l2_sp+bss').")
    weights = [p for p in parts if p in REGULARIZERS]
    features = tuple(p for p in parts if p in FEATURE_REGULARIZERS)
    if len(weights) > 1 or len(set(features)) != len(features):
        raise ConfigError(f"regularizer {spec!r}: at most one weight penalty ({', '.join(sorted(REGULARIZERS))}) and "
                          "each feature penalty once.")
    if weights:
        return RegularizerSpec(weights[0], features, True)
    implied = "l2" if any(FEATURE_REGULARIZERS[f].adds_head_l2 for f in features) else "none"
    return RegularizerSpec(implied, features, False)

