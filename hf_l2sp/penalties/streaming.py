"""Weight penalties computed piece by piece, so that they cost the anchor and nothing model-sized besides.

A penalty over the anchored tensors reads w and w0 and, in the backward pass, writes its gradient. Done on whole
tensors at once, that takes fp32 copies of w, w0 and w - w0 as large as the model (2x its bytes in bf16), and the
autograd way keeps w - w0 from the forward pass to the backward pass, while the activations are alive too. Here:

- the tensors are walked in pieces of at most `piece_budget` values, each computed in fp32 as one flat buffer and
  dropped before the next, in a few operations whatever the number of tensors in it: on a CPU, runs of whole small
  tensors or slices of one large tensor (cache-sized); on an accelerator, pieces packed full, about
  `PIECES_PER_PASS` per pass;
- the forward pass keeps nothing but references to the tensors; the backward pass recomputes w - w0 per piece;
- the gradient goes straight into each parameter's `.grad`, piece by piece, once the backward pass has finished (a
  callback on autograd's engine that runs after those DDP and FSDP2 queue, so their averaging and sharding of the
  task gradient are done first; every process adds the same penalty gradient, so adding it after averaging is
  exact). Where that cannot be done (a caller without parameter targets, or DeepSpeed, which moves gradients out
  of `.grad` during the backward pass), the gradients are returned to autograd, filled piece by piece.

Values are summed in float64 across pieces (see `kernels`), so they stay exact at any size.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from ..anchor.parameters import cut, local_view

#: Values per piece on a CPU: 256 Ki values, 1 MiB per fp32 temporary, which stays in cache (larger pieces measured
#: 10-25 % slower on GPT-2 small).
PIECE_VALUES = 1 << 18
#: On an accelerator a larger set is walked in about this many pieces instead: each piece costs a handful of kernel
#: launches, which a GPU waits on (GPT-2 small in pieces of 256 Ki: 4x the plain step on an H200). A piece keeps
#: w - w0 in fp32, changed in place into the gradient, and torch casts mixed-dtype operands through fp32 temporaries
#: of the piece's size: at 1/96 of the set that stays under 0.1 x its bytes in any dtype.
PIECES_PER_PASS = 96


def on_accelerator(device: torch.device | str | None) -> bool:
    return device is not None and torch.device(device).type != "cpu"


def piece_budget(numels: list[int], device: torch.device | None = None) -> int:
    """Values per piece for tensors of these sizes on `device`: `PIECE_VALUES` on a CPU, else at least that and
    1/`PIECES_PER_PASS` of the set."""
    if not on_accelerator(device):
        return PIECE_VALUES
    return max(PIECE_VALUES, sum(numels) // PIECES_PER_PASS)


def device_pieces(numels: list[int], device: torch.device | None,
                  row_sizes: list[int] | None = None) -> Iterator[list[tuple[int, int, int]]]:
    """The pieces a pass over tensors of these sizes on `device` walks: cache-sized on a CPU, where a piece made of
    slices of one tensor costs no copy; packed full on an accelerator, so that a pass makes about `PIECES_PER_PASS`
    pieces (each a constant number of launches) whatever the number and sizes of the tensors."""
    accelerator = on_accelerator(device)
    return pieces(numels, row_sizes, piece_budget(numels, device), pack=accelerator)


def direct_writes_available() -> bool:
    """Whether autograd's engine takes end-of-backward callbacks (the API DDP and FSDP use); checked, as a rename
    must fall back to returning gradients, never drop them."""
    engine = getattr(torch.autograd.Variable, "_execution_engine", None)
    return callable(getattr(engine, "queue_callback", None))


def pieces(numels: list[int], row_sizes: list[int] | None = None, budget: int | None = None,
           pack: bool = False) -> Iterator[list[tuple[int, int, int]]]:
    """Pieces of at most `budget` values (default `PIECE_VALUES`; see `piece_budget`), as (tensor index, start, end)
    segments of the flattened tensors, cut at whole rows when `row_sizes` are given. Unpacked: runs of whole tensors,
    or slices of one larger tensor. Packed: every piece filled up to the budget, a larger tensor's slices sharing
    pieces with its neighbours (a row larger than the budget still makes a piece of its own)."""
    budget = budget or PIECE_VALUES
    if pack:
        yield from _packed(numels, row_sizes, budget)
        return
    piece, size = [], 0
    for i, n in enumerate(numels):
        if n > budget:
            if piece:
                yield piece
                piece, size = [], 0
            step = budget if row_sizes is None else max(1, budget // row_sizes[i]) * row_sizes[i]
            for start in range(0, n, step):
                yield [(i, start, min(n, start + step))]
            continue
        if piece and size + n > budget:
            yield piece
            piece, size = [], 0
        piece.append((i, 0, n))
        size += n
    if piece:
        yield piece


def _packed(numels, row_sizes, budget) -> Iterator[list[tuple[int, int, int]]]:
    piece, size = [], 0
    for i, n in enumerate(numels):
        row = 1 if row_sizes is None else max(1, row_sizes[i])
        start = 0
        while start < n:
            take = min(n - start, (budget - size) // row * row)
            if take == 0:
                if piece:  # no whole row fits: close this piece and start the row in the next
                    yield piece
                    piece, size = [], 0
                    continue
                take = min(n - start, row)
            piece.append((i, start, start + take))
            size += take
            start += take
            if size >= budget:
                yield piece
                piece, size = [], 0
    if piece:
        yield piece


def segment(tensors, piece) -> list[Tensor]:
    return [tensors[i].reshape(-1)[start:end] for i, start, end in piece]


class PieceValues(list):
    """A piece's fp32 values, one view per segment, all views of one flat buffer (`flat`): work on the whole piece
    (a norm, a scaling, a sign) is one operation on `flat`, whatever the number of tensors in it."""

    flat: Tensor

    @classmethod
    def of(cls, flat: Tensor, piece) -> "PieceValues":
        # One segment (a slice of a large tensor, the usual piece on a CPU) is the buffer itself: split() would
        # cost more than the piece's arithmetic on small pieces.
        values = cls([flat] if len(piece) == 1 else flat.split([end - start for _, start, end in piece]))
        values.flat = flat
        return values


def joined(tensors: list[Tensor]) -> Tensor:
    """One flat tensor holding the segments (a view for a single segment, else one concatenation, which promotes
    mixed dtypes exactly; autocast, which would pick a 16-bit type for it, is off)."""
    if len(tensors) == 1:
        return tensors[0]
    with torch.autocast(tensors[0].device.type, enabled=False):
        return torch.cat(tensors)


def differences(params, anchors, piece) -> PieceValues:
    """w - a in fp32 for one piece (a = 0 without anchors: w, cast), in a new flat buffer the caller may change in
    place: a few operations per piece, whatever the number of tensors (the weights and the anchors are each joined
    once; 16-bit anchors are promoted value by value in the subtraction, so no fp32 copy of them is made)."""
    weights = joined([w.detach() for w in segment(params, piece)])
    bases = None if anchors is None else joined(segment(anchors, piece))
    if bases is not None and weights.dtype == torch.float32 and bases.dtype == torch.float32:
        flat = torch.sub(weights, bases)
    else:
        flat = weights.to(torch.float32, copy=len(piece) == 1)  # a joined piece is already a new tensor
        if bases is not None:
            flat.sub_(bases)
    return PieceValues.of(flat, piece)


def weighted_roots(diffs: PieceValues, weights, piece) -> PieceValues:
    """sqrt(c) (w - a) for the piece (c >= 0: a Fisher diagonal), so that its squared norm is sum c (w - a)^2."""
    return PieceValues.of(torch.sqrt(joined(segment(weights, piece))).mul_(diffs.flat), piece)


def scale_by(diffs: PieceValues, weights, piece) -> PieceValues:
    """c (w - a), in place."""
    diffs.flat.mul_(joined(segment(weights, piece)))
    return diffs


class GradientSink:
    """Where a piece's gradient goes: into `.grad` of the parameters (direct), or into gradients returned to
    autograd. Gradients are written in the tensors' logical (row-major) order; a `.grad` stored otherwise
    (channels_last) is collected whole and added at `finish`."""

    def __init__(self, params, targets, direct: bool, into_weights: bool = False):
        self.targets = targets if direct else None
        self.returned = None if direct else [torch.empty(p.shape, dtype=p.dtype, device=p.device) for p in params]
        self.pending: dict[int, tuple[Tensor, Tensor]] = {}
        self.into_weights = into_weights  # add to the parameters themselves (a decoupled update), not their .grad

    def _view(self, i: int) -> Tensor:
        param, rows = self.targets[i]
        if self.into_weights:
            grad = cut(local_view(param).detach(), rows)
        else:
            if param.grad is None:
                param.grad = torch.zeros_like(param, memory_format=torch.contiguous_format)
            grad = cut(local_view(param.grad), rows)
        if grad.is_contiguous():
            return grad.reshape(-1)
        if i not in self.pending:
            self.pending[i] = (grad, torch.zeros(grad.shape, dtype=grad.dtype, device=grad.device))
        return self.pending[i][1].view(-1)

    def add(self, piece, grads: list[Tensor], scale: Tensor | float) -> None:
        """Add `scale` x the piece's fp32 `grads` (a 0-d tensor stays on its device: no host sync on a GPU): a
        piece of one segment (a slice of a large tensor) in one fused pass; otherwise scaled in place, then added
        with one multi-tensor operation for the whole piece."""
        if len(piece) == 1 and self.returned is None:
            target = self._view(piece[0][0])[piece[0][1]:piece[0][2]]
            if isinstance(scale, Tensor):
                target.addcmul_(grads[0], scale)
            else:
                target.add_(grads[0], alpha=scale)
            return
        if isinstance(grads, PieceValues):
            grads.flat.mul_(scale)
        else:
            torch._foreach_mul_(grads, scale)
        if self.returned is not None:
            torch._foreach_copy_(segment(self.returned, piece), grads)
            return
        targets = [self._view(i)[start:end] for i, start, end in piece]
        dtypes = {t.dtype for t in targets}
        if (isinstance(grads, PieceValues) and len(dtypes) == 1 and grads.flat.dtype not in dtypes
                and targets[0].device.type != "cpu"):
            # One dtype per list keeps an accelerator's multi-tensor kernel (mixed lists run tensor by tensor); on
            # the CPU the fp32 gradient is added to a 16-bit .grad with one rounding.
            grads = PieceValues.of(grads.flat.to(targets[0].dtype), piece)
        torch._foreach_add_(targets, grads)

    def finish(self) -> None:
        for grad, collected in self.pending.values():
            grad.add_(collected)
        self.pending.clear()


def after_backward(callback) -> bool:
    """Run `callback` once the current backward pass has finished, after every callback queued during it; False
    (nothing queued) where autograd's engine takes no callbacks."""
    if not direct_writes_available():
        return False
    engine = torch.autograd.Variable._execution_engine
    # Queued from a callback, it runs after every callback queued during the backward pass: DDP queues its
    # finalisation (which copies the averaged buckets back into .grad) only once its last gradient is ready,
    # possibly after this node ran.
    engine.queue_callback(lambda: engine.queue_callback(callback))
    return True


def run_backward(write, params, targets, direct: bool):
    """Call `write(sink)` now (returning the gradients) or at the end of the backward pass (direct writes)."""
    if direct and targets is not None:
        def write_gradients():
            with torch.no_grad():
                sink = GradientSink(params, targets, True)
                write(sink)
                sink.finish()

        if after_backward(write_gradients):
            return [None] * len(params)
    sink = GradientSink(params, targets, False)
    with torch.no_grad():
        write(sink)
    return sink.returned


def group_size(tensor: Tensor) -> int:
    """Values per group of group lasso: one group per slice along dim 0 (one value for a 0-d tensor)."""
    groups = tensor.shape[0] if tensor.ndim else 1
    return max(1, tensor.numel() // max(groups, 1))


