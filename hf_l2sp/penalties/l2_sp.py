from __future__ import annotations

from torch import Tensor

from ..anchor.adapters import LoraTerm
from .weight import QuadraticForm, Regularizer
from .kernels import half_squared_distance
from .lora_distance import lora_squared_distance
from .registry import register_regularizer


@register_regularizer("l2_sp")
class L2SP(Regularizer):
    """L2-SP, the paper's recommended baseline: pull the backbone toward its pretrained values w0.

    Omega(w) = alpha/2 ||w_S - w0_S||^2 + beta/2 ||w_new||^2

    Gradient on S: alpha (w - w0); on the new head: beta w. On a LoRA adapter (W = W0 + s B A, W0 frozen) the
    distance is s B A: alpha/2 s^2 sum((B^T B) * (A A^T)), exact, without forming B A (anchor/adapters.py).
    """

    title = "L2-SP (Li, Grandvalet & Davoine, ICML 2018)"
    formula = "Omega(w) = alpha/2 * ||w_S - w0_S||^2 + beta/2 * ||w_new||^2"
    listing_order = 20
    supports_optimizer_side = True
    supports_adapters = True

    def quadratic_form(self) -> QuadraticForm:
        return QuadraticForm(self.alpha, True, None, self.beta)

    def anchored_penalty(self, params: list[Tensor], anchors: list[Tensor]) -> tuple[Tensor, Tensor]:
        value, sq_distance = half_squared_distance(params, anchors)
        return self.alpha * value, sq_distance

    def lora_penalty(self, terms: list[LoraTerm], direct: bool = False) -> tuple[Tensor, Tensor]:
        squared = lora_squared_distance(terms, direct)
        return 0.5 * self.alpha * squared, squared.detach()
