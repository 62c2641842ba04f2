"""The anchor w0: a snapshot of the pretrained tensors, kept outside the model's state dict.

A snapshot keeps each tensor in its parameter's own dtype (an exact copy: a bf16 model's w0 costs the bytes of its
parameters, not twice as many); the penalties compute in fp32 whatever the dtype.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..loading.checkpoint_layout import buffer_keys, parameter_layouts
from ..loading.model_parts import base_prefix, canonical_name, checkpoint_key, head_parameter_names, unwrap_model
from ..loading.weights import read_state_dict
from ..utils.errors import ConfigError
from ..utils.text import first_few
from .parameters import is_sharded, local_view

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FlatPartition:
    """Where one rank's part of a tensor lies when the flattened tensor is cut into equal consecutive parts (DeepSpeed
    ZeRO-3's layout): values [start, start + size) of `shape` flattened, of which the first `held` exist (the last
    parts are shorter, or empty); `group` is the process group the parts are spread over."""

    shape: tuple[int, ...]
    start: int
    size: int
    held: int
    group: object = None


@dataclass
class Reference:
    """Anchors w0 by canonical parameter name, and where they came from (for logs and model cards).

    head_names: the new tensors (S-bar), which have no anchor.
    """

    tensors: dict[str, Tensor]
    source: str
    head_names: list[str] = field(default_factory=list)
    #: The model w0 comes from (`config._name_or_path` at the snapshot, or sp_reference): stays the same on resume.
    base_model: str | None = None
    #: Which tensors were new when w0 was taken, and why (for the card; kept across resumes like the anchor).
    new_description: str | None = None
    _fingerprint: str | None = field(default=None, repr=False, compare=False)
    #: DeepSpeed ZeRO-3: name -> this rank's flat part of the anchor (`keep_partitions`); the tensor is that part.
    partitions: dict[str, FlatPartition] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def snapshot(cls, model: nn.Module, head_modules: list[str], device: torch.device | str | None = None,
                 source: str | None = None, new_names: Iterable[str] = (),
                 trainable_only: bool = False, resized: dict[str, int] | None = None) -> Reference:
        """Copy every parameter of `model` except the head's and `new_names` (detached, in the parameter's own
        dtype, on `device`). `trainable_only`: skip frozen tensors too (a PEFT model's frozen base is its own w0).
        `resized`: name -> V for a tensor whose first V rows only are pretrained; its anchor is those rows."""
        heads = head_parameter_names(model, head_modules) | set(new_names)
        resized = resized or {}
        tensors = {}
        with torch.no_grad():
            for name, param in unwrap_model(model).named_parameters():
                cname = canonical_name(name)
                if cname not in heads and (param.requires_grad or not trainable_only):
                    if param.numel() == 0 and getattr(param, "ds_numel", 0):
                        raise ConfigError(f"{cname} is partitioned by DeepSpeed ZeRO-3: snapshot the model inside "
                                          "deepspeed.zero.GatheredParameters, or let SPTrainer take the snapshot.")
                    value = param.detach()[: resized[cname]] if cname in resized else param.detach()
                    tensors[cname] = value.to(device=device or param.device, copy=True)
        base = getattr(getattr(unwrap_model(model), "config", None), "_name_or_path", None) or None
        name = base or type(model).__name__
        return cls(tensors, source or f"snapshot of {name} when SPTrainer was built", sorted(heads), base)

    @classmethod
    def from_checkpoint(cls, path_or_repo: str, model: nn.Module, head_modules: list[str],
                        device: torch.device | str | None = None, revision: str | None = None,
                        new_names: Iterable[str] = ()) -> Reference:
        """Load anchors from a checkpoint folder, weights file or Hub repo and check them against `model`.

        Keys may carry the model's base prefix or not (timm files vs transformers files), and are matched through
        transformers' own renaming and conversion (`checkpoint_layout`): fused expert tensors are assembled from
        the per-expert tensors, a tied tensor is found under any of its names. Every trainable non-head parameter
        must be present with the same shape, or with fewer rows (a resized vocabulary: those rows are its anchor);
        keys of the file that the model has no place for (a base model's pooler) are skipped, as `from_pretrained`
        skips them, once every other check passes; head tensors of another shape become new parameters (S-bar).
        `new_names` are new tensors (e.g. a layer the source checkpoint lacks) treated like the
        head. Anchors keep the file's float dtype.
        """
        state = read_state_dict(path_or_repo, revision, what="sp_reference")
        inner = unwrap_model(model)
        prefix = base_prefix(inner)
        state = {checkpoint_key(key, prefix): value for key, value in state.items()}
        shapes = {key: tuple(value.shape) for key, value in state.items()}
        heads = head_parameter_names(model, head_modules) | set(new_names)
        buffers = buffer_keys(inner)

        used, missing, wrong_shape, tensors, new = set(buffers), [], [], {}, []
        for cname, layout in parameter_layouts(inner).items():
            keys = {key for form in layout.forms for key in form}
            label = next(iter(layout.forms[0])) if layout.forms and len(layout.forms[0]) == 1 else cname
            used |= keys
            form = layout.found_in(shapes)  # S is what the reference holds: a head of the same shape too
            rows = None if form is not None or cname in heads else layout.resized_rows(shapes)
            if form is None and rows is None and (cname in heads or not layout.parameter.requires_grad):
                new.append(cname)
                continue
            if form is not None:
                value = layout.assemble(form, state)
            elif rows is not None:
                value = state[next(k for f in layout.forms for k in f if k in state)]
            elif present := [shapes[k] for k in sorted(keys) if k in shapes]:
                wrong_shape.append(f"{label}: reference {present[0] if len(present) == 1 else present} vs "
                                   f"model {tuple(layout.parameter.shape)}")
                continue
            else:
                missing.append(label)
                continue
            value = value.detach().to(device=device or "cpu")
            tensors[cname] = value if value.is_floating_point() else value.to(layout.parameter.dtype)
        unexpected = sorted(set(state) - used)
        problems = []
        if unexpected and (missing or wrong_shape or not tensors):
            problems.append(f"keys not in the model: {first_few(unexpected)}")
        elif unexpected:  # a base checkpoint's parts the task model drops (a pooler): transformers skips them too
            logger.info("hf_l2sp: sp_reference %s holds tensors %s has no place for (skipped, as "
                        "from_pretrained does): %s", path_or_repo, type(inner).__name__, first_few(unexpected))
        if missing:
            problems.append(f"model parameters missing from the reference: {first_few(missing)}")
        if wrong_shape:
            problems.append(f"shape mismatches outside the head: {first_few(sorted(wrong_shape))}")
        if problems:
            raise ConfigError(
                f"sp_reference {path_or_repo!r} does not match {type(inner).__name__}: " + "; ".join(problems)
                + ". Point sp_reference at the checkpoint this model was initialised from."
            )
        source = path_or_repo + (f"@{revision}" if revision else "")
        return cls(tensors, source, sorted(new), path_or_repo)

    def fingerprint(self) -> str:
        """SHA-256 over names, shapes and bytes of the anchors (to verify an anchor restored later)."""
        if self._fingerprint is None:
            self._fingerprint = self._hash()
        return self._fingerprint

    def _hash(self) -> str:
        digest = hashlib.sha256()
        tensors = self.full_tensors()
        for name in sorted(tensors):
            tensor = tensors[name].detach().cpu().contiguous()
            digest.update(name.encode())
            digest.update(json.dumps(list(tensor.shape)).encode())
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())  # any dtype, bf16 included
        return digest.hexdigest()

    def shard_like(self, model: nn.Module) -> None:
        """FSDP2: replace each anchor whose parameter is a DTensor shard by a DTensor sharded the same way.

        Each process then holds only its own shard of w0 (sliced locally, no communication) and the full copy is
        freed. The fingerprint is taken first, from the full tensors, so a resumed run can still verify it.
        """
        targets = {}
        for name, param in unwrap_model(model).named_parameters():
            anchor = self.tensors.get(canonical_name(name))
            if anchor is not None and is_sharded(param) and not is_sharded(anchor) and anchor.shape == param.shape:
                targets[canonical_name(name)] = param
        if not targets:
            return
        from torch.distributed.tensor import distribute_tensor

        self.fingerprint()
        for name, param in targets.items():
            local = self.tensors[name].to(local_view(param).device)
            self.tensors[name] = distribute_tensor(local, param.device_mesh, param.placements, src_data_rank=None)

    def keep_partitions(self, parts: dict[str, FlatPartition]) -> None:
        """DeepSpeed ZeRO-3: keep of each named anchor only this rank's flat part (a copy; the full tensor is freed),
        as ZeRO-3 keeps of its parameter. The fingerprint is taken first, from the full tensors."""
        self.fingerprint()
        for name, part in parts.items():
            if name in self.partitions:
                continue
            flat = self.tensors[name].reshape(-1)
            self.tensors[name] = flat[part.start: part.start + part.held].clone()
            self.partitions[name] = part

    def full_tensors(self) -> dict[str, Tensor]:
        """Name -> full anchor. With FSDP2 shards or ZeRO-3 partitions this gathers them: every process must call
        it, in the same order (a collective)."""
        return {name: self._gathered(name, t) if name in self.partitions else t.full_tensor() if is_sharded(t) else t
                for name, t in self.tensors.items()}

    def _gathered(self, name: str, local: Tensor) -> Tensor:
        import torch.distributed as dist

        part = self.partitions[name]
        padded = torch.zeros(part.size, dtype=local.dtype, device=local.device)
        padded[: local.numel()] = local
        parts = [torch.empty_like(padded) for _ in range(dist.get_world_size(part.group))]
        dist.all_gather(parts, padded, group=part.group)
        numel = math.prod(part.shape)
        return torch.cat(parts)[:numel].reshape(part.shape)

    def local_bytes(self) -> int:
        """Bytes of w0 this process holds (its shards only, under FSDP2)."""
        return sum(local_view(t).numel() * local_view(t).element_size() for t in self.tensors.values())

    def shape_of(self, name: str) -> tuple[int, ...]:
        """The whole anchor's shape (also when this rank keeps a partition of it)."""
        part = self.partitions.get(name)
        return tuple(part.shape) if part is not None else tuple(self.tensors[name].shape)

    def num_parameters(self) -> int:
        return sum(math.prod(self.partitions[n].shape) if n in self.partitions else t.numel()
                   for n, t in self.tensors.items())
