"""Feature regularizers: penalties on what the network computes on the batch, not on its weights.

A feature regularizer registers forward hooks only around the training forward (`capture`), turns what they saw
into a penalty (`penalty`), and removes the hooks on the way out. It is combined with a weight regularizer by name:
`regularizer="l2_sp+bss"`; each part keeps its own coefficient and is logged under `sp/<name>`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor, nn

from .base import Penalty


@dataclass
class FeatureContext:
    """What a feature penalty may use to set itself up for a model: the model's anchor, its head, the device, and
    the training batches (a callable: only penalties that need data, like DELTA's attention, iterate it)."""

    anchors: dict[str, Tensor]  # canonical name -> w0
    head_names: set[str]  # canonical names of the new head's parameters
    head_modules: list[str]  # module names of the new head
    device: Any
    train_batches: Callable[[], Iterable[dict[str, Tensor]]]


class FeatureRegularizer(Penalty):
    """Base class of the feature penalties. Subclasses set `formula`, `title`, `citation`, and implement `_hooks`
    and `penalty`; `name` is set by `@register_feature_regularizer`."""

    kind: ClassVar[str] = "feature"
    #: True when used alone it brings the paper's beta/2 ||w_new||^2 on the new head (DELTA does, BSS does not).
    adds_head_l2: ClassVar[bool] = False
    #: True when the penalty is a sum over the samples of the optimizer step's global batch (DELTA): the trainer then
    #: scales each micro-batch's sum by accumulation steps x processes, so that splitting the batch changes nothing.
    #: False: a per-batch statistic (BSS), averaged over the step's micro-batches like the task loss's means.
    batch_sum: ClassVar[bool] = False

    @property
    def active(self) -> bool:
        """False when its coefficient is 0: it is then neither computed nor hooked (it adds exactly nothing)."""
        return True

    def setup(self, model: nn.Module, context: FeatureContext) -> None:
        """Called for each model the trainer anchors (at construction, and per `model_init` call): build frozen
        copies, find layers, ... `model` is the new model and `context` its anchor, head and data."""

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
