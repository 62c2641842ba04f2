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
        numel = self.parameter.numel()
        index = torch.arange(numel, dtype=torch.int32 if numel < 2 ** 31 else torch.int64)
        pieces = _revert(self.model, {self.aliases[0]: index.view(self.parameter.shape)})
        value = torch.empty(numel, dtype=state[next(iter(form))].dtype)
        covered = torch.zeros(numel, dtype=torch.bool)
        prefix = base_prefix(self.model)
        for key, piece in pieces.items():
            value[piece.reshape(-1).long()] = state[checkpoint_key(key, prefix)].reshape(-1).to(value.dtype)
            covered[piece.reshape(-1).long()] = True
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
    for name in converted:
        pieces = _revert(inner, {name: metas[name]})
        forms[name] = {checkpoint_key(k, prefix): tuple(t.shape) for k, t in pieces.items()}
        owner[name].converted = True
    for name, layout in owner.items():
        if forms.get(name):
            layout.forms.append(forms[name])
    return {layout.name: layout for layout in layouts.values()}


def _revert(model: nn.Module, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """`save_pretrained`'s own renaming and conversion of `tensors` (model names -> checkpoint names)."""
    from transformers import PreTrainedModel
    from transformers.core_model_loading import revert_weight_conversion

    if not isinstance(model, PreTrainedModel):
        return tensors
    return revert_weight_conversion(model, tensors)
