from __future__ import annotations

from torch import Tensor

from .weight import QuadraticForm, Regularizer
from .kernels import half_squared_distance
from .registry import register_regularizer


@register_regularizer("l2_sp")
class L2SP(Regularizer):
    """L2-SP, the paper's recommended baseline: pull the backbone toward its pretrained values w0.

    Omega(w) = alpha/2 ||w_S - w0_S||^2 + beta/2 ||w_new||^2

    Gradient on S: alpha (w - w0); on the new head: beta w.
    """

    title = "L2-SP (Li, Grandvalet & Davoine, ICML 2018)"
    formula = "Omega(w) = alpha/2 * ||w_S - w0_S||^2 + beta/2 * ||w_new||^2"
    listing_order = 20
    supports_optimizer_side = True

    def quadratic_form(self) -> QuadraticForm:
        return QuadraticForm(self.alpha, True, None, self.beta)

    def anchored_penalty(self, params: list[Tensor], anchors: list[Tensor]) -> tuple[Tensor, Tensor]:
        value, sq_distance = half_squared_distance(params, anchors)
        return self.alpha * value, sq_distance
