from __future__ import annotations

from torch import Tensor

from .weight import Regularizer
from .kernels import absolute_distance
from .registry import register_regularizer


@register_regularizer("l1_sp")
class L1SP(Regularizer):
    """L1-SP: an L1 pull toward w0, which lets some coordinates stay exactly at their pretrained value.

    Omega(w) = alpha ||w_S - w0_S||_1 + beta/2 ||w_new||^2

    Gradient on S: alpha sign(w - w0) (0 where w = w0).
    """

    title = "L1-SP (Li, Grandvalet & Davoine, ICML 2018)"
    formula = "Omega(w) = alpha * ||w_S - w0_S||_1 + beta/2 * ||w_new||^2"
    listing_order = 30
    search_grid = (1e-4, 1e-3, 1e-2)

    def anchored_penalty(self, params: list[Tensor], anchors: list[Tensor]) -> tuple[Tensor, Tensor]:
        value, sq_distance = absolute_distance(params, anchors)
        return self.alpha * value, sq_distance
