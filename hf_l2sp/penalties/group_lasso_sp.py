from __future__ import annotations

import math

import torch
from torch import Tensor

from ..anchor.adapters import LoraTerm
from .kernels import group_distance
from .weight import Regularizer
from .registry import register_regularizer


@register_regularizer("group_lasso_sp")
class GroupLassoSP(Regularizer):
    """Group-Lasso-SP: one group per output channel, pulled toward w0 as a block.

    Omega(w) = alpha sum_g sqrt(p_g) ||w_g - w0_g||_2 + beta/2 ||w_new||^2

    A group g is one slice of a tensor along dim 0 (the fan-in of one filter: in x kh x kw elements for a conv
    weight, in_features for a linear weight, a single element for a 1-D tensor), p_g its element count.
    The norm's gradient at w_g = w0_g is taken as 0 (the subgradient PyTorch uses). On a LoRA adapter
    (W - W0 = s B A) row g's norm is s sqrt(B_g (A A^T) B_g^T): exact at O(out r^2 + r^2 in), B A never formed.
    """

    title = "Group-Lasso-SP (Li, Grandvalet & Davoine, ICML 2018)"
    listing_order = 40
    formula = "Omega(w) = alpha * sum_g sqrt(p_g) * ||w_g - w0_g||_2 + beta/2 * ||w_new||^2, g = output channels"
    search_grid = (1e-3, 1e-2, 1e-1)
    supports_adapters = True
    #: Its groups are rows of the stored tensor: undefined on a tensor transformers fused from several.
    groups_rows = True

    def anchored_penalty(self, params: list[Tensor], anchors: list[Tensor]) -> tuple[Tensor, Tensor]:
        value, sq_distance = group_distance(params, anchors)
        return self.alpha * value, sq_distance

    def lora_penalty(self, terms: list[LoraTerm], direct: bool = False) -> tuple[Tensor, Tensor]:
        total, squared = [], []
        for term in terms:
            rows = term.row_squared_norms()  # (out,)
            positive = rows > 0  # at a zero row (LoRA starts with B = 0) the subgradient is 0, as for plain tensors
            norms = torch.where(positive, rows, torch.ones_like(rows)).sqrt() * positive
            group_size = term.base_weight[0].numel()  # p_g: the elements of one dim-0 slice of the stored W
            total.append(math.sqrt(group_size) * norms.sum())
            squared.append(rows.detach().sum())
        return self.alpha * torch.stack(total).sum(), torch.stack(squared).sum()
