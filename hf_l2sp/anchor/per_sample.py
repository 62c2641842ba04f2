"""Sums of weighted squared per-sample gradients from one batched forward and batched backward passes.

For each supported layer the per-sample gradient of its parameters follows from the layer input a_b (kept by a
forward hook) and the gradient g_b of its output (kept by a tensor hook, which sees the value before any in-place
activation that follows):

    Linear       dW_b = g_b a_b^T                      db_b = g_b            (summed over extra token dims)
    Conv2d       dW_b = G_b U_b^T, U_b = unfold(a_b)   db_b = sum_l G_b      (per group; timm's Conv2dSame padded)
    BatchNorm2d  dgamma_b = sum_hw g_b * xhat_b        dbeta_b = sum_hw g_b  (eval mode: running statistics)

so sum_b w_b (dtheta_b)^2 costs one einsum per layer instead of one backward pass per sample. Samples must not
interact (eval mode), which the Fisher requires anyway. The rules apply to exact classes only (`rule_of`):
nn.Linear and timm's Linear, nn.Conv2d and timm's Conv2dSame (zero padding), nn.BatchNorm2d and timm's
BatchNormAct2d (affine, running statistics). Every other parameter-holding layer, subclasses included (timm's
StdConv2d / ScaledStdConv2d standardise their weight in forward), is left to the vmap path (`split_layers`).

Weights of convolutions with few output positions L (late stages) and of Linear layers take a second route. With
K backward passes (classes or draws) per batch, forming every dW_bk costs K*B*|W|*L and squaring it streams
K*B*|W| values through memory. Expanding the square instead,

    sum_k w_bk (G_bk U_b^T)^2 [o, i] = sum_{l, l'} A_b[o, l, l'] U_b[i, l] U_b[i, l'],
    A_b[o, l, l'] = sum_k w_bk G_bk[o, l] G_bk[o, l'],

accumulates the small A_b over the K passes and ends with one matrix product over (b, l <= l') (A is symmetric)
costing B*|W|*L(L+1)/2, no per-sample tensor ever formed. It is used when L(L+1)/2 < K*(L + 40) (the 40 stands for
the memory traffic of writing and squaring K*B*|W| values, measured on resnet18 on a CPU) and A fits a fixed
budget; a Linear layer is the case L = 1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..utils.errors import ConfigError


def _rule_classes() -> dict[type, str]:
    """The exact classes whose forward the rules below model, and the rule each gets.

    Exact types, not isinstance: a subclass may change the forward (timm's StdConv2d and ScaledStdConv2d
    standardise the weight inside it; ScaledStdConv2d adds a gain), and a rule written for the parent would then be
    silently wrong. Layers of any other class go to the vmap path.
    """
    from timm.layers import BatchNormAct2d, Conv2dSame
    from timm.layers import Linear as TimmLinear  # F.linear outside torchscript, exactly nn.Linear

    return {nn.Linear: "linear", TimmLinear: "linear", nn.Conv2d: "conv", Conv2dSame: "conv_same",
            nn.BatchNorm2d: "batchnorm", BatchNormAct2d: "batchnorm_act"}


_RULES: dict[type, str] | None = None


def rule_of(module: nn.Module) -> str | None:
    """The per-sample rule that models `module`'s forward exactly, or None (the layer then goes to vmap)."""
    global _RULES
    if _RULES is None:
        _RULES = _rule_classes()
    kind = _RULES.get(type(module))
    if kind in ("conv", "conv_same"):
        ok = module.padding_mode == "zeros" and isinstance(module.padding, tuple)
    elif kind in ("batchnorm", "batchnorm_act"):  # eval mode normalises with the running statistics
        ok = module.affine and module.track_running_stats and module.running_var is not None
        if kind == "batchnorm_act":  # the rule reads the gradient between the normalisation and the activation
            ok = ok and type(module.drop) is nn.Identity and isinstance(module.act, nn.Module)
    else:
        ok = kind is not None
    return kind if ok else None


def split_layers(model: nn.Module, names: set[str]) -> tuple[dict[str, nn.Module], dict[str, nn.Module]]:
    """The modules that directly own one of `names`, split into (with an exact rule, without one)."""
    ruled, other = {}, {}
    for module_name, module in model.named_modules():
        own = [f"{module_name}.{n}" if module_name else n for n, _ in module.named_parameters(recurse=False)]
        if any(n in names for n in own):
            (ruled if rule_of(module) is not None else other)[module_name] = module
    return ruled, other


def owners(model: nn.Module, names: set[str]) -> dict[str, nn.Module] | None:
    """Module name -> module for every module that directly owns one of `names`; None if any has no rule."""
    ruled, other = split_layers(model, names)
    return None if other else ruled


