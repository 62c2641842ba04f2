"""Sums of weighted squared per-sample gradients from one batched forward and batched backward passes.

For each supported layer the per-sample gradient of its parameters follows from the layer input a_b (kept by a
forward hook) and the gradient g_b of its output (kept by a tensor hook, which sees the value before any in-place
activation that follows):

    Linear       dW_b = g_b a_b^T                      db_b = g_b            (summed over extra token dims)
    Conv2d       dW_b = G_b U_b^T, U_b = unfold(a_b)   db_b = sum_l G_b      (per group; timm's Conv2dSame padded)
    BatchNorm2d  dgamma_b = sum_hw g_b * xhat_b        dbeta_b = sum_hw g_b  (eval mode: running statistics)

so sum_b w_b (dtheta_b)^2 costs one einsum per layer instead of one backward pass per sample. Samples must not
interact (eval mode), which the Fisher requires anyway. Models with other parameter-holding layers are not
supported here (`supports` says so) and use the vmap path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _is_conv_same(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv2dSame"


def _is_bn_act(module: nn.Module) -> bool:
    return isinstance(module, nn.BatchNorm2d) and hasattr(module, "act")


def _supported(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear):
        return True
    if isinstance(module, nn.Conv2d):
        return module.padding_mode == "zeros" and isinstance(module.padding, tuple)
    if isinstance(module, nn.BatchNorm2d):
        return module.affine and module.track_running_stats and (
            not _is_bn_act(module) or isinstance(getattr(module, "drop", nn.Identity()), nn.Identity))
    return False


def owners(model: nn.Module, names: set[str]) -> dict[str, nn.Module] | None:
    """Module name -> module for every module that directly owns one of `names`; None if any is unsupported."""
    found = {}
    for module_name, module in model.named_modules():
        own = [f"{module_name}.{n}" if module_name else n for n, _ in module.named_parameters(recurse=False)]
        if any(n in names for n in own):
            if not _supported(module):
                return None
            found[module_name] = module
    return found


def supports(model: nn.Module, names: set[str]) -> bool:
    return owners(model, names) is not None


class SquaredGradAccumulator:
    """Adds sum_b w_b (d theta / d out_b)^2 to `sums` for every backward pass run while it is active."""

    def __init__(self, model: nn.Module, sums: dict[str, Tensor]):
        self.model, self.sums = model, sums
        self.layers = owners(model, set(sums))
        if self.layers is None:
            raise ValueError("model has parameter-holding layers without a per-sample rule; use the vmap path.")
        self.weights: Tensor | None = None
        self._inputs: dict[str, Tensor] = {}
        self._cols: dict[str, Tensor] = {}  # unfolded conv inputs, reused by every backward pass of the batch
        self._handles: list = []

    def __enter__(self):
        for name, module in self.layers.items():
            self._handles.append(module.register_forward_hook(self._forward_hook(name, module)))
            if _is_bn_act(module):  # the gradient that matters is the one before the fused activation
                self._handles.append(module.act.register_forward_pre_hook(self._act_hook(name, module)))
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._inputs.clear()
        self._cols.clear()

    def _forward_hook(self, name, module):
        def hook(_module, args, output):
            self._inputs[name] = args[0].detach()
            if not _is_bn_act(module) and output.requires_grad:
                output.register_hook(lambda grad: self._accumulate(name, module, grad))
        return hook

    def _act_hook(self, name, module):
        def hook(_act, args):
            if args[0].requires_grad:
                args[0].register_hook(lambda grad: self._accumulate(name, module, grad))
        return hook

    @torch.no_grad()
    def _accumulate(self, name: str, module: nn.Module, grad: Tensor) -> None:
        g, w = grad.float(), self.weights
        if isinstance(module, nn.Conv2d):
            if name not in self._cols:
                self._cols[name] = _unfold(module, self._inputs[name].float())
            a = self._cols[name]
        else:
            a = self._inputs[name].float()
        prefix = f"{name}." if name else ""
        for param_name, per_sample in _per_sample_grads(module, a, g).items():
            key = prefix + param_name
            if key in self.sums:
                self.sums[key] += torch.einsum("b,b...->...", w, per_sample.square())


def _unfold(module: nn.Conv2d, a: Tensor) -> Tensor:
    """(batch, Cin*kh*kw, L) patches of the conv input, padded as the layer pads (timm's Conv2dSame included)."""
    padding = module.padding
    if _is_conv_same(module):
        from timm.layers.padding import pad_same

        a = pad_same(a, module.kernel_size, module.stride, module.dilation)
        padding = (0, 0)
    return F.unfold(a, module.kernel_size, dilation=module.dilation, padding=padding, stride=module.stride)


def _per_sample_grads(module: nn.Module, a: Tensor, g: Tensor) -> dict[str, Tensor]:
    if isinstance(module, nn.Linear):
        if a.ndim == 2:
            out = {"weight": g[:, :, None] * a[:, None, :]}
            bias = g
        else:
            a3, g3 = a.flatten(1, -2), g.flatten(1, -2)
            out = {"weight": torch.einsum("bto,bti->boi", g3, a3)}
            bias = g3.sum(1)
        if module.bias is not None:
            out["bias"] = bias
        return out
    if isinstance(module, nn.Conv2d):  # `a` is the unfolded input (see _unfold)
        batch, groups = a.shape[0], module.groups
        cols = a.view(batch, groups, -1, a.shape[-1])
        grads = g.flatten(2).view(batch, groups, -1, cols.shape[-1])
        out = {"weight": torch.einsum("bgol,bgil->bgoi", grads, cols).reshape(batch, *module.weight.shape)}
        if module.bias is not None:
            out["bias"] = g.flatten(2).sum(-1)
        return out
    # BatchNorm2d in eval mode: normalised with the running statistics
    xhat = (a - module.running_mean[None, :, None, None]) * torch.rsqrt(
        module.running_var[None, :, None, None] + module.eps)
    return {"weight": (g * xhat).sum((2, 3)), "bias": g.sum((2, 3))}
