from __future__ import annotations

import torch

from ..anchor.adapters import lora_squared_distance
from ..anchor.parameters import SPParameters
from .kernels import sum_of_squares
from .registry import register_regularizer
from .weight import PenaltyTerms, Regularizer


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

    def __call__(self, params: SPParameters) -> PenaltyTerms:
        with torch.no_grad():
            if params.anchored:
                diffs = torch._foreach_sub([p.detach().float() for p in params.anchored_views()],
                                           [a.float() for a in params.anchors])
                distance = sum_of_squares(diffs).sqrt()
            else:
                distance = torch.zeros(())
            if params.lora:  # PEFT: the adapters' distance to the frozen base
                distance = (distance.square() + lora_squared_distance(params.lora).to(distance.device)).sqrt()
        zero = torch.zeros((), dtype=torch.float32, device=distance.device)
        return PenaltyTerms(penalty=zero, head_penalty=zero, distance=distance)
