"""Which parameters the penalty sees: names under wrappers, the new head, the `sp_include` filter, S vs S-bar."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from functools import cached_property

from torch import Tensor, nn

from ..loading.model_parts import base_prefix, canonical_name, checkpoint_key, feature_weight_names, unwrap_model
from ..utils.errors import ConfigError
from ..utils.text import first_few
from .adapters import AdapterPlan, LoraTerm

INCLUDE_CHOICES = ("weights", "all")


class PenalisedTensors(list):
    """The tensors a penalty reads (local, row-cut views of parameters) and where each one's gradient goes:
    `targets` holds (parameter, slice of its local rows) per view; `direct`: the penalty kernels may write gradients
    straight into `.grad` (`penalties.streaming`), instead of returning them to autograd. A plain list works too:
    the kernels then return the gradients."""

    def __init__(self, views, targets=None, direct: bool = True):
        super().__init__(views)
        self.targets, self.direct = targets, direct


@dataclass
class SPParameters:
    """The parameter sets of one model, resolved against a reference.

    anchored: trainable tensors of S that the penalty sees, with their anchors w0 (same order; the parameter's dtype);
    head: trainable tensors of S-bar (new or reshaped) that the penalty sees. Names are canonical; `anchored_keys`
    are the checkpoint keys (see `checkpoint_key`) used to match Fisher files.

    A resized tensor (a vocabulary grown after loading) is in both lists: `anchored_rows[i]` = V says that only its
    rows [0, V) are anchored (None: the whole tensor), and `head_from[j]` = V that only its rows from V on are new
    (0: the whole tensor). `anchored_views()` / `head_views()` give exactly the penalised (local) values.
    """

    anchored_names: list[str]
    anchored_keys: list[str]
    anchored: list[Tensor]
    anchors: list[Tensor]
    head_names: list[str]
    head: list[Tensor]
    #: PEFT LoRA adapters: their distance to the frozen base is computed from the factors (anchor/adapters.py).
    lora: list[LoraTerm] = field(default_factory=list)
    anchored_rows: list[int | None] = field(default_factory=list)
    head_from: list[int] = field(default_factory=list)
    #: Values of every trainable tensor of the model (LoRA factors included): what the coverage shares divide.
    trainable_values: int = 0

    #: Penalty kernels write gradients straight into `.grad` (False under DeepSpeed, which moves them out).
    direct_gradients: bool = True

    def anchored_views(self) -> PenalisedTensors:
        """The anchored values the penalty sees: local shards, cut to their pretrained rows (differentiable), and
        where their gradients go."""
        slices = [slice(rows) for rows in self._rows()]
        return PenalisedTensors([cut(local_view(p), sl) for p, sl in zip(self.anchored, slices)],
                                list(zip(self.anchored, slices)), self.direct_gradients)

    def head_views(self) -> PenalisedTensors:
        """The new values the penalty sees: local shards, from their first new row on (differentiable)."""
        slices = [slice(start or None, None) for start in self._starts()]
        return PenalisedTensors([cut(local_view(p), sl) for p, sl in zip(self.head, slices)],
                                list(zip(self.head, slices)), self.direct_gradients)

    def _rows(self) -> list[int | None]:
        return self.anchored_rows or [None] * len(self.anchored)

    def _starts(self) -> list[int]:
        return self.head_from or [0] * len(self.head)

    def anchored_entries(self) -> list[tuple[Tensor, Tensor, int | None]]:
        """(parameter, anchor, anchored rows or None) for each anchored tensor."""
        return list(zip(self.anchored, self.anchors, self._rows()))

    def head_entries(self) -> list[tuple[Tensor, int]]:
        """(parameter, first new row) for each new tensor."""
        return list(zip(self.head, self._starts()))

    @cached_property
    def sharded(self) -> bool:
        """Any FSDP2 shard among the parameters (fixed once resolved; read in every training step)."""
        return any(is_sharded(p) for p in self.anchored + self.head)

    def summary(self) -> dict[str, int]:
        out = {
            "anchored_tensors": len(self.anchored),
            "anchored_parameters": sum(rows_numel(p, rows) for p, rows in zip(self.anchored, self._rows())),
            "head_tensors": len(self.head),
            "head_parameters": self._new_values(),
        }
        if self.lora:
            out.update(lora_layers=len(self.lora),
                       lora_parameters=sum(t.lora_A.numel() + t.lora_B.numel() for t in self.lora))
        return {**out, **self.coverage()}

    def coverage(self) -> dict[str, float]:
        """Shares of the trainable values: anchored (alpha; LoRA factors, measured against their frozen base,
        count here), new (beta) and free (neither: left out by `sp_include`)."""
        total = self.trainable_values
        anchored = sum(rows_numel(p, rows) for p, rows in zip(self.anchored, self._rows()))
        anchored += sum(t.lora_A.numel() + t.lora_B.numel() for t in self.lora)
        new = self._new_values()
        if not total:
            return {"anchored_share": 0.0, "new_share": 0.0, "free_share": 0.0}
        return {"anchored_share": anchored / total, "new_share": new / total,
                "free_share": max(total - anchored - new, 0) / total}

    def _new_values(self) -> int:
        return sum(logical_numel(p) - rows_numel(p, start) if start else logical_numel(p)
                   for p, start in self.head_entries())

    def coverage_text(self) -> str:
        shares = self.coverage()
        return (f"{self.trainable_values:,} trainable values: {shares['anchored_share']:.1%} anchored, "
                f"{shares['new_share']:.1%} new, {shares['free_share']:.1%} free")


def is_sharded(tensor: Tensor) -> bool:
    """True for a DTensor (FSDP2 parameter shard)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return False
    return isinstance(tensor, DTensor)


def fsdp_unsharded_now(model: nn.Module) -> bool:
    """True while an FSDP2 unit of `model` holds its gathered (plain) parameters, between its forward and backward.

    Its registered parameters are then temporary full tensors, not the shards the optimizer steps.
    """
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules()) and not all(
        is_sharded(p) for p in model.parameters())


