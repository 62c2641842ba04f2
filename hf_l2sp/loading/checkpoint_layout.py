"""How each parameter of a model is stored in a checkpoint: the paper's S is read through this.

transformers 5 does not always hold a checkpoint tensor as it is stored:
- a module renamed on load (ViT's `encoder.layer` is `layers` in the model): one key, another name;
- tensors converted on load (a mixture of experts' per-expert `w1`/`w3`/`w2` fused into 3-D `gate_up_proj` /
  `down_proj`): one model tensor is several checkpoint tensors;
- tied weights: one tensor known by two names (XLM-R's `lm_head.decoder.weight` is the checkpoint's
  `roberta.embeddings.word_embeddings.weight`), and the checkpoint may store either.

`parameter_layouts` asks transformers itself, through `revert_weight_conversion` (what `save_pretrained` runs), how
each parameter would be saved, under each of its names. Nothing here guesses from names: a rename or a new converter
in transformers changes the answer with it, and a rename of the function fails at import, loudly.

`assemble` builds a parameter's pretrained value from the checkpoint's tensors. For a converted parameter it
reverts a tensor of element indices through the same conversion: each checkpoint tensor then says which elements of
the model tensor it holds, which inverts any split, stack, concatenation or transposition exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .model_parts import base_prefix, canonical_name, checkpoint_key, peft_base_model

Shapes = dict[str, tuple[int, ...]]


@dataclass
class ParameterLayout:
    """One parameter (canonical name as `named_parameters()` yields it) and the checkpoint tensors that hold it.

    forms: one {checkpoint key: shape} per name the parameter has (tied aliases give several); any one complete form
    in a checkpoint means the parameter's values came from it. converted: transformers builds it from other tensors
    on load (its forms list several keys, or reshape it).
    """

    name: str
    parameter: Tensor
    aliases: list[str]
    forms: list[Shapes] = field(default_factory=list)
    converted: bool = False
    model: nn.Module | None = field(default=None, repr=False)  # whose conversion `assemble` reverts
    #: The parameters transformers converts together with this one (q, k, v saved as one fused qkv tensor):
    #: (name, shape) of each, in order, this one included; empty when it is converted alone.
    group: list[tuple[str, tuple[int, ...]]] = field(default_factory=list)

    def found_in(self, shapes: Shapes) -> Shapes | None:
        """The first form whose every key `shapes` holds with the same shape."""
        return next((form for form in self.forms if all(shapes.get(k) == s for k, s in form.items())), None)

    def resized_rows(self, shapes: Shapes) -> int | None:
        """V when the checkpoint holds this parameter's first V rows only (a vocabulary grown with
        `resize_token_embeddings`: same trailing shape, fewer rows); else None."""
        if self.converted or self.parameter.ndim == 0:
            return None
        for form in self.forms:
            ((key, shape),) = form.items()
            saved = shapes.get(key)
            if saved is not None and len(saved) == len(shape) and saved[1:] == shape[1:] and saved[0] < shape[0]:
                return saved[0]
        return None

    def assemble(self, form: Shapes, state: dict[str, Tensor]) -> Tensor:
        """The parameter's pretrained value from the checkpoint tensors of `form` (`state`: key -> tensor)."""
        if not self.converted:
            ((key,),) = (tuple(form),)
            return state[key]
        members = self.group or [(self.aliases[0], tuple(self.parameter.shape))]
        indices, offset, start = {}, 0, 0
        total = sum(math.prod(shape) for _, shape in members)
        for name, shape in members:
            if name == self.aliases[0]:
                start = offset
            numel = math.prod(shape)
            indices[name] = torch.arange(offset, offset + numel, dtype=torch.int64).view(shape)
            offset += numel
        if total < 2 ** 31:
            indices = {name: index.int() for name, index in indices.items()}
        numel = self.parameter.numel()
        value = torch.empty(numel, dtype=state[next(iter(form))].dtype)
        covered = torch.zeros(numel, dtype=torch.bool)
        prefix = base_prefix(self.model)
        for key, piece in _revert(self.model, indices).items():
            key = checkpoint_key(key, prefix)
            if key not in form:
                continue
            piece = piece.reshape(-1).long() - start
            mine = (piece >= 0) & (piece < numel)  # the elements of this parameter among the group's
            value[piece[mine]] = state[key].reshape(-1)[mine].to(value.dtype)
            covered[piece[mine]] = True
        if not bool(covered.all()):
            raise RuntimeError(f"the checkpoint tensors {sorted(form)} do not cover {self.name}: transformers' "
                               "conversion for it is not a rearrangement of elements.")
        return value.view(self.parameter.shape)


