"""The adapters' squared distance to the frozen base, sum ||s B A||_F^2, with its gradient in a few operations per
adapter shape.

    f = sum_t s_t^2 sum((B_t^T B_t) * (A_t A_t^T)),   df/dB_t = 2 s_t^2 B_t (A_t A_t^T),   df/dA_t = 2 s_t^2 (B_t^T B_t) A_t

Adapters of one shape (every q projection of a model, say) are stacked and done as batched products, both ways.
Left to autograd, each factor would still get its own accumulation of the penalty's gradient into the task's (an
addition per factor, so per layer); where the trainer allows it (`direct`), the gradient is instead added to the
factors' `.grad` after the backward pass, with one multi-tensor addition per shape, as `streaming` does for weights.
Experts' fused adapters (`ExpertLoraTerm`) keep their own autograd form.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..anchor.adapters import ExpertLoraTerm, LoraTerm
from .streaming import after_backward


def shape_groups(terms: list[LoraTerm]) -> list[list[LoraTerm]]:
    """Plain LoRA terms of one factor shape, dtype and device, in first-seen order."""
    groups: dict[tuple, list[LoraTerm]] = {}
    for term in terms:
        key = (tuple(term.lora_A.shape), tuple(term.lora_B.shape), term.lora_A.dtype, term.lora_A.device)
        groups.setdefault(key, []).append(term)
    return list(groups.values())


def _stacked(group: list[LoraTerm]) -> tuple[Tensor, Tensor, Tensor]:
    """(B (k, out, r), A (k, r, in)) in fp32 and the s^2 per term (k,)."""
    b = torch.stack([t.lora_B.detach().flatten(1) for t in group]).float()
    a = torch.stack([t.lora_A.detach().flatten(1) for t in group]).float()
    scales = torch.tensor([t.scaling ** 2 for t in group], dtype=torch.float32).to(a.device, non_blocking=True)
    return b, a, scales


class _BatchedLoraDistance(torch.autograd.Function):
    @staticmethod
    def forward(ctx, groups, direct: bool, *factors: Tensor) -> Tensor:
        total = torch.zeros((), dtype=torch.float32, device=factors[0].device)
        with torch.autocast(factors[0].device.type, enabled=False):  # fp32 products, whatever the context
            for group in groups:
                b, a, scales = _stacked(group)
                per_term = ((b.transpose(1, 2) @ b) * (a @ a.transpose(1, 2))).sum((1, 2))
                total = total + (per_term * scales).sum()
        ctx.groups, ctx.direct = groups, direct
        return total

    @staticmethod
    def backward(ctx, grad_value: Tensor):
        groups = ctx.groups

        def gradients():
            for group in groups:
                with torch.autocast(grad_value.device.type, enabled=False):
                    b, a, scales = _stacked(group)
                    factor = (2 * grad_value.float()) * scales.view(-1, 1, 1)
                    grad_b = (b @ (a @ a.transpose(1, 2))).mul_(factor)
                    grad_a = ((b.transpose(1, 2) @ b) @ a).mul_(factor)
                yield group, grad_b, grad_a

        if ctx.direct and after_backward(lambda: _add_to_grads(gradients())):
            return (None, None) + (None,) * sum(2 * len(group) for group in groups)
        grads = []
        for group, grad_b, grad_a in gradients():
            for term, gb, ga in zip(group, grad_b, grad_a):
                grads += [gb.view_as(term.lora_B).to(term.lora_B.dtype), ga.view_as(term.lora_A).to(term.lora_A.dtype)]
        return (None, None, *grads)


@torch.no_grad()
def _add_to_grads(per_group) -> None:
    for group, grad_b, grad_a in per_group:
        for params, grads in (([t.lora_B for t in group], grad_b), ([t.lora_A for t in group], grad_a)):
            grads = grads.to(params[0].dtype) if params[0].device.type != "cpu" else grads
            views = [g.view_as(p) for g, p in zip(grads.unbind(0), params)]
            present = [(p.grad, view) for p, view in zip(params, views) if p.grad is not None]
            for param, view in zip(params, views):
                if param.grad is None:
                    param.grad = view.to(param.dtype, copy=True)
            if present:
                torch._foreach_add_(*map(list, zip(*present)))


def lora_squared_distance(terms: list[LoraTerm], direct: bool = False) -> Tensor:
    """sum over terms of ||W - W0||_F^2 = s^2 sum((B^T B) * (A A^T)), differentiable in the factors (fp32)."""
    experts = [t for t in terms if isinstance(t, ExpertLoraTerm)]
    groups = shape_groups([t for t in terms if not isinstance(t, ExpertLoraTerm)])
    parts = [t.squared_distance() for t in experts]
    if groups:
        factors = [f for group in groups for t in group for f in (t.lora_B, t.lora_A)]
        parts.append(_BatchedLoraDistance.apply(groups, direct, *factors))
    return parts[0] if len(parts) == 1 else torch.stack(parts).sum()
