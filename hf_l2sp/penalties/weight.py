"""What every weight penalty shares: alpha and beta, the head term, and the output it hands the trainer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor

from .base import Penalty, check_coefficient
from .kernels import half_squared_distance, squared_distance
from .lora_distance import lora_squared_distance

if TYPE_CHECKING:
    from ..anchor.adapters import LoraTerm
    from ..anchor.parameters import SPParameters


def distance_to_anchor(params: SPParameters) -> Tensor:
    """||w_S - w0_S||_2 over the anchored tensors and the LoRA adapters, without a graph (for the logs)."""
    with torch.no_grad():
        squared = squared_distance(params.anchored_views(), params.anchors)
        if params.lora:
            squared = squared + lora_squared_distance(params.lora).to(squared.device)
    return squared.sqrt()


@dataclass
class QuadraticForm:
    """Omega restricted to a quadratic: coef/2 * sum c (w - a)^2 on anchored tensors (a = w0, or 0 for plain L2;
    c = per-element weights or 1) plus beta/2 ||w_new||^2. Its gradient is closed-form: coef * c * (w - a)."""

    coef: float
    use_anchors: bool
    weights: list[Tensor] | None
    head_coef: float


@dataclass
class PenaltyTerms:
    """One evaluation of a regularizer.

    penalty: the whole Omega(w) (differentiable, fp32, 0-dim); head_penalty: its beta/2 ||w_new||^2 part
    (detached); distance: ||w_S - w0_S||_2 over the anchored tensors (detached).
    """

    penalty: Tensor
    head_penalty: Tensor
    distance: Tensor


class Regularizer(Penalty):
    """Base class of the weight penalties. Omega(w) = anchored_penalty(w_S, w0_S) + beta/2 ||w_new||^2.

    Subclasses set ``formula`` and ``title`` and implement ``anchored_penalty``; see `base.Penalty` for what else a
    class declares (search grid, config rules). ``name`` is set by ``@register_regularizer``.
    """

    kind: ClassVar[str] = "weight"
    coefficient_fields: ClassVar[tuple[str, ...]] = ("sp_alpha", "sp_beta")
    #: True when the penalty pulls toward the pretrained weights (then optimizer weight decay fights it).
    pulls_to_source: ClassVar[bool] = True
    #: True when `quadratic_form()` describes it, so sp_mode 'grad' and 'decoupled' can apply it in closed form.
    supports_optimizer_side: ClassVar[bool] = False
    #: Scales differ on purpose, e.g. an L1 pull alpha*sign(w - w0) is far stronger than alpha*(w - w0) at equal alpha.
    search_fields: ClassVar[tuple[str, ...]] = ("sp_alpha",)
    search_grid: ClassVar[tuple[float, ...]] = (1e-2, 1e-1, 1.0)
    #: The paper's L2 on the new head, held while the study searches alpha.
    protocol_fixed: ClassVar[dict[str, float]] = {"sp_beta": 0.01}
    #: True when `lora_penalty` is exact on LoRA factors without forming B A (anchor/adapters.py).
    supports_adapters: ClassVar[bool] = False

    def __init__(self, alpha: float = 0.0, beta: float = 0.0):
        self.alpha = check_coefficient("sp_alpha", alpha)
        self.beta = check_coefficient("sp_beta", beta)

    @classmethod
    def from_config(cls, args) -> Regularizer:
        return cls(alpha=args.sp_alpha, beta=args.sp_beta)

    @property
    def active(self) -> bool:
        """False when every coefficient is 0: Omega is then exactly 0 and is not computed (no 0 x inf = NaN)."""
        return self.alpha != 0.0 or self.beta != 0.0

    def prepare(self, params: SPParameters) -> None:
        """Called once each time the trainer (re)resolves the parameter sets; validate and cache per-tensor state."""

    def anchored_penalty(self, params: list[Tensor], anchors: list[Tensor]) -> tuple[Tensor, Tensor]:
        """(differentiable penalty on S, squared distance ||w_S - w0_S||^2 detached)."""
        raise NotImplementedError

    def lora_penalty(self, terms: list[LoraTerm], direct: bool = False) -> tuple[Tensor, Tensor]:
        """(differentiable penalty on the adapters' W - W0, its squared Frobenius norm detached). `direct`: the
        gradient may be added to the factors' `.grad` after the backward pass instead of returned to autograd."""
        raise NotImplementedError(f"{self.name} has no exact form on LoRA adapters")

    def quadratic_form(self) -> QuadraticForm | None:
        """The closed-form description when Omega is quadratic (used by sp_mode 'grad' and 'decoupled')."""
        return None

    def __call__(self, params: SPParameters) -> PenaltyTerms:
        """Omega on this process's tensors (under FSDP2: on its shards; the parts then sum over ranks). A part whose
        coefficient is 0 is not computed: it adds exactly 0, whatever the weights (an overflow included)."""
        if not self.alpha:
            distance_only = distance_to_anchor(params)
            anchored, sq_distance = torch.zeros((), device=distance_only.device), distance_only.square()
        else:
            anchored, sq_distance = self.anchored_penalty(params.anchored_views(), params.anchors)
            if params.lora:  # PEFT: the adapters' distance to the frozen base, from the factors
                adapter_value, adapter_sq = self.lora_penalty(params.lora, params.direct_gradients)
                anchored, sq_distance = anchored + adapter_value.to(anchored.device), sq_distance + adapter_sq.to(
                    sq_distance.device)
        head = self.beta * half_squared_distance(params.head_views())[0] if self.beta else torch.zeros(
            (), device=anchored.device)
        return PenaltyTerms(penalty=anchored + head.to(anchored.device), head_penalty=head.detach(),
                            distance=sq_distance.sqrt())

    def config_dict(self) -> dict[str, Any]:
        return {"name": self.name, "alpha": self.alpha, "beta": self.beta}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v}" for k, v in self.config_dict().items() if k != "name")
        return f"{type(self).__name__}({args})"
