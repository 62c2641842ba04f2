"""Feature regularizers (DELTA, BSS), composable with the weight penalties: `regularizer="l2_sp+bss"`."""

from . import bss, delta  # noqa: F401  (registration side effect)
from .base import FEATURE_REGULARIZERS, FeatureRegularizer, register_feature_regularizer
from .bss import BatchSpectralShrinkage
from .delta import DELTA

__all__ = ["DELTA", "FEATURE_REGULARIZERS", "BatchSpectralShrinkage", "FeatureRegularizer",
           "register_feature_regularizer"]
