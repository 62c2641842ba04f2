"""The penalties of Li et al. (ICML 2018), each registered by name. Importing this package registers them all."""

from . import group_lasso_sp, l1_sp, l2, l2_sp, l2_sp_fisher, none  # noqa: F401  (registration side effect)
from .base import PenaltyTerms, Regularizer
from .group_lasso_sp import GroupLassoSP
from .l1_sp import L1SP
from .l2 import L2
from .l2_sp import L2SP
from .l2_sp_fisher import L2SPFisher
from .none import NoRegularizer
from .registry import REGULARIZERS, get_regularizer_class, list_regularizers, register_regularizer

__all__ = [
    "REGULARIZERS",
    "GroupLassoSP",
    "L1SP",
    "L2",
    "L2SP",
    "L2SPFisher",
    "NoRegularizer",
    "PenaltyTerms",
    "Regularizer",
    "get_regularizer_class",
    "list_regularizers",
    "register_regularizer",
]
