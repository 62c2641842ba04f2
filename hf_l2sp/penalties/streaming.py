"""Weight penalties computed piece by piece, so that they cost the anchor and nothing model-sized besides.

A penalty over the anchored tensors reads w and w0 and, in the backward pass, writes its gradient. Done on whole
tensors at once, that takes fp32 copies of w, w0 and w - w0 as large as the model (2x its bytes in bf16), and the
autograd way keeps w - w0 from the forward pass to the backward pass, while the activations are alive too. Here:

- the tensors are walked in pieces of at most `piece_budget` values (runs of whole small tensors, processed with one
  multi-tensor call each; or slices of one large tensor), each computed in fp32 and dropped before the next;
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


def piece_budget(numels: list[int], device: torch.device | None = None) -> int:
    """Values per piece for tensors of these sizes on `device`: `PIECE_VALUES` on a CPU, else at least that and
    1/`PIECES_PER_PASS` of the set."""
    if device is None or torch.device(device).type == "cpu":
        return PIECE_VALUES
    return max(PIECE_VALUES, sum(numels) // PIECES_PER_PASS)


def direct_writes_available() -> bool:
    """Whether autograd's engine takes end-of-backward callbacks (the API DDP and FSDP use); checked, as a rename
    must fall back to returning gradients, never drop them."""
    engine = getattr(torch.autograd.Variable, "_execution_engine", None)
    return callable(getattr(engine, "queue_callback", None))


def pieces(numels: list[int], row_sizes: list[int] | None = None,
           budget: int | None = None) -> Iterator[list[tuple[int, int, int]]]:
    """Pieces of at most `budget` values (default `PIECE_VALUES`; see `piece_budget`), as (tensor index, start, end)
    segments of the flattened tensors: runs of whole tensors, or slices of one larger tensor (cut at whole rows when
    `row_sizes` are given)."""
    budget = budget or PIECE_VALUES
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


def segment(tensors, piece) -> list[Tensor]:
    return [tensors[i].reshape(-1)[start:end] for i, start, end in piece]


def differences(params, anchors, piece) -> list[Tensor]:
    """w - a in fp32 for one piece (a = 0 without anchors: w, cast): new tensors, which the caller may change in
    place. fp32 against fp32 is one subtraction; otherwise w is cast and the anchors are subtracted in place, promoted
    value by value, so no fp32 copy of them is made."""
    weights = [w.detach() for w in segment(params, piece)]
    if anchors is not None:
        bases = segment(anchors, piece)
        if all(w.dtype == torch.float32 and a.dtype == torch.float32 for w, a in zip(weights, bases)):
            return list(torch._foreach_sub(weights, bases))  # one pass per tensor: the step's cost is per op
        values = [w.to(torch.float32, copy=True) for w in weights]
        torch._foreach_sub_(values, bases)
        return values
    return [w.to(torch.float32, copy=True) for w in weights]


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
        """Add `scale` x the piece's fp32 `grads` (a 0-d tensor stays on its device: no host sync on a GPU), in one
        operation per tensor."""
        if self.returned is not None:
            for view, grad in zip(segment(self.returned, piece), grads):
                torch.mul(grad, scale, out=view)
            return
        for (i, start, end), grad in zip(piece, grads):
            target = self._view(i)[start:end]  # an fp32 gradient into a 16-bit .grad: rounded once, no copy
            if isinstance(scale, Tensor):
                target.addcmul_(grad, scale)
            else:
                target.add_(grad, alpha=scale)

    def finish(self) -> None:
        for grad, collected in self.pending.values():
            grad.add_(collected)
        self.pending.clear()


def run_backward(write, params, targets, direct: bool):
    """Call `write(sink)` now (returning the gradients) or at the end of the backward pass (direct writes)."""
    if direct and targets is not None and direct_writes_available():
        engine = torch.autograd.Variable._execution_engine

        def write_gradients():
            with torch.no_grad():
                sink = GradientSink(params, targets, True)
                write(sink)
                sink.finish()

        # Queued from a callback, it runs after every callback queued during the backward pass: DDP queues its
        # finalisation (which copies the averaged buckets back into .grad) only once its last gradient is ready,
        # possibly after this node ran.
        engine.queue_callback(lambda: engine.queue_callback(write_gradients))
        return [None] * len(params)
    sink = GradientSink(params, targets, False)
    with torch.no_grad():
        write(sink)
    return sink.returned


def group_size(tensor: Tensor) -> int:
    """Values per group of group lasso: one group per slice along dim 0 (one value for a 0-d tensor)."""
    groups = tensor.shape[0] if tensor.ndim else 1
    return max(1, tensor.numel() // max(groups, 1))


