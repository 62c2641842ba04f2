"""`regularizer` strings: one weight penalty, feature penalties, or both joined by '+' (e.g. 'l2_sp+bss')."""

from __future__ import annotations

from dataclasses import dataclass

from .features import FEATURE_REGULARIZERS
from .regularizers import REGULARIZERS


@dataclass(frozen=True)
class RegularizerSpec:
    weight: str  # the weight penalty; 'l2' with alpha=0 (head L2 only) or 'none' when only features were named
    features: tuple[str, ...]
    weight_named: bool  # False when the weight part was implied by feature penalties alone

    @property
    def label(self) -> str:
        return "+".join(([self.weight] if self.weight_named else []) + list(self.features))


@dataclass(frozen=True)
class SearchSpace:
    """What searching a regularizer means: the SPConfig fields one value sets, and the default grid."""

    fields: tuple[str, ...]
    grid: tuple[float, ...]

    def overrides(self, value: float | None) -> dict[str, float]:
        return {} if value is None else {name: value for name in self.fields}


def search_space(spec: str) -> SearchSpace:
    """The weight penalty's space when one is named (`l2_sp+bss` searches alpha), else the first feature's."""
    parsed = parse_regularizer(spec)
    if parsed.weight_named or not parsed.features:
        owner = REGULARIZERS[parsed.weight]
    else:
        owner = FEATURE_REGULARIZERS[parsed.features[0]]
    return SearchSpace(tuple(owner.search_fields), tuple(owner.search_grid))


def all_names() -> list[str]:
    return sorted(REGULARIZERS) + sorted(FEATURE_REGULARIZERS)


def parse_regularizer(spec: str) -> RegularizerSpec:
    parts = [p.strip() for p in str(spec).split("+") if p.strip()]
    unknown = [p for p in parts if p not in REGULARIZERS and p not in FEATURE_REGULARIZERS]
    if not parts or unknown:
        raise ValueError(f"Unknown regularizer {spec!r}. Valid choices: {', '.join(all_names())}, or one weight "
                         "penalty and feature penalties joined by '+' (e.g. 'l2_sp+bss').")
    weights = [p for p in parts if p in REGULARIZERS]
    features = tuple(p for p in parts if p in FEATURE_REGULARIZERS)
    if len(weights) > 1 or len(set(features)) != len(features):
        raise ValueError(f"regularizer {spec!r}: at most one weight penalty ({', '.join(sorted(REGULARIZERS))}) and "
                         "each feature penalty once.")
    if weights:
        return RegularizerSpec(weights[0], features, True)
    implied = "l2" if any(FEATURE_REGULARIZERS[f].adds_head_l2 for f in features) else "none"
    return RegularizerSpec(implied, features, False)