def local_view(tensor: Tensor) -> Tensor:
    """The rank's own shard of a DTensor (differentiable), or the tensor itself."""
    return tensor.to_local() if is_sharded(tensor) else tensor


def cut(tensor: Tensor, rows: slice) -> Tensor:
    """`tensor[rows]`, or the tensor itself for the whole range (a 0-d tensor has no rows to slice)."""
    return tensor if rows == slice(None) else tensor[rows]


def rows_view(tensor: Tensor, rows: int | None) -> Tensor:
    """`tensor[:rows]` (its first rows), or the tensor itself for None."""
    return tensor if rows is None else tensor[:rows]


def rows_numel(tensor: Tensor, rows: int | None) -> int:
    """Values in `tensor[:rows]` (the whole tensor for None), from its global shape (a DTensor's, or a ZeRO-3
    partitioned parameter's, too)."""
    numel, shape = logical_numel(tensor), getattr(tensor, "ds_shape", tensor.shape)
    if rows is None:
        return numel
    return rows * (numel // shape[0])


def logical_numel(tensor: Tensor) -> int:
    """The values of the whole tensor, also when DeepSpeed ZeRO-3 holds only a partition of it (`ds_numel`)."""
    numel = getattr(tensor, "ds_numel", None)
    return tensor.numel() if numel is None else numel


def anchored_rows(anchor: Tensor, param: Tensor) -> int | None | bool:
    """How `anchor` covers `param`: None for the whole tensor (same shape), V when it holds the first V rows only
    (same trailing shape: a resized vocabulary), False when it does not line up."""
    if tuple(anchor.shape) == tuple(param.shape):
        return None
    if anchor.ndim == param.ndim >= 1 and anchor.shape[1:] == param.shape[1:] and anchor.shape[0] < param.shape[0]:
        return anchor.shape[0]
    return False


def local_anchor(anchor: Tensor, param: Tensor) -> Tensor:
    """The part of an anchor that lines up with the local shard of `param` (FSDP2: uneven dim-0 shards too).

    An anchor already sharded like its parameter (`Reference.shard_like`) is just its local tensor; a full anchor
    is sliced locally (`src_data_rank=None`: every process holds the same full tensor, nothing is sent).
    """
    if is_sharded(anchor):
        return anchor.to_local()
    if not is_sharded(param):
        return anchor
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(anchor, param.device_mesh, param.placements, src_data_rank=None).to_local()


def resolve_parameters(model: nn.Module, reference: dict[str, Tensor], include: str,
                       adapters: AdapterPlan | None = None) -> SPParameters:
    """Split the trainable parameters of `model` (any wrapper) into S (in `reference`, same shape) and S-bar.

    `reference` maps canonical names to anchors. `include='weights'` keeps only conv/linear weights in both sets
    (BatchNorm affine parameters and biases are free, as in the paper's code); `'all'` keeps every trainable tensor.
    Frozen tensors are never penalised. Under FSDP2 the parameters are DTensor shards: each anchor is cut to the
    local shard, the penalty is computed on local tensors (its gradient reaches each shard exactly) and the logged
    values are partial sums that the trainer all-reduces. `adapters` (a PEFT model's plan): LoRA factors go to
    `lora`, never to the plain sets, and a `modules_to_save` copy is anchored to its frozen original module.
    """
    if include not in INCLUDE_CHOICES:
        raise ConfigError(f"sp_include must be one of {INCLUDE_CHOICES}, got {include!r}.")
    inner = unwrap_model(model)
    prefix = base_prefix(inner)
    allowed = feature_weight_names(inner) if include == "weights" else None
    sets = SPParameters([], [], [], [], [], [])
    lora_names = set(adapters.lora_parameter_names) if adapters else set()
    originals = adapters.originals if adapters else {}
    for name, param in model.named_parameters():
        cname = canonical_name(name)
        if param.numel() == 0 and getattr(param, "ds_numel", 0):
            raise ConfigError(
                f"{cname} is partitioned by DeepSpeed ZeRO-3, so hf_l2sp cannot read it to anchor or sort it here. "
                "SPTrainer gathers a partitioned model while it anchors it; call refresh_sp_parameters() only "
                "before training starts.")
        sets.trainable_values += param.numel() if param.requires_grad else 0
        if cname in lora_names:
            continue
        if not param.requires_grad or (allowed is not None and cname not in allowed):
            continue
        anchor = originals.get(cname, reference.get(cname))
        rows = False if anchor is None else anchored_rows(anchor, param)
        if rows is not False:
            if rows is not None and is_sharded(param):
                raise ConfigError(
                    f"{cname} was resized after loading (its first {rows} rows are pretrained) and is sharded by "
                    "FSDP2; anchoring part of a sharded tensor is not supported. Resize in the source checkpoint, "
                    "or train it without sharding.")
            sets.anchored_names.append(cname)
            sets.anchored_keys.append(checkpoint_key(cname, prefix))
            sets.anchored.append(param)
            sets.anchored_rows.append(rows)
            anchor = local_anchor(anchor, param)  # under FSDP2 each rank keeps only its shard of w0
            device = local_view(param).device
            sets.anchors.append(anchor if anchor.device == device else anchor.to(device))
        if rows is not None:  # no anchor, another shape, or resized: (its added rows) new
            sets.head_names.append(cname)
            sets.head.append(param)
            sets.head_from.append(rows or 0)
    if adapters:
        sets.lora = list(adapters.lora)
    return sets


def full_values(model: nn.Module) -> dict[str, Tensor]:
    """Canonical name -> full parameter value; FSDP2 shards are gathered (a collective: every process calls it)."""
    return {canonical_name(name): p.full_tensor() if is_sharded(p) else p
            for name, p in unwrap_model(model).named_parameters()}


def check_something_is_anchored(model: nn.Module, sets: SPParameters, regularizer, spec, include: str) -> None:
    """A weight penalty with alpha > 0 that anchors no tensor would silently become an L2 on the new tensors alone:
    refuse when trainable tensors are left out, warn when every trainable tensor is new."""
    if not regularizer.active or not regularizer.alpha or sets.anchored or sets.lora or not spec.weight_named:
        return
    new = set(sets.head_names)
    free = [canonical_name(n) for n, p in model.named_parameters() if p.requires_grad and canonical_name(n) not in new]
    message = (f"regularizer={spec.label!r} with sp_alpha={regularizer.alpha} anchors no tensor of "
               f"{type(unwrap_model(model)).__name__} (sp_include={include!r}, {len(sets.head)} new tensors)")
    if free:
        raise ConfigError(f"{message}: its trainable tensors {first_few(free)} are neither anchored nor new. "
                          "Use sp_include='all' to anchor every trainable tensor, or check sp_head.")
    warnings.warn(f"{message}: every trainable tensor is new, so alpha acts on nothing and only beta's L2 on the "
                  "new tensors remains.", UserWarning, stacklevel=3)


def check_groups_defined(sets: SPParameters, regularizer, converted: list[str]) -> None:
    """A penalty over output-channel groups is exact only where a tensor's rows are one checkpoint tensor's rows:
    refuse it on tensors transformers fuses on load (a mixture of experts' 3-D experts, a fused qkv)."""
    fused = sorted(set(converted) & set(sets.anchored_names))
    if getattr(regularizer, "groups_rows", False) and regularizer.active and fused:
        raise ConfigError(f"regularizer {regularizer.name!r} groups each tensor by output channel, but "
                          f"{first_few(fused)} are fused by transformers from several checkpoint tensors (experts), "
                          "whose channels are not the fused tensor's rows. Use l2_sp or l1_sp on this model.")


def check_adapters_supported(sets: SPParameters, regularizer, features, sp_mode: str) -> None:
    """LoRA adapters get only what is exact on their factors: refuse the rest, naming what would work."""
    if not sets.lora or not regularizer.active:
        return
    if not regularizer.supports_adapters:
        raise ConfigError(f"regularizer {regularizer.name!r} has no exact form on LoRA adapters without forming "
                          "B A for every layer at every step; use l2_sp or group_lasso_sp (exact on the factors), "
                          "or regularizer='none'.")
    if sp_mode != "loss":
        raise ConfigError(f"sp_mode={sp_mode!r} applies a closed-form gradient to plain tensors; on LoRA adapters "
                          "the penalty acts through the loss: use sp_mode='loss'.")
    experts = [t.name for t in sets.lora if hasattr(t, "expert_factors")]
    if getattr(regularizer, "groups_rows", False) and experts:
        raise ConfigError(f"regularizer {regularizer.name!r} groups by output channel, which LoRA on fused expert "
                          f"weights ({first_few(experts)}) does not line up with; use l2_sp on these adapters.")
    if any(f.name == "delta" for f in features):
        raise ConfigError("DELTA compares feature maps with a frozen copy of the source network; with LoRA that "
                          "is not built yet. Use l2_sp (or add bss).")
