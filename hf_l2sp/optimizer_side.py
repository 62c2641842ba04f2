"""Quadratic penalties applied in the optimizer step instead of through the loss (`sp_mode`).

    grad       .grad += coef * c * (w - a)       once per optimizer step, the exact gradient of Omega (equal to
               sp_mode='loss'); the logged value is computed without a graph.
    decoupled  w <- w - lr * coef * c * (w - a)  before the optimizer's own update, as AdamW decouples weight
               decay: Adam's per-coordinate scaling no longer rescales the pull toward w0 (cf. RecAdam's update).
               A different method from the paper's coupled penalty; equal to it for plain SGD without momentum.

`a` is w0 (or 0 for plain L2) and `c` the Fisher weights (or 1); the new head gets beta the same way. The hook is
a step pre-hook of the torch optimizer, so under fp16 it runs after the gradient scaler has unscaled the
gradients, and is skipped with the step when they overflowed.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .parameters import SPParameters
from .regularizers.base import QuadraticForm

SP_MODES = ("loss", "grad", "decoupled")


def _pull(params: list[Tensor], anchors: list[Tensor] | None, weights: list[Tensor] | None) -> list[Tensor]:
    """c * (w - a) in fp32 (new tensors)."""
    p32 = [p.detach().float() for p in params]
    out = torch._foreach_sub(p32, anchors) if anchors is not None else [t.clone() for t in p32]
    if weights is not None:
        torch._foreach_mul_(out, weights)
    return out


class OptimizerSidePenalty:
    """Applies a `QuadraticForm` to the parameters of each optimizer param group, once per optimizer step."""

    def __init__(self, mode: str, form: QuadraticForm, params: SPParameters):
        if mode not in ("grad", "decoupled"):
            raise ValueError(f"OptimizerSidePenalty mode must be 'grad' or 'decoupled', got {mode!r}.")
        self.mode, self.form = mode, form
        self._anchored = {id(p): (p, a, w) for p, a, w in zip(
            params.anchored, params.anchors, form.weights or [None] * len(params.anchored))}
        self._head = {id(p): p for p in params.head}
        self._groups: list[tuple] | None = None

    def attach(self, optimizer: torch.optim.Optimizer):
        return optimizer.register_step_pre_hook(self._hook)

    def _split(self, optimizer) -> list[tuple]:
        groups = []
        for group in optimizer.param_groups:
            anchored = [self._anchored[id(p)] for p in group["params"] if id(p) in self._anchored]
            head = [self._head[id(p)] for p in group["params"] if id(p) in self._head]
            groups.append((group, anchored, head))
        return groups

    @torch.no_grad()
    def _hook(self, optimizer, _args, _kwargs) -> None:
        if self._groups is None:
            self._groups = self._split(optimizer)
        form = self.form
        for group, anchored, head in self._groups:
            terms = []
            if anchored and form.coef:
                params = [p for p, _, _ in anchored]
                anchors = [a for _, a, _ in anchored] if form.use_anchors else None
                weights = [w for _, _, w in anchored] if form.weights is not None else None
                terms.append((params, _pull(params, anchors, weights), form.coef))
            if head and form.head_coef:
                terms.append((head, _pull(head, None, None), form.head_coef))
            for params, pull, coef in terms:
                if self.mode == "grad":
                    self._add_to_grad(params, pull, coef)
                else:
                    torch._foreach_mul_(pull, -group["lr"] * coef)
                    for p, d in zip(params, pull):
                        p.add_(d.to(p.dtype))

    @staticmethod
    def _add_to_grad(params: list[Tensor], pull: list[Tensor], coef: float) -> None:
        torch._foreach_mul_(pull, coef)
        for p, g in zip(params, pull):
            if p.grad is None:
                p.grad = g.to(p.dtype)
            else:
                p.grad.add_(g.to(p.grad.dtype))