def parameter_layouts(model: nn.Module) -> dict[str, ParameterLayout]:
    """Canonical name -> `ParameterLayout` for every parameter of `model` (any wrapper; a PEFT model's base)."""
    inner = peft_base_model(model)
    prefix = base_prefix(inner)
    layouts: dict[int, ParameterLayout] = {}
    metas: dict[str, Tensor] = {}
    owner: dict[str, ParameterLayout] = {}
    for name, param in inner.named_parameters(remove_duplicate=False):
        cname = canonical_name(name)
        layout = layouts.get(id(param))
        if layout is None:
            layout = layouts[id(param)] = ParameterLayout(cname, param, [], model=inner)
        layout.aliases.append(cname)
        owner[cname] = layout
        metas[cname] = torch.empty(param.shape, device="meta")
    saved = _revert(inner, dict(metas))
    by_tensor = {id(t): name for name, t in metas.items()}
    forms: dict[str, Shapes] = {}
    for key, tensor in saved.items():
        if id(tensor) in by_tensor:  # passed through unchanged: a 1:1 name
            forms[by_tensor[id(tensor)]] = {checkpoint_key(key, prefix): tuple(tensor.shape)}
    converted = [name for name in metas if name not in forms]
    joint = {checkpoint_key(k, prefix): tuple(t.shape) for k, t in saved.items() if id(t) not in by_tensor}
    for name in converted:
        pieces = _revert(inner, {name: metas[name]})
        # A tensor converted together with others (q, k, v -> one fused qkv) gets the fused key's real shape.
        forms[name] = {(key := checkpoint_key(k, prefix)): joint.get(key, tuple(t.shape)) for k, t in pieces.items()}
        owner[name].converted = True
    _group_shared_keys(converted, forms, owner, metas)
    for name, layout in owner.items():
        if forms.get(name):
            layout.forms.append(forms[name])
    return {layout.name: layout for layout in layouts.values()}


def _group_shared_keys(converted: list[str], forms: dict[str, Shapes], owner: dict[str, ParameterLayout],
                       metas: dict[str, Tensor]) -> None:
    """Parameters whose forms share a checkpoint key are converted together: record the group on each."""
    by_key: dict[str, list[str]] = {}
    for name in converted:
        for key in forms[name]:
            by_key.setdefault(key, []).append(name)
    for name in converted:
        members = sorted({m for key in forms[name] for m in by_key[key]}, key=converted.index)
        if len(members) > 1:
            owner[name].group = [(m, tuple(metas[m].shape)) for m in members]


def buffer_keys(model: nn.Module) -> set[str]:
    """The checkpoint keys (`checkpoint_key` form) `save_pretrained` writes for the model's buffers."""
    inner = peft_base_model(model)
    prefix = base_prefix(inner)
    metas = {canonical_name(n): torch.empty(b.shape, device="meta") for n, b in inner.named_buffers()}
    return {checkpoint_key(key, prefix) for key in _revert(inner, metas)} | {
        checkpoint_key(name, prefix) for name in metas}


def _revert(model: nn.Module, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """`save_pretrained`'s own renaming and conversion of `tensors` (model names -> checkpoint names)."""
    from transformers import PreTrainedModel
    from transformers.core_model_loading import revert_weight_conversion

    if not isinstance(model, PreTrainedModel):
        return tensors
    return revert_weight_conversion(model, tensors)
