"""Hyperparameter search and paired comparisons of regularizers, on one resumable run engine (`study` uses it too)."""

from .compare import compare
from .engine import Trial, run_trial, run_trials
from .search import search


__all__ = ["Trial", "compare", "run_trial", "run_trials", "search"]
