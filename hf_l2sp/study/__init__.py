"""The transfer study behind `hf-l2sp study`: every regularizer on real pretrained weights and real offline data."""

from .protocol import REGULARIZERS, FisherPlan, Schedule, Setting, SourcePretraining, StudyPlan, full_plan, quick_plan
from .report import write_report
from .runner import Study

__all__ = ["REGULARIZERS", "FisherPlan", "Schedule", "Setting", "SourcePretraining", "Study", "StudyPlan",
           "full_plan", "quick_plan", "write_report"]