GRAM_BUDGET = 1 << 25  # elements of one layer's A (and of one chunk of U x U) on the Gram route
_SQUARING_COST = 40


class SquaredGradAccumulator:
    """Adds sum_b w_b (d theta / d out_b)^2 to `sums` for every backward pass run while it is active.

    Set `passes` to the number of backward passes that will run on the batch (it picks each layer's route), and
    `weights` before each pass. Everything is in `sums` once the context exits (or after `finish()`).
    """

    def __init__(self, model: nn.Module, sums: dict[str, Tensor], passes: int = 1):
        self.model, self.sums, self.passes = model, sums, passes
        self.layers = owners(model, set(sums))
        if self.layers is None:
            raise ConfigError("model has parameter-holding layers without a per-sample rule; use the vmap path.")
        self.weights: Tensor | None = None
        self._inputs: dict[str, Tensor] = {}
        self._cols: dict[str, Tensor] = {}  # unfolded conv inputs, reused by every backward pass of the batch
        self._gram: dict[str, Tensor] = {}  # A_b per layer on the Gram route, summed over the passes, (pairs, B, G, O)
        self._handles: list = []
        # The hooked tensors of the current forward: backward passes need to reach these and nothing before them
        # (not the input image, whose gradient through the first conv would cost a full-resolution pass).
        self.targets: list[Tensor] = []
        self._versions: list[tuple[Tensor, int]] = []  # each target and its version when its hook was registered

    def __enter__(self):
        for name, module in self.layers.items():
            self._handles.append(module.register_forward_hook(self._forward_hook(name, module)))
            if _is_bn_act(module):  # the gradient that matters is the one before the fused activation
                self._handles.append(module.act.register_forward_pre_hook(self._act_hook(name, module)))
        return self

    def __exit__(self, *exc):
        if exc[0] is None:
            self.finish()
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._inputs.clear()
        self._cols.clear()
        self._gram.clear()
        self.targets.clear()
        self._versions.clear()

    @torch.no_grad()
    def finish(self) -> None:
        """Contract the accumulated A_b of the Gram-route layers with their inputs into `sums`."""
        for name, a_sum in self._gram.items():
            module = self.layers[name]
            cols = _grouped_cols(module, self._layer_input(name, module))  # (B, G, I, L)
            batch, groups, width, positions = cols.shape
            first, second, twice = _pairs(positions, cols.device)
            a_sum = a_sum * twice[:, None, None, None]  # off-diagonal pairs stand for (l, l') and (l', l)
            out = torch.zeros(groups, a_sum.shape[-1], width, device=cols.device)
            step = max(1, GRAM_BUDGET // max(1, groups * width * len(first)))
            for b0 in range(0, batch, step):
                # Positions lead, so each pair's gather copies whole (b, G, I) blocks.
                u = cols[b0:b0 + step].permute(3, 0, 1, 2).contiguous()  # (L, b, G, I)
                uu = (u[first] * u[second]).permute(2, 0, 1, 3).flatten(1, 2)  # (G, pairs*b, I)
                a = a_sum[:, b0:b0 + step].permute(2, 0, 1, 3).flatten(1, 2)  # (G, pairs*b, O)
                out += torch.bmm(a.transpose(1, 2), uu)
            key = f"{name}.weight" if name else "weight"
            # Each entry of `out` is a sum over samples of squares, expanded into products: >= 0 in exact arithmetic,
            # so a negative value here is float round-off (about -1e-12 seen) and is clamped.
            self.sums[key] += out.clamp_(min=0).reshape(self.sums[key].shape)
        self._gram.clear()

    def _forward_hook(self, name, module):
        def hook(_module, args, output):
            self._inputs[name] = args[0].detach()
            if not _is_bn_act(module) and output.requires_grad:
                output.register_hook(lambda grad: self._accumulate(name, module, grad))
                self.targets.append(output)
                self._versions.append((output, output._version))
        return hook

    def _act_hook(self, name, module):
        def hook(_act, args):
            if args[0].requires_grad:
                args[0].register_hook(lambda grad: self._accumulate(name, module, grad))
                self.targets.append(args[0])
                self._versions.append((args[0], args[0]._version))
        return hook

    def modified_in_place(self) -> bool:
        """True when a hooked output was changed in place after its hook was registered (an in-place activation):
        that hook sits on the value before the change, which the backward reaches only on its way to something
        earlier. The caller then makes the model's input a target too."""
        return any(tensor._version != version for tensor, version in self._versions)

    def _layer_input(self, name: str, module: nn.Module) -> Tensor:
        if isinstance(module, nn.Conv2d):
            if name not in self._cols:
                self._cols[name] = _unfold(module, self._inputs[name].float())
            return self._cols[name]
        return self._inputs[name].float()

    def _use_gram(self, name: str, module: nn.Module, grad: Tensor) -> bool:
        key = f"{name}.weight" if name else "weight"
        if isinstance(module, nn.BatchNorm2d) or key not in self.sums:
            return False
        positions = grad[0, 0].numel() if isinstance(module, nn.Conv2d) else grad[0].numel() // grad.shape[-1]
        pairs = positions * (positions + 1) // 2
        outputs = grad.shape[1] if isinstance(module, nn.Conv2d) else grad.shape[-1]
        return pairs < self.passes * (positions + _SQUARING_COST) and grad.shape[0] * outputs * pairs <= GRAM_BUDGET

    @torch.no_grad()
    def _accumulate(self, name: str, module: nn.Module, grad: Tensor) -> None:
        g = grad.float() * self.weights.sqrt().view(-1, *([1] * (grad.ndim - 1)))  # w_b folded into both factors
        a = self._layer_input(name, module)
        prefix = f"{name}." if name else ""
        gram = self._use_gram(name, module, grad)
        if gram:
            d = _grouped_grads(module, g).permute(3, 0, 1, 2).contiguous()  # (L, B, G, O)
            first, second, _ = _pairs(d.shape[0], d.device)
            outer = d[first] * d[second]  # (pairs l <= l', B, G, O)
            if name in self._gram:
                self._gram[name] += outer
            else:
                self._gram[name] = outer
        for param_name, per_sample in _per_sample_grads(module, a, g, weight=not gram).items():
            key = prefix + param_name
            if key in self.sums:
                self.sums[key] += per_sample.square_().sum(0)


def _is_bn_act(module: nn.Module) -> bool:
    return rule_of(module) == "batchnorm_act"


def _unfold(module: nn.Conv2d, a: Tensor) -> Tensor:
    """(batch, Cin*kh*kw, L) patches of the conv input, padded as the layer pads (timm's Conv2dSame included)."""
    padding = module.padding
    if rule_of(module) == "conv_same":
        from timm.layers.padding import pad_same

        a = pad_same(a, module.kernel_size, module.stride, module.dilation)
        padding = (0, 0)
    return F.unfold(a, module.kernel_size, dilation=module.dilation, padding=padding, stride=module.stride)


_PAIRS: dict[tuple[int, str], tuple[Tensor, Tensor, Tensor]] = {}


def _pairs(positions: int, device) -> tuple[Tensor, Tensor, Tensor]:
    """Index pairs l <= l' of `positions`, and weights 2 (off-diagonal) / 1 (diagonal), cached per size."""
    key = (positions, str(device))
    if key not in _PAIRS:
        first, second = torch.triu_indices(positions, positions, device=device)
        _PAIRS[key] = (first, second, torch.where(first == second, 1.0, 2.0).to(device))
    return _PAIRS[key]


def _grouped_cols(module: nn.Module, a: Tensor) -> Tensor:
    """The layer input as (B, groups, inputs per group, positions): unfolded patches for a conv, tokens for Linear."""
    if isinstance(module, nn.Conv2d):  # `a` is the unfolded input (see _unfold)
        return a.view(a.shape[0], module.groups, -1, a.shape[-1])
    return a.reshape(a.shape[0], 1, -1, a.shape[-1]).transpose(2, 3) if a.ndim > 2 else a[:, None, :, None]


def _grouped_grads(module: nn.Module, g: Tensor) -> Tensor:
    """The output gradient as (B, groups, outputs per group, positions), matching `_grouped_cols`."""
    if isinstance(module, nn.Conv2d):
        return g.flatten(2).view(g.shape[0], module.groups, -1, g[0, 0].numel())
    return g.reshape(g.shape[0], 1, -1, g.shape[-1]).transpose(2, 3) if g.ndim > 2 else g[:, None, :, None]


def _per_sample_grads(module: nn.Module, a: Tensor, g: Tensor, weight: bool = True) -> dict[str, Tensor]:
    """Per-sample gradients (fresh tensors, safe to modify) of the module's parameters; `weight=False` skips W."""
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        out = {}
        if weight:
            cols, grads = _grouped_cols(module, a), _grouped_grads(module, g)
            out["weight"] = torch.einsum("bgol,bgil->bgoi", grads, cols).reshape(len(g), *module.weight.shape)
        if module.bias is not None:
            out["bias"] = _grouped_grads(module, g).sum(-1).flatten(1)
        return out
    # BatchNorm2d in eval mode: normalised with the running statistics
    xhat = (a - module.running_mean[None, :, None, None]) * torch.rsqrt(
        module.running_var[None, :, None, None] + module.eps)
    return {"weight": (g * xhat).sum((2, 3)), "bias": g.sum((2, 3))}
