"""Penalties: the paper's weight penalties (one module each) and the feature penalties DELTA and BSS.

Importing this package imports each of its modules, which registers every decorated class by name: a new penalty
that uses the existing coefficients (sp_alpha, sp_beta, ...) is one module here (and its test), nothing else. A
penalty with a coefficient of its own also needs that field declared in `SPArguments` (training/config.py), since
a dataclass's fields cannot come from a registry; its `coefficient_fields` then names it.
"""

import importlib
import pkgutil

from .base import Penalty
from .feature import FeatureContext, FeatureRegularizer
from .registry import (
    FEATURE_REGULARIZERS,
    REGULARIZERS,
    all_names,
    get_penalty_class,
    get_regularizer_class,
    list_regularizers,
    register_feature_regularizer,
    register_regularizer,
    registered,
)
from .weight import PenaltyTerms, QuadraticForm, Regularizer

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "FEATURE_REGULARIZERS",
    "REGULARIZERS",
    "FeatureContext",
    "FeatureRegularizer",
    "Penalty",
    "PenaltyTerms",
    "QuadraticForm",
    "Regularizer",
    "all_names",
    "get_penalty_class",
    "get_regularizer_class",
    "list_regularizers",
    "register_feature_regularizer",
    "register_regularizer",
    "registered",
]
