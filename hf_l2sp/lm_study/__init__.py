"""The language-model forgetting study behind `hf-l2sp lm-study`: real pretrained weights and real text, offline."""

from .plan import Budget, LMStudyPlan, Method, full_plan, quick_plan
from .report import write_report
from .runner import LMStudy
from .sources import build_base, build_corpora
from .texts import Corpora

__all__ = ["Budget", "Corpora", "LMStudy", "LMStudyPlan", "Method", "build_base", "build_corpora", "full_plan",
           "quick_plan", "write_report"]
