"""hf_l2sp: the explicit inductive bias of Li, Grandvalet & Davoine (ICML 2018) for Hugging Face fine-tuning.

Public API: `SPTrainer`, `SPConfig`, `SPMixin` and `SPArguments` (for any Trainer subclass, e.g. TRL's), the
regularizer registry (`REGULARIZERS`, `register_regularizer`, `register_feature_regularizer`,
`get_regularizer_class`, `list_regularizers`, the `Regularizer` base class), `Reference` (the anchor w0), the
loaders (`load_backbone`, `load_image_dataset`, transforms, collator, metrics) and the Fisher-file helpers.

Each name is imported when first used (`from hf_l2sp import SPTrainer` imports the trainer and transformers;
`import hf_l2sp` alone imports neither), so the command line answers `--help` and `version` at once.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from .utils.version import __version__

#: Exported name -> the module that defines it, layer by layer in the order data flows (docs/development.md).
_EXPORTS = {
    "DataArguments": ".loading.data", "load_evaluation_split": ".loading.data", "load_image_dataset": ".loading.data",
    "compute_metrics": ".loading.metrics",
    "BackboneReport": ".loading.models", "data_config_of": ".loading.models", "load_backbone": ".loading.models",
    "build_transforms": ".loading.transforms", "collate_images": ".loading.transforms",
    "with_transforms": ".loading.transforms",
    "estimate_fisher": ".anchor.fisher",
    "FisherDiagonal": ".anchor.fisher_io", "load_fisher": ".anchor.fisher_io", "save_fisher": ".anchor.fisher_io",
    "Reference": ".anchor.reference",
    "REGULARIZERS": ".penalties", "PenaltyTerms": ".penalties", "Regularizer": ".penalties",
    "get_regularizer_class": ".penalties", "list_regularizers": ".penalties",
    "register_feature_regularizer": ".penalties", "register_regularizer": ".penalties",
    "SPArguments": ".training.config", "SPConfig": ".training.config",
    "SPMixin": ".artefacts.trainer", "SPTrainer": ".artefacts.trainer",
    "load_recipe": ".pipeline.options",
    "compare": ".tuning", "search": ".tuning",
}

__all__ = sorted([*_EXPORTS, "__version__"])


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'hf_l2sp' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # imported once
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


if TYPE_CHECKING:  # what static tools (type checkers, the API docs) read
    from .anchor.fisher import estimate_fisher
    from .anchor.fisher_io import FisherDiagonal, load_fisher, save_fisher
    from .anchor.reference import Reference
    from .artefacts.trainer import SPMixin, SPTrainer
    from .loading.data import DataArguments, load_evaluation_split, load_image_dataset
    from .loading.metrics import compute_metrics
    from .loading.models import BackboneReport, data_config_of, load_backbone
    from .loading.transforms import build_transforms, collate_images, with_transforms
    from .penalties import (REGULARIZERS, PenaltyTerms, Regularizer, get_regularizer_class, list_regularizers,
                            register_feature_regularizer, register_regularizer)
    from .pipeline.options import load_recipe
    from .training.config import SPArguments, SPConfig
    from .tuning import compare, search
