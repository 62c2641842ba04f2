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

The value of Omega (and ||w - w0||) is computed only at steps `measure()` asks for (SPTrainer: the steps that log);
the other steps do the update alone. `decoupled` without Fisher weights is then one multi-tensor pass per group:
a lerp of w toward w0 by lr * coef (toward 0, a multiplication, for plain L2 and the head).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..anchor.parameters import SPParameters, cut, local_view
from ..penalties.weight import PenaltyTerms, QuadraticForm
from ..penalties.kernels import NormSums
from ..penalties.streaming import GradientSink, device_pieces, differences, scale_by, weighted_roots
from ..utils.errors import ConfigError

SP_MODES = ("loss", "grad", "decoupled")
_NEVER = object()


class OptimizerSidePenalty:
    """Applies a `QuadraticForm` to the parameters of each optimizer param group, once per optimizer step.

    At a step that measures, d = c (w - a) is computed once per piece and serves both the update and the value,
    handed to `on_terms` as `PenaltyTerms` (detached); at the other steps `on_terms` gets None (a step was made).
    """

    def __init__(self, mode: str, form: QuadraticForm, params: SPParameters, on_terms=None, step_key=None,
                 measure=None):
        if mode not in ("grad", "decoupled"):
            raise ConfigError(f"OptimizerSidePenalty mode must be 'grad' or 'decoupled', got {mode!r}.")
        self.mode, self.form, self.on_terms = mode, form, on_terms
        self._measure = measure or (lambda: True)  # whether this optimizer step needs Omega's value
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
            self._run(optimizer, scale, update=True, measure=self._measure())

    def measure_now(self, optimizer: torch.optim.Optimizer) -> PenaltyTerms:
        """Omega's value at the current weights, nothing changed and no step counted: the log's own pass when the
        steps of its window did not measure (a log the trainer could not foresee)."""
        return self._run(optimizer, 1.0, update=False, measure=True)

    def _hook(self, optimizer, _args, _kwargs) -> None:
        if self.mode == "decoupled":
            self._run(optimizer, 1.0, update=True, measure=self._measure())
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
    def _run(self, optimizer, scale: float, update: bool, measure: bool) -> PenaltyTerms | None:
        """One pass per group and piece (`penalties.streaming`): w - w0 in fp32 for at most a piece at a time serves
        the logged distance and the value (when `measure`) and the update (when `update`), which goes straight
        into `.grad` (grad) or the weights (decoupled)."""
        if self._groups is None:
            self._groups = self._split(optimizer)
        form = self.form
        totals = None  # anchored value, head value, squared distance (float64, on the parameters' device)
        for group, anchored, head in self._groups:
            parts = []
            if anchored:
                targets = [(p, rows) for p, _, _, rows in anchored]
                weights = [w for _, _, w, _ in anchored] if form.weights is not None else None
                parts.append(self._pass(group, targets, [a for _, a, _, _ in anchored], weights, form.coef,
                                        form.use_anchors, scale, update, measure))
            if head and form.head_coef:
                parts.append(self._pass(group, head, None, None, form.head_coef, False, scale, update, measure))
                if measure:
                    parts[-1] = parts[-1].roll(1)
            for part in parts if measure else ():
                totals = part if totals is None else totals + part.to(totals.device)
        terms = None
        if measure:
            totals = torch.zeros(3, dtype=torch.float64) if totals is None else totals
            anchored_value, head_value, sq_distance = (t.float() for t in totals)
            terms = PenaltyTerms(penalty=anchored_value + head_value, head_penalty=head_value,
                                 distance=sq_distance.sqrt())
        if update and self.on_terms is not None:  # one optimizer step made, with its terms when it measured
            self.on_terms(terms)
        return terms

    def _pass(self, group, targets, anchors, weights, coef: float, pull_to_anchor: bool, scale: float,
              update: bool, measure: bool) -> Tensor | None:
        """(value, 0, squared distance) of coef/2 sum c (w - a)^2 over `targets` when `measure` (else None), its
        update applied on the way when `update`."""
        params = [cut(local_view(p), rows) for p, rows in targets]
        if not measure:
            if update and coef and not (self.mode == "decoupled" and weights is None
                                        and _decay_toward(params, anchors if pull_to_anchor else None,
                                                          group["lr"] * coef)):
                self._update_pass(group, params, targets, anchors, weights, coef, pull_to_anchor, scale)
            return None
        sink = GradientSink(params, targets, True, into_weights=self.mode == "decoupled") if update else None
        factor = coef * scale if self.mode == "grad" else -group["lr"] * coef
        squares = NormSums(2)  # sum (w - a)^2, for the log (and the value when unweighted)
        reuse = anchors is not None and pull_to_anchor and weights is None  # the value is 1/2 coef x the distance
        values = squares if reuse else NormSums(2)  # sum c x^2, x the pull (w - w0, or w)
        numels = [p.numel() for p in params]
        for piece in device_pieces(numels, params[0].device if params else None):
            diffs = differences(params, anchors, piece)
            if anchors is not None:
                squares.add(diffs)
            if not coef:  # a zero coefficient adds exactly nothing (not even 0 x inf)
                continue
            if not (pull_to_anchor or anchors is None):  # plain L2: the distance was for the log; pull w to 0
                del diffs
                diffs = differences(params, None, piece)
            pull = diffs  # a new buffer (`differences`): turned into the update in place
            if weights is None:
                if not reuse:
                    values.add(pull)
            else:
                values.add(weighted_roots(pull, weights, piece))
                if update:
                    scale_by(pull, weights, piece)
            if update:
                sink.add(piece, pull, factor)
        if update:
            sink.finish()
        device = params[0].device if params else None
        sq_distance = squares.total(device) if anchors is not None else torch.zeros((), dtype=torch.float64,
                                                                                     device=device)
        value = 0.5 * coef * values.total(device) if coef else torch.zeros_like(sq_distance)
        return torch.stack([value, torch.zeros_like(value), sq_distance])

    def _update_pass(self, group, params, targets, anchors, weights, coef: float, pull_to_anchor: bool,
                     scale: float) -> None:
        """The update alone, piece by piece: c (w - a) in fp32 into `.grad` (grad) or the weights (decoupled)."""
        sink = GradientSink(params, targets, True, into_weights=self.mode == "decoupled")
        factor = coef * scale if self.mode == "grad" else -group["lr"] * coef
        pull_from = anchors if pull_to_anchor else None
        for piece in device_pieces([p.numel() for p in params], params[0].device if params else None):
            pull = differences(params, pull_from, piece)
            if weights is not None:
                scale_by(pull, weights, piece)
            sink.add(piece, pull, factor)
        sink.finish()


def _decay_toward(params: list[Tensor], anchors: list[Tensor] | None, rate: float) -> bool:
    """w <- w - rate (w - a) on every tensor in one multi-tensor op: a lerp toward the anchors, or a scaling toward
    0 without them. False (nothing done) where an anchor's dtype or device differs from its tensor's (a lerp needs
    them equal): the caller takes the piecewise pass."""
    if not params:
        return True
    if anchors is None:
        torch._foreach_mul_(params, 1.0 - rate)
        return True
    if any(a.dtype != p.dtype or a.device != p.device for p, a in zip(params, anchors)):
        return False
    torch._foreach_lerp_(params, list(anchors), rate)
    return True
