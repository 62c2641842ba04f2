from __future__ import annotations

import torch

from ..anchor.parameters import SPParameters
from .registry import register_regularizer
from .weight import PenaltyTerms, Regularizer, distance_to_anchor


@register_regularizer("none")
class NoRegularizer(Regularizer):
    """Plain fine-tuning: Omega(w) = 0. ``sp_alpha``/``sp_beta`` are ignored; ``sp/distance`` is still logged."""

    title = "no regularization (plain fine-tuning)"
    formula = "Omega(w) = 0"
    listing_order = 0
    pulls_to_source = False
    search_fields = ()  # nothing to search: one configuration
    search_grid = ()
    protocol_fixed = {"sp_alpha": 0.0, "sp_beta": 0.0}
    supports_adapters = True

    @property
    def active(self) -> bool:
        return False

    def __call__(self, params: SPParameters) -> PenaltyTerms:
        distance = distance_to_anchor(params)
        zero = torch.zeros((), dtype=torch.float32, device=distance.device)
        return PenaltyTerms(penalty=zero, head_penalty=zero, distance=distance)
