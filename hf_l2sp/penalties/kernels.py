"""Multi-tensor kernels for the weight penalties.

Each kernel is an ``autograd.Function`` over a *list* of parameters: the forward pass computes the value with
``torch._foreach_*`` ops under ``no_grad`` (no graph is built for the penalty), and the backward pass writes the
closed-form gradient, again with multi-tensor ops. Everything runs in fp32 whatever the parameter and anchor dtype
(an anchor is stored in its parameter's dtype, an exact copy), so that ``w - w0`` keeps its precision under
bf16/fp16 training; gradients are cast back to the parameter dtype.

Besides the penalty value, each kernel returns the squared Euclidean distance ``sum ||w - a||^2`` it computed on
the way (non-differentiable), so the trainer can log ``sp/distance`` without a second pass over the weights.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _fp32(tensors) -> list[Tensor]:
    # .float() is a no-op (same tensor) for fp32 tensors.
    return [t.detach().float() for t in tensors]


def sum_of_squares(tensors: list[Tensor]) -> Tensor:
    norms = torch._foreach_norm(tensors)
    return torch.stack(norms).square().sum()


def _to_param_dtype(grads: list[Tensor], params: tuple[Tensor, ...]) -> list[Tensor]:
    return [g if g.dtype == p.dtype else g.to(p.dtype) for g, p in zip(grads, params)]


class HalfSquaredDistance(torch.autograd.Function):
    """value = 1/2 sum_j c_j (w_j - a_j)^2 ; grad = c_j (w_j - a_j).

    ``anchors`` None means a = 0 (plain L2); ``weights`` None means c = 1 (else a per-element weight, e.g. Fisher).
    """

    @staticmethod
    def forward(ctx, anchors: list[Tensor] | None, weights: list[Tensor] | None, *params: Tensor):
        with torch.no_grad():
            p32 = _fp32(params)
            # diffs is kept for the backward pass (a transient copy of the tensors, freed after it), so the
            # gradient costs one multiply instead of a second subtraction over w and w0.
            diffs = torch._foreach_sub(p32, _fp32(anchors)) if anchors is not None else [t.clone() for t in p32]
            sq_distance = sum_of_squares(diffs)
            if weights is None:
                value = 0.5 * sq_distance
            else:
                weighted = torch._foreach_mul(diffs, weights)  # c (w - a): the gradient direction
                value = 0.5 * torch.stack([torch.dot(c.flatten(), d.flatten()) for c, d in zip(weighted, diffs)]).sum()
                diffs = weighted
        ctx.diffs = diffs
        ctx.dtypes = [p.dtype for p in params]
        ctx.mark_non_differentiable(sq_distance)
        return value, sq_distance

    @staticmethod
    def backward(ctx, grad_value: Tensor, _grad_sq_distance: Tensor):
        grads, ctx.diffs = ctx.diffs, None  # consumed: the backward runs once
        torch._foreach_mul_(grads, grad_value)
        grads = [g if g.dtype == d else g.to(d) for g, d in zip(grads, ctx.dtypes)]
        return (None, None, *grads)


class AbsoluteDistance(torch.autograd.Function):
    """value = sum_j |w_j - a_j| ; grad = sign(w_j - a_j) (0 at w_j = a_j, the subgradient autograd also picks)."""

    @staticmethod
    def forward(ctx, anchors: list[Tensor], *params: Tensor):
        with torch.no_grad():
            diffs = torch._foreach_sub(_fp32(params), _fp32(anchors))
            value = torch.stack(torch._foreach_norm(diffs, 1)).sum()
            sq_distance = sum_of_squares(diffs)
        ctx.anchors = anchors
        ctx.save_for_backward(*params)
        ctx.mark_non_differentiable(sq_distance)
        return value, sq_distance

    @staticmethod
    def backward(ctx, grad_value: Tensor, _grad_sq_distance: Tensor):
        params = ctx.saved_tensors
        grads = torch._foreach_sub(_fp32(params), _fp32(ctx.anchors))
        torch._foreach_sign_(grads)
        torch._foreach_mul_(grads, grad_value)
        return (None, *_to_param_dtype(grads, params))


def half_squared_distance(
    params: list[Tensor], anchors: list[Tensor] | None = None, weights: list[Tensor] | None = None
) -> tuple[Tensor, Tensor]:
    """(1/2 sum c (w - a)^2, sum (w - a)^2) over the list, differentiable in the first output."""
    if not params:
        zero = torch.zeros((), dtype=torch.float32)
        return zero, zero
    return HalfSquaredDistance.apply(anchors, weights, *params)


def absolute_distance(params: list[Tensor], anchors: list[Tensor]) -> tuple[Tensor, Tensor]:
    """(sum |w - a|, sum (w - a)^2) over the list, differentiable in the first output."""
    if not params:
        zero = torch.zeros((), dtype=torch.float32)
        return zero, zero
    return AbsoluteDistance.apply(anchors, *params)
