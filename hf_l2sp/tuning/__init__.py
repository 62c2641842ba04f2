"""Hyperparameter search and paired comparisons of regularizers, on one resumable run engine (`study` uses it too)."""

from .compare import compare
from .engine import Trial, run_trial, run_trials
from .search import search


def load_recipe(name_or_path: str) -> dict:
    """A recipe as the options mapping `search`, `compare` and `hf-l2sp train --config` take (a path, or a
    packaged recipe's name such as 'offline_lite0_digits_l2sp')."""
    from ..argparsing import read_recipe
    from ..commands.train import ARGUMENT_TYPES

    return dict(read_recipe(name_or_path, ARGUMENT_TYPES))


__all__ = ["Trial", "compare", "load_recipe", "run_trial", "run_trials", "search"]
