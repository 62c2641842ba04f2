"""Multi-tensor kernels for the weight penalties.

Each kernel is an ``autograd.Function`` over a *list* of parameters: the forward pass computes the value with
``torch._foreach_*`` ops under ``no_grad`` (no graph is built for the penalty), and the backward pass writes the
closed-form gradient, again with multi-tensor ops. Everything runs in fp32 whatever the parameter and anchor dtype
(an anchor is stored in its parameter's dtype, an exact copy), so that ``w - w0`` keeps its precision under
bf16/fp16 training; gradients are cast back to the parameter dtype.

Besides the penalty value, each kernel returns the squared Euclidean distance ``sum ||w - a||^2`` it computed on
the way (non-differentiable), so the trainer can log ``sp/distance`` without a second pass over the weights.

Sums are exact at any size: an fp32 reduction over one long run loses about 2 % at 1e8 values (``_foreach_norm`` on
the CPU), so each tensor is reduced in rows of ``CHUNK`` values in fp32 (short rows keep even a constant tensor, the
worst case for rounding, within 4e-7) and the rows' results are added in float64. It reads each value once, as the
fused call does, and measured as fast (``benchmarks/moe_anchor.py``). Small tensors keep the one fused call.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _fp32(tensors) -> list[Tensor]:
    # .float() is a no-op (same tensor) for fp32 tensors.
    return [t.detach().float() for t in tensors]


#: Values reduced in fp32 before the partial results are added in float64. Longer rows drift on constant data (a
#: sum of squares of 1e8 equal values: 4e-7 relative at 256, 1.5e-6 at 2048, 4e-6 at 32768).
CHUNK = 256


def _exact_sum_of_norms(tensors: list[Tensor], ord: float) -> Tensor:
    """sum over tensors of ||t||_ord^ord (ord 1 or 2), fp32 result, float64 accumulation across rows of CHUNK."""
    small = [t for t in tensors if t.numel() <= CHUNK]
    parts = []
    if small:
        parts.append(torch.stack(torch._foreach_norm(small, ord)).double().pow(ord).sum())
    for t in tensors:
        if t.numel() <= CHUNK:
            continue
        flat = t.reshape(-1)
        whole = flat.numel() - flat.numel() % CHUNK
        rows = torch.linalg.vector_norm(flat[:whole].view(-1, CHUNK), ord, dim=1)
        parts.append(rows.double().pow(ord).sum())
        if whole < flat.numel():
            parts.append(torch.linalg.vector_norm(flat[whole:], ord).double().pow(ord))
    if not parts:
        return torch.zeros((), dtype=torch.float32, device=tensors[0].device if tensors else None)
    return torch.stack(parts).sum().float()


def sum_of_squares(tensors: list[Tensor]) -> Tensor:
    """sum ||t||^2 over the list, exact to about 1e-7 relative at any size (see the module docstring)."""
    return _exact_sum_of_norms(tensors, 2)


def sum_of_absolutes(tensors: list[Tensor]) -> Tensor:
    """sum ||t||_1 over the list, with the same exactness."""
    return _exact_sum_of_norms(tensors, 1)


def weighted_sum_of_squares(weights: list[Tensor], tensors: list[Tensor]) -> Tensor:
    """sum_j c_j t_j^2 over the list (c >= 0, e.g. a Fisher diagonal): sum ||sqrt(c) t||^2, exact likewise."""
    return sum_of_squares([torch.sqrt(c) * t for c, t in zip(weights, tensors)])


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
                value = 0.5 * weighted_sum_of_squares(weights, diffs)
                diffs = torch._foreach_mul(diffs, weights)  # c (w - a): the gradient direction
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
            value = sum_of_absolutes(diffs)
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
