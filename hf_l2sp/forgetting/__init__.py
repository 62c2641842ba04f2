"""What fine-tuning forgets: retention sets measured against the starting model at every evaluation."""

from .measures import linear_cka
from .plan import MEASURES, RetentionPlan

__all__ = ["MEASURES", "RetentionPlan", "linear_cka"]
