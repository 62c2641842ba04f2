"""Feature regularizers: penalties on what the network computes on the batch, not on its weights.

A feature regularizer registers forward hooks only around the training forward (`capture`), turns what they saw
into a penalty (`penalty`), and removes the hooks on the way out. It is combined with a weight regularizer by name:
`regularizer="l2_sp+bss"`; each part keeps its own coefficient and is logged under `sp/<name>`.
"""

from __future__ import annotations

import contextlib
from typing import Any, ClassVar

from torch import Tensor, nn

from ..regularizers.registry import registrar

FEATURE_REGULARIZERS: dict[str, type[FeatureRegularizer]] = {}
register_feature_regularizer = registrar(FEATURE_REGULARIZERS, "Feature regularizer")


class FeatureRegularizer:
    """Base class. Subclasses set `formula`, `citation`, and implement `_hooks` and `penalty`."""

    name: ClassVar[str] = ""
    formula: ClassVar[str] = ""
    citation: ClassVar[str] = ""
    #: True when used alone it brings the paper's beta/2 ||w_new||^2 on the new head (DELTA does, BSS does not).
    adds_head_l2: ClassVar[bool] = False
    #: True when the penalty is a sum over the samples of the optimizer step's global batch (DELTA): the trainer then
    #: scales each micro-batch's sum by accumulation steps x processes, so that splitting the batch changes nothing.
    #: False: a per-batch statistic (BSS), averaged over the step's micro-batches like the task loss's means.
    batch_sum: ClassVar[bool] = False
    #: Its search space when it is searched (a feature penalty alone): the SPConfig fields and the default grid.
    search_fields: ClassVar[tuple[str, ...]] = ()
    search_grid: ClassVar[tuple[float, ...]] = ()

    def setup(self, trainer, model: nn.Module) -> None:
        """Called for each model the trainer anchors (at construction, and per `model_init` call): build frozen
        copies, find layers, ... `model` is the new model; `trainer.sp_reference` already holds its anchor."""

    @contextlib.contextmanager
    def capture(self, model: nn.Module):
        handles = self._hooks(model)
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _hooks(self, model: nn.Module) -> list:
        raise NotImplementedError

    def penalty(self, inputs: dict[str, Any]) -> Tensor:
        """The (differentiable, fp32) penalty for the batch just captured."""
        raise NotImplementedError

    def state_files(self) -> dict[str, dict[str, Tensor]]:
        """Tensors to save with the run and each checkpoint (file name -> tensors), e.g. attention weights."""
        return {}

    def load_state(self, folder: str) -> None:
        """Restore what `state_files` saved, from a checkpoint folder (no-op when nothing was saved)."""

    def config_dict(self) -> dict[str, Any]:
        return {"name": self.name}
