"""Kernels for the weight penalties.

Each kernel is one ``autograd.Function`` over a *list* of parameters (`StreamedPenalty`): the forward pass computes
the value under ``no_grad`` (no graph is built for the penalty) and the backward pass the closed-form gradient, both
piece by piece (`streaming`), so that nothing model-sized is allocated or kept between the two passes. Everything
runs in fp32 whatever the parameter and anchor dtype (an anchor is stored in its parameter's dtype, an exact copy),
so that ``w - w0`` keeps its precision under bf16/fp16 training; gradients are cast back to the parameter dtype.

Besides the penalty value, each kernel returns the squared Euclidean distance ``sum ||w - a||^2`` it computed on
the way (non-differentiable), so the trainer can log ``sp/distance`` without a second pass over the weights.

Sums are exact at any size: an fp32 reduction over one long run loses about 2 % at 1e8 values (``_foreach_norm`` on
the CPU), so each tensor is reduced in rows of ``CHUNK`` values in fp32 (short rows keep even a constant tensor, the
worst case for rounding, within 4e-7) and the rows' results are added in float64. It reads each value once, as the
fused call does, and measured as fast (``benchmarks/moe_anchor.py``). Small tensors keep the one fused call.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .streaming import differences, group_size, piece_budget, pieces, run_backward, segment


#: Values reduced in fp32 before the partial results are added in float64. Longer rows drift on constant data (a
#: sum of squares of 1e8 equal values: 4e-7 relative at 256, 1.5e-6 at 2048, 4e-6 at 32768).
CHUNK = 256


def _exact_sum_of_norms(tensors: list[Tensor], ord: float) -> Tensor:
    """sum over tensors of ||t||_ord^ord (ord 1 or 2), fp32 result, float64 accumulation across rows of CHUNK."""
    return sum64(tensors, ord).float()


def sum64(tensors: list[Tensor], ord: float) -> Tensor:
    """`_exact_sum_of_norms` as a float64 0-d tensor (to keep adding to)."""
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
        return torch.zeros((), dtype=torch.float64, device=tensors[0].device if tensors else None)
    return torch.stack(parts).sum()


def sum_of_squares(tensors: list[Tensor]) -> Tensor:
    """sum ||t||^2 over the list, exact to about 1e-7 relative at any size (see the module docstring)."""
    return _exact_sum_of_norms(tensors, 2)


def sum_of_absolutes(tensors: list[Tensor]) -> Tensor:
    """sum ||t||_1 over the list, with the same exactness."""
    return _exact_sum_of_norms(tensors, 1)


def weighted_sum_of_squares(weights: list[Tensor], tensors: list[Tensor]) -> Tensor:
    """sum_j c_j t_j^2 over the list (c >= 0, e.g. a Fisher diagonal): sum ||sqrt(c) t||^2, exact likewise."""
    return sum_of_squares([torch.sqrt(c) * t for c, t in zip(weights, tensors)])


class StreamedPenalty(torch.autograd.Function):
    """One weight penalty over a list of tensors, with the squared distance sum ||w - a||^2 (detached) beside it.

    kind 'squared': 1/2 sum c (w - a)^2, gradient c (w - a) (c = `weights`, or 1; a = `anchors`, or 0);
    'absolute': sum |w - a|, gradient sign(w - a) (0 at w = a, the subgradient autograd also picks);
    'group': sum_g sqrt(p_g) ||w_g - a_g||, g the slices along dim 0 (p_g values each), gradient
    sqrt(p_g) (w_g - a_g) / ||w_g - a_g|| (0 at a zero group).
    `targets` ((parameter, rows) per tensor) and `direct`: where the gradient goes (`streaming.run_backward`).
    """

    @staticmethod
    def forward(ctx, kind: str, anchors, weights, targets, direct: bool, *params: Tensor):
        value = torch.zeros((), dtype=torch.float64, device=params[0].device)
        sq_distance = value.clone()
        sizes = [group_size(p) for p in params] if kind == "group" else None
        with torch.no_grad():
            numels = [p.numel() for p in params]
            for piece in pieces(numels, sizes, piece_budget(numels, params[0].device)):
                diffs = differences(params, anchors, piece)
                if kind == "group":
                    for (i, _, _), diff in zip(piece, diffs):
                        norms = torch.linalg.vector_norm(diff.view(-1, sizes[i]), dim=1).double()
                        value += math.sqrt(sizes[i]) * norms.sum()
                        sq_distance += norms.square().sum()
                    continue
                squares = sum64(diffs, 2)
                sq_distance += squares
                if kind == "absolute":
                    value += sum64(diffs, 1)
                elif weights is None:
                    value += 0.5 * squares
                else:
                    value += 0.5 * sum64([torch.sqrt(c) * d for c, d in zip(segment(weights, piece), diffs)], 2)
        ctx.kind, ctx.anchors, ctx.weights, ctx.targets, ctx.direct, ctx.sizes = (kind, anchors, weights, targets,
                                                                                   direct, sizes)
        ctx.save_for_backward(*params)
        sq_distance = sq_distance.float()
        ctx.mark_non_differentiable(sq_distance)
        return value.float(), sq_distance

    @staticmethod
    def backward(ctx, grad_value: Tensor, _grad_sq_distance: Tensor):
        params = ctx.saved_tensors
        kind, anchors, weights, sizes = ctx.kind, ctx.anchors, ctx.weights, ctx.sizes
        scale = grad_value.detach().float()

        def write(sink) -> None:
            numels = [p.numel() for p in params]
            for piece in pieces(numels, sizes, piece_budget(numels, params[0].device)):
                diffs = differences(params, anchors, piece)
                if kind == "absolute":
                    grads = torch._foreach_sign(diffs)
                elif kind == "group":
                    grads = [_group_gradient(diff, sizes[i]) for (i, _, _), diff in zip(piece, diffs)]
                else:
                    grads = diffs  # new tensors (`differences`): turned into the gradient in place
                    if weights is not None:
                        torch._foreach_mul_(grads, segment(weights, piece))
                torch._foreach_mul_(grads, scale)
                sink.add(piece, grads)

        grads = run_backward(write, params, ctx.targets, ctx.direct)
        return (None, None, None, None, None, *grads)


def _group_gradient(diff: Tensor, size: int) -> Tensor:
    rows = diff.view(-1, size)
    norms = torch.linalg.vector_norm(rows, dim=1, keepdim=True)
    return (rows * (math.sqrt(size) / torch.where(norms > 0, norms, torch.ones_like(norms))) * (norms > 0)).view(-1)


def _apply(kind: str, params: list[Tensor], anchors, weights=None) -> tuple[Tensor, Tensor]:
    if not params:
        zero = torch.zeros((), dtype=torch.float32)
        return zero, zero
    targets, direct = getattr(params, "targets", None), getattr(params, "direct", False)
    return StreamedPenalty.apply(kind, anchors, weights, targets, direct, *params)


def half_squared_distance(
    params: list[Tensor], anchors: list[Tensor] | None = None, weights: list[Tensor] | None = None
) -> tuple[Tensor, Tensor]:
    """(1/2 sum c (w - a)^2, sum (w - a)^2) over the list, differentiable in the first output."""
    return _apply("squared", params, anchors, weights)


def absolute_distance(params: list[Tensor], anchors: list[Tensor]) -> tuple[Tensor, Tensor]:
    """(sum |w - a|, sum (w - a)^2) over the list, differentiable in the first output."""
    return _apply("absolute", params, anchors)


def group_distance(params: list[Tensor], anchors: list[Tensor]) -> tuple[Tensor, Tensor]:
    """(sum_g sqrt(p_g) ||w_g - a_g||, sum (w - a)^2), groups = slices along dim 0, differentiable in the first."""
    return _apply("group", params, anchors)
