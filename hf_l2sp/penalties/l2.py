from __future__ import annotations

from torch import Tensor

from .weight import QuadraticForm, Regularizer
from .kernels import half_squared_distance
from .registry import register_regularizer


@register_regularizer("l2")
class L2(Regularizer):
    """Weight decay toward zero, the paper's baseline.

    Omega(w) = alpha/2 ||w_S||^2 + beta/2 ||w_new||^2

    S: tensors with a pretrained counterpart; new: the re-initialised head. Sums run over elements.
    """

    title = "L2 weight decay (the paper's baseline)"
    formula = "Omega(w) = alpha/2 * ||w_S||^2 + beta/2 * ||w_new||^2"
    listing_order = 10
    supports_optimizer_side = True
    pulls_to_source = False
    search_fields = ("sp_alpha", "sp_beta")  # plain weight decay: one coefficient on every weight, head included
    search_grid = (1e-3, 1e-2, 1e-1)
    protocol_fixed = {}

    def quadratic_form(self) -> QuadraticForm:
        return QuadraticForm(self.alpha, False, None, self.beta)

    def anchored_penalty(self, params: list[Tensor], anchors: list[Tensor]) -> tuple[Tensor, Tensor]:
        value, _ = half_squared_distance(params)
        # The anchors are only read for the logged distance.
        _, sq_distance = half_squared_distance([p.detach() for p in params], anchors)
        return self.alpha * value, sq_distance
