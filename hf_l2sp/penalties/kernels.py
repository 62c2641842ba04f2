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

from .streaming import (PieceValues, device_pieces, differences, group_size, joined, run_backward,
                        scale_by, weighted_roots)


#: Values reduced in fp32 before the partial results are added in float64. Longer rows drift on constant data (a
#: sum of squares of 1e8 equal values: 4e-7 relative at 256, 1.5e-6 at 2048, 4e-6 at 32768).
CHUNK = 256


def _exact_sum_of_norms(tensors: list[Tensor], ord: float) -> Tensor:
    """sum over tensors of ||t||_ord^ord (ord 1 or 2), fp32 result, float64 accumulation across rows of CHUNK."""
    sums = NormSums(ord)
    sums.add(tensors)
    return sums.total(tensors[0].device if tensors else None).float()


class NormSums:
    """sum ||t||_ord^ord (ord 1 or 2) over tensors added piece by piece: each piece adds the fp32 norms of its rows
    of CHUNK values (one operation per tensor), and the rows are added in float64 every `FOLD` pieces and at the
    end, so a pass costs few small operations beside the reading of the values."""

    FOLD = 64

    def __init__(self, ord: float):
        self.ord, self.rows, self.folded = ord, [], None

    def add(self, tensors: list[Tensor]) -> None:
        if isinstance(tensors, PieceValues):  # one flat buffer: its rows, whatever tensors they span
            self._add_flat(tensors.flat)
            return
        small = [t for t in tensors if t.numel() <= CHUNK]
        if small:
            self.rows.append(torch.stack(torch._foreach_norm(small, self.ord)))
        for t in tensors:
            if t.numel() <= CHUNK:
                continue
            flat = t.reshape(-1)
            whole = flat.numel() - flat.numel() % CHUNK
            self.rows.append(torch.linalg.vector_norm(flat[:whole].view(-1, CHUNK), self.ord, dim=1))
            if whole < flat.numel():
                self.rows.append(torch.linalg.vector_norm(flat[whole:], self.ord).reshape(1))
        if len(self.rows) >= self.FOLD:
            self._fold()

    def _add_flat(self, flat: Tensor) -> None:
        whole = flat.numel() - flat.numel() % CHUNK
        if whole:
            self.rows.append(torch.linalg.vector_norm(flat[:whole].view(-1, CHUNK), self.ord, dim=1))
        if whole < flat.numel():
            self.rows.append(torch.linalg.vector_norm(flat[whole:], self.ord).reshape(1))
        if len(self.rows) >= self.FOLD:
            self._fold()

    def add_norms(self, norms: Tensor) -> None:
        """Add rows whose fp32 norms were already taken (group lasso's groups)."""
        self.rows.append(norms.reshape(-1))
        if len(self.rows) >= self.FOLD:
            self._fold()

    def _fold(self) -> None:
        part = torch.cat(self.rows).double().pow(self.ord).sum()
        self.folded = part if self.folded is None else self.folded + part
        self.rows = []

    def total(self, device=None) -> Tensor:
        """The float64 0-d sum (0 on `device` when nothing was added)."""
        if self.rows:
            self._fold()
        return self.folded if self.folded is not None else torch.zeros((), dtype=torch.float64, device=device)


def squared_distance(params: list[Tensor], anchors: list[Tensor]) -> Tensor:
    """sum ||w - a||^2 over the lists, without a graph, piece by piece: nothing model-sized is allocated."""
    device = params[0].device if params else None
    sums = NormSums(2)
    with torch.no_grad():
        numels = [p.numel() for p in params]
        for piece in device_pieces(numels, device):
            sums.add(differences(params, anchors, piece))
    return sums.total(device).float()


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
        device = params[0].device
        sizes = [group_size(p) for p in params] if kind == "group" else None
        group_value = torch.zeros((), dtype=torch.float64, device=device)
        squares = NormSums(2)  # sum (w - a)^2: the distance, and the value of an unweighted 'squared'
        weighted = NormSums(2) if kind == "squared" and weights is not None else None  # sum c (w - a)^2
        absolutes = NormSums(1) if kind == "absolute" else None
        with torch.no_grad():
            numels = [p.numel() for p in params]
            for piece in device_pieces(numels, device, sizes):
                diffs = differences(params, anchors, piece)
                if kind == "group":
                    for size, rows, _ in group_rows(diffs, piece, sizes):
                        norms = torch.linalg.vector_norm(rows, dim=1)
                        group_value += math.sqrt(size) * norms.double().sum()
                        squares.add_norms(norms)  # a group's norm is a row's: its square adds to the distance
                    continue
                squares.add(diffs)
                if absolutes is not None:
                    absolutes.add(diffs)
                elif weighted is not None:
                    weighted.add(weighted_roots(diffs, weights, piece))
        sq_distance = squares.total(device)
        if kind == "group":
            value = group_value
        elif absolutes is not None:
            value = absolutes.total(device)
        else:
            value = 0.5 * (weighted if weighted is not None else squares).total(device)
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
            for piece in device_pieces(numels, params[0].device, sizes):
                diffs = differences(params, anchors, piece)
                if kind == "absolute":
                    diffs.flat.sign_()
                    grads = diffs
                elif kind == "group":
                    grads = _group_gradients(diffs, piece, sizes)
                else:
                    grads = diffs if weights is None else scale_by(diffs, weights, piece)  # a new buffer: in place
                sink.add(piece, grads, scale)

        grads = run_backward(write, params, ctx.targets, ctx.direct)
        return (None, None, None, None, None, *grads)


def group_rows(diffs: PieceValues, piece, sizes: list[int]):
    """The piece's groups, joined by group size: (size, rows of that size as a (groups, size) matrix, positions of
    the segments they came from). One join per distinct size, so the work grows with the shapes, not the tensors."""
    by_size: dict[int, list[int]] = {}
    for position, (i, _, _) in enumerate(piece):
        by_size.setdefault(sizes[i], []).append(position)
    for size, positions in by_size.items():
        segments = [diffs[p] for p in positions]
        rows = (diffs.flat if len(positions) == len(piece) else joined(segments)).view(-1, size)
        yield size, rows, positions


def _group_gradients(diffs: PieceValues, piece, sizes: list[int]) -> list[Tensor]:
    """sqrt(p_g) (w_g - a_g) / ||w_g - a_g|| (0 at a zero group) per segment of the piece."""
    grads: list[Tensor | None] = [None] * len(piece)
    for size, rows, positions in group_rows(diffs, piece, sizes):
        norms = torch.linalg.vector_norm(rows, dim=1, keepdim=True)
        factor = torch.where(norms > 0, math.sqrt(size) / norms, torch.zeros_like(norms))
        flat = (rows * factor).view(-1)
        for position, part in zip(positions, flat.split([diffs[p].numel() for p in positions])):
            grads[position] = part
    return grads


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
