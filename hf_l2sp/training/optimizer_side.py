"""Quadratic penalties applied in the optimizer step instead of through the loss (`sp_mode`).

    grad       .grad += coef * c * (w - a)       once per optimizer step, the exact gradient of Omega, added where
               the loss path would have it: before gradient clipping and the gradient-norm log (SPTrainer calls
               `add_gradient` from `_clip_grad_norm`), so the result equals sp_mode='loss' with clipping too. The
               logged value is computed without a graph.
    decoupled  w <- w - lr * coef * c * (w - a)  before the optimizer's own update, as AdamW decouples weight
               decay: it acts outside gradient clipping, and Adam's per-coordinate scaling no longer rescales the
               pull toward w0 (cf. RecAdam's update). A different method from the paper's coupled penalty; equal to
               it for plain SGD without momentum and without clipping.

`a` is w0 (or 0 for plain L2) and `c` the Fisher weights (or 1); the new head gets beta the same way. A step
pre-hook of the torch optimizer applies `decoupled`, and `grad` when nothing added it earlier in the step; under
fp16 that hook runs after the gradient scaler has unscaled the gradients, while `add_gradient` before clipping
multiplies by the scale the gradients still carry.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..anchor.parameters import SPParameters, local_view
from ..penalties.weight import PenaltyTerms, QuadraticForm
from ..penalties.kernels import sum_of_squares, weighted_sum_of_squares
from ..utils.errors import ConfigError

SP_MODES = ("loss", "grad", "decoupled")
_NEVER = object()


class OptimizerSidePenalty:
    """Applies a `QuadraticForm` to the parameters of each optimizer param group, once per optimizer step.

    One pass per tensor: d = c (w - a) is computed once and serves both the update and the logged value, which is
    handed to `on_terms` as `PenaltyTerms` (detached).
    """

    def __init__(self, mode: str, form: QuadraticForm, params: SPParameters, on_terms=None, step_key=None):
        if mode not in ("grad", "decoupled"):
            raise ConfigError(f"OptimizerSidePenalty mode must be 'grad' or 'decoupled', got {mode!r}.")
        self.mode, self.form, self.on_terms = mode, form, on_terms
        # `grad` is added once per optimizer step: `step_key()` names the step (the trainer's global step), so a
        # step the scaler skipped (no pre-hook call) cannot leave the next one without its gradient.
        self._step_key = step_key or (lambda: None)
        self._added_at: object = _NEVER
        # Each entry keeps the slice it penalises: a resized tensor's pretrained rows [:V] anchored, rows [V:] new.
        self._anchored = {id(p): (p, a, w, slice(rows)) for (p, a, rows), w in zip(
            params.anchored_entries(), form.weights or [None] * len(params.anchored))}
        self._head = {id(p): (p, slice(start or None, None)) for p, start in params.head_entries()}
        self._groups: list[tuple] | None = None

    def attach(self, optimizer: torch.optim.Optimizer):
        return optimizer.register_step_pre_hook(self._hook)

    def add_gradient(self, optimizer: torch.optim.Optimizer, scale: float = 1.0) -> None:
        """`grad` mode: add the gradient of Omega now (before clipping), times `scale` (the fp16 loss scale the
        gradients still carry). Does nothing if it was already added in this optimizer step."""
        if self.mode == "grad" and self._added_at != (key := self._step_key()):
            self._added_at = key
            self._run(optimizer, scale)

    def _hook(self, optimizer, _args, _kwargs) -> None:
        if self.mode == "decoupled":
            self._run(optimizer, 1.0)
        else:
            self.add_gradient(optimizer)
        if self.mode == "grad" and self._step_key() is None:  # no step names: one addition per optimizer.step call
            self._added_at = _NEVER

    def _split(self, optimizer) -> list[tuple]:
        groups = []
        for group in optimizer.param_groups:
            anchored = [self._anchored[id(p)] for p in group["params"] if id(p) in self._anchored]
            head = [self._head[id(p)] for p in group["params"] if id(p) in self._head]
            groups.append((group, anchored, head))
        return groups

    @torch.no_grad()
    def _run(self, optimizer, scale: float) -> None:
        if self._groups is None:
            self._groups = self._split(optimizer)
        form = self.form
        anchored_value, head_value, sq_distance = [], [], []
        for group, anchored, head in self._groups:
            if anchored:
                params = [local_view(p) for p, _, _, _ in anchored]
                slices = [rows for _, _, _, rows in anchored]
                p32 = [p[rows].detach().float() for p, rows in zip(params, slices)]
                diffs = torch._foreach_sub(p32, [a.float() for _, a, _, _ in anchored])
                sq_distance.append(sum_of_squares(diffs))
                if form.coef:  # a zero coefficient adds exactly nothing (not even 0 x inf)
                    pull = diffs if form.use_anchors else [t.clone() for t in p32]
                    if form.weights is not None:
                        weights = [w for _, _, w, _ in anchored]
                        anchored_value.append(0.5 * form.coef * weighted_sum_of_squares(weights, pull))
                        pull = torch._foreach_mul(pull, weights)
                    else:
                        anchored_value.append(0.5 * form.coef * (sum_of_squares(pull) if pull is not diffs
                                                                 else sq_distance[-1]))
                    self._apply(group, params, slices, pull, form.coef * scale)
            if head and form.head_coef:
                params = [local_view(p) for p, _ in head]
                slices = [rows for _, rows in head]
                pull = [p[rows].detach().float().clone() for p, rows in zip(params, slices)]
                head_value.append(0.5 * form.head_coef * sum_of_squares(pull))
                self._apply(group, params, slices, pull, form.head_coef * scale)
        if self.on_terms is not None:
            zero = torch.zeros(())
            head_total = sum(head_value, zero)
            self.on_terms(PenaltyTerms(penalty=sum(anchored_value, zero) + head_total, head_penalty=head_total,
                                       distance=sum(sq_distance, zero).sqrt()))

    def _apply(self, group, params: list[Tensor], slices: list[slice], pull: list[Tensor], coef: float) -> None:
        if not coef:
            return
        if self.mode == "grad":
            self._add_to_grad(params, slices, pull, coef)
        else:
            torch._foreach_mul_(pull, -group["lr"] * coef)
            for p, rows, d in zip(params, slices, pull):
                p[rows].add_(d.to(p.dtype))

    @staticmethod
    def _add_to_grad(params: list[Tensor], slices: list[slice], pull: list[Tensor], coef: float) -> None:
        whole = all(rows == slice(None) for rows in slices)
        grads = [p.grad for p in params]  # params are local views: under FSDP2 .grad is the local shard's
        if whole and all(g is not None and g.dtype == torch.float32 for g in grads):
            torch._foreach_add_(grads, pull, alpha=coef)  # one fused pass
            return
        for p, rows, g in zip(params, slices, pull):
            update = (g * coef).to(p.dtype)
            if p.grad is None and rows == slice(None):
                p.grad = update
                continue
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            p.grad[rows].add_(update)
