from __future__ import annotations

from typing import Any

from torch import Tensor

from ..anchor.fisher_io import FisherDiagonal, load_fisher
from ..anchor.parameters import SPParameters, local_anchor
from .weight import QuadraticForm, Regularizer
from .kernels import half_squared_distance
from .registry import register_regularizer
from ..utils.errors import ConfigError


@register_regularizer("l2_sp_fisher")
class L2SPFisher(Regularizer):
    """L2-SP weighted by the diagonal Fisher information of the source model at w0 (EWC-style).

    Omega(w) = alpha/2 sum_{j in S} F_j (w_j - w0_j)^2 + beta/2 ||w_new||^2

    F_j = (1/m) sum_i sum_k p_k(x_i) (d log p_k(x_i) / d w_j)^2, estimated on source data at w0 with the source
    head. F is used raw (as in the paper) unless the file says it was normalized. Every anchored tensor needs an
    entry of the same shape in the Fisher file; extra entries (e.g. the source head) are ignored.
    """

    title = "L2-SP-Fisher (Li, Grandvalet & Davoine, ICML 2018)"
    formula = "Omega(w) = alpha/2 * sum_j F_j (w_j - w0_j)^2 + beta/2 * ||w_new||^2"
    listing_order = 50
    supports_optimizer_side = True
    # For a Fisher normalised to mean 1: its entries are extremely skewed (Lite0: median 0, max 6e4 x the mean), and
    # SGD on alpha/2 F (w - w0)^2 diverges once lr * alpha * max F > 2, hence a grid lower than l2_sp's.
    search_grid = (1e-4, 1e-3, 1e-2)

    def __init__(self, alpha: float = 0.0, beta: float = 0.0, fisher: FisherDiagonal | None = None):
        super().__init__(alpha, beta)
        if fisher is None:
            raise ConfigError("l2_sp_fisher needs a Fisher diagonal: set sp_fisher to a Fisher file or Hub repo.")
        self.fisher = fisher
        self._weights: list[Tensor] | None = None

    @classmethod
    def check_config(cls, args, selected: bool) -> None:
        if selected and not args.sp_fisher:
            raise ConfigError("regularizer='l2_sp_fisher' needs sp_fisher: a Fisher-diagonal file, folder or Hub repo "
                              "(estimate one with `hf-l2sp fisher`).")
        if args.sp_fisher and not selected:
            raise ConfigError(f"sp_fisher is only used by regularizer='l2_sp_fisher', not {args.regularizer!r}; "
                              "remove sp_fisher or switch the regularizer.")

    @classmethod
    def from_config(cls, args) -> L2SPFisher:
        return cls(alpha=args.sp_alpha, beta=args.sp_beta, fisher=load_fisher(args.sp_fisher))

    def prepare(self, params: SPParameters) -> None:
        shapes = [p.shape if rows is None else (rows, *p.shape[1:]) for p, _, rows in params.anchored_entries()]
        full = self.fisher.aligned_to(params.anchored_keys, shapes,
                                      device=params.anchors[0].device if params.anchors else None)
        self._weights = [local_anchor(w, p) for w, p in zip(full, params.anchored)]  # FSDP2: this rank's shard

    def quadratic_form(self) -> QuadraticForm:
        return QuadraticForm(self.alpha, True, self._weights, self.beta)

    def anchored_penalty(self, params: list[Tensor], anchors: list[Tensor]) -> tuple[Tensor, Tensor]:
        if self._weights is None:
            raise RuntimeError("L2SPFisher.prepare() must run before the penalty is evaluated.")
        value, sq_distance = half_squared_distance(params, anchors, self._weights)
        return self.alpha * value, sq_distance

    def config_dict(self) -> dict[str, Any]:
        return {**super().config_dict(), "fisher": self.fisher.source}


__all__ = ["L2SPFisher"]
