"""hf_l2sp: the explicit inductive bias of Li, Grandvalet & Davoine (ICML 2018) for Hugging Face fine-tuning.

Public API: `SPTrainer`, `SPConfig`, `SPMixin` and `SPArguments` (for any Trainer subclass, e.g. TRL's), the
regularizer registry (`REGULARIZERS`, `register_regularizer`, `register_feature_regularizer`,
`get_regularizer_class`, `list_regularizers`, the `Regularizer` base class), `Reference` (the anchor w0), the
loaders (`load_backbone`, `load_image_dataset`, transforms, collator, metrics) and the Fisher-file helpers.
"""

# Layer by layer, in the order data flows (see docs/development.md).
from .loading.data import DataArguments, load_evaluation_split, load_image_dataset
from .loading.metrics import compute_metrics
from .loading.models import BackboneReport, data_config_of, load_backbone
from .loading.transforms import build_transforms, collate_images, with_transforms
from .anchor.fisher import estimate_fisher
from .anchor.fisher_io import FisherDiagonal, load_fisher, save_fisher
from .anchor.reference import Reference
from .penalties import (
    REGULARIZERS,
    PenaltyTerms,
    Regularizer,
    get_regularizer_class,
    list_regularizers,
    register_feature_regularizer,
    register_regularizer,
)
from .training.config import SPArguments, SPConfig
from .artefacts.trainer import SPMixin, SPTrainer
from .pipeline.options import load_recipe
from .tuning import compare, search
from .utils.version import __version__

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
    "load_evaluation_split",
    "with_transforms",
    "FisherDiagonal",
    "PenaltyTerms",
    "Reference",
    "Regularizer",
    "SPArguments",
    "SPConfig",
    "SPMixin",
    "SPTrainer",
    "__version__",
    "get_regularizer_class",
    "list_regularizers",
    "load_fisher",
    "register_feature_regularizer",
    "register_regularizer",
    "save_fisher",
]
