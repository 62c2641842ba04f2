"""hf_l2sp: the explicit inductive bias of Li, Grandvalet & Davoine (ICML 2018) for Hugging Face fine-tuning.

Public API: `SPTrainer`, `SPConfig`, the regularizer registry (`REGULARIZERS`, `register_regularizer`,
`get_regularizer_class`, `list_regularizers`, the `Regularizer` base class), `Reference` (the anchor w0), the
loaders (`load_backbone`, `load_image_dataset`, transforms, collator, metrics) and the Fisher-file helpers.
"""

from importlib.metadata import PackageNotFoundError, version

from .config import SPConfig
from .data import DataArguments, build_transforms, collate_images, load_image_dataset, with_transforms
from .fisher import estimate_fisher
from .fisher_io import FisherDiagonal, load_fisher, save_fisher
from .metrics import compute_metrics
from .modeling import BackboneReport, data_config_of, load_backbone
from .reference import Reference
from .regularizers import (
    REGULARIZERS,
    PenaltyTerms,
    Regularizer,
    get_regularizer_class,
    list_regularizers,
    register_regularizer,
)
from .trainer import SPTrainer
from .tuning import compare, load_recipe, search

try:
    __version__ = version("hf_l2sp")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+local"

__all__ = [
    "compare",
    "load_recipe",
    "search",
    "REGULARIZERS",
    "BackboneReport",
    "DataArguments",
    "build_transforms",
    "collate_images",
    "compute_metrics",
    "data_config_of",
    "estimate_fisher",
    "load_backbone",
    "load_image_dataset",
    "with_transforms",
    "FisherDiagonal",
    "PenaltyTerms",
    "Reference",
    "Regularizer",
    "SPConfig",
    "SPTrainer",
    "__version__",
    "get_regularizer_class",
    "list_regularizers",
    "load_fisher",
    "register_regularizer",
    "save_fisher",
]
