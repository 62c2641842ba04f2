"""What a retention set measures, as plain functions of tensors and modules (no Trainer in here).

- `linear_cka(X, Y)`: linear centred kernel alignment between two feature matrices of the same examples (Kornblith
  et al. 2019): ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F), Xc, Yc centred by column, in float64. 1 for
  features that differ by a rotation and an isotropic scale, lower as the representation moves.
- `token_kl(start_logits, logits, mask)`: the forward KL(p_start || p) per predicted token, summed per sequence:
  sum_v p_start(v) (log p_start(v) - log p(v)) over the tokens `mask` keeps (the causal shift applied).
- `starting_weights(model, anchors)`: the model at w0 for the duration of a `with`, without a second copy: each
  parameter's storage is swapped with its anchor's (a PEFT model: its adapters disabled).
- `source_head(model, head_module, state)`: a copy of the task head's module holding the source checkpoint's tensors
  (e.g. timm's ImageNet classifier), to read the source task's predictions from the current features.
"""

from __future__ import annotations

import contextlib
import copy

import torch
from torch import Tensor, nn

from ..loading.model_parts import canonical_name, checkpoint_key, is_peft_model, unwrap_model


def linear_cka(x: Tensor, y: Tensor) -> float:
    """Linear CKA between features `x` (n, p) and `y` (n, q) of the same n examples; 1.0 exactly when they are
    equal. Computed in the smaller of the feature and the example space."""
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"linear_cka needs the same examples: {x.shape[0]} vs {y.shape[0]} rows")
    if torch.equal(x, y):
        return 1.0
    x = x.double() - x.double().mean(0)
    y = y.double() - y.double().mean(0)
    if x.shape[0] < max(x.shape[1], y.shape[1]):  # Gram matrices: n x n
        gx, gy = x @ x.T, y @ y.T
        cross, nx, ny = (gx * gy).sum(), gx.norm(), gy.norm()
    else:
        cross, nx, ny = (y.T @ x).square().sum(), (x.T @ x).norm(), (y.T @ y).norm()
    if nx == 0 or ny == 0:
        return 0.0
    return float(cross / (nx * ny))


def shifted_mask(labels: Tensor | None, attention_mask: Tensor | None, like: Tensor) -> Tensor:
    """Which next-token predictions count: position t predicts token t+1; a label of -100 (or padding) does not
    count. Shape (batch, seq - 1)."""
    if labels is not None:
        return labels[:, 1:] != -100
    if attention_mask is not None:
        return attention_mask[:, 1:].bool()
    return torch.ones(like.shape[0], like.shape[1] - 1, dtype=torch.bool, device=like.device)


def token_kl(start_logits: Tensor, logits: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Per sequence: the sum over its counted tokens of KL(p_start || p), and the number of counted tokens."""
    start = torch.log_softmax(start_logits[:, :-1].float(), dim=-1)
    current = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    per_token = (start.exp() * (start - current)).sum(-1)
    per_token = torch.where(mask, per_token, torch.zeros_like(per_token))
    return per_token.sum(-1), mask.sum(-1)


def _named_parameters(model: nn.Module):
    return [(canonical_name(name), param) for name, param in unwrap_model(model).named_parameters()]


def swappable(model: nn.Module, anchors: dict[str, Tensor]) -> list[str]:
    """The parameters `starting_weights` cannot restore: no anchor, or an anchor of another shape (resized rows).
    Empty for a PEFT model (the adapters are disabled instead)."""
    if is_peft_model(model):
        return []
    return [name for name, param in _named_parameters(model)
            if name not in anchors or tuple(anchors[name].shape) != tuple(param.shape)]


@contextlib.contextmanager
def starting_weights(model: nn.Module, anchors: dict[str, Tensor]):
    """The model at its starting point inside the block: a PEFT model with its adapters disabled (the frozen base),
    any other with each parameter's storage swapped for its anchor's (no copy; swapped back on exit)."""
    inner = unwrap_model(model)
    if is_peft_model(inner):
        with inner.disable_adapter():
            yield model
        return
    params = _named_parameters(model)
    missing = swappable(model, anchors)
    if missing:
        raise ValueError(f"no anchor of the right shape for {missing[:3]}: the starting model cannot be rebuilt")
    saved = []
    try:
        with torch.no_grad():
            for name, param in params:
                saved.append((param, param.data))
                param.data = anchors[name]
        yield model
    finally:
        with torch.no_grad():
            for param, data in saved:
                param.data = data


def find_module(model: nn.Module, name: str) -> nn.Module | None:
    """The submodule whose canonical name is `name` (wrappers and PEFT prefixes ignored)."""
    for module_name, module in unwrap_model(model).named_modules():
        if canonical_name(module_name) == name:
            return module
    return None


def source_head(model: nn.Module, head_name: str, state: dict[str, Tensor], prefix: str) -> tuple[nn.Module | None,
                                                                                                   str]:
    """A frozen copy of the head module `head_name` with the source checkpoint's tensors (`state`, keys as stored,
    `prefix` the model's base prefix), or None and why not."""
    module = find_module(model, head_name)
    if module is None:
        return None, f"the model has no module {head_name!r}"
    state = {checkpoint_key(key, prefix): value for key, value in state.items()}
    tensors = {}
    for local, param in module.named_parameters():
        key = checkpoint_key(f"{head_name}.{local}", prefix)
        if key not in state:
            return None, f"the source checkpoint has no {key!r}"
        if state[key].dim() != param.dim():
            return None, f"the source checkpoint's {key!r} has shape {tuple(state[key].shape)}"
        tensors[local] = state[key]
    head = copy.deepcopy(module)
    for local, value in tensors.items():
        owner, _, leaf = local.rpartition(".")
        target = head.get_submodule(owner) if owner else head
        old = getattr(target, leaf)
        setattr(target, leaf, nn.Parameter(value.to(device=old.device, dtype=old.dtype), requires_grad=False))
    head.eval()
    classes = next((v.shape[0] for k, v in tensors.items() if k.endswith("weight")), None)
    return head, f"the source checkpoint's head ({classes} classes)"
