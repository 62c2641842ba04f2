"""DeepSpeed ZeRO-3: Omega on each rank's partition of the fp32 master weights, with w0 partitioned the same way.

ZeRO-3 keeps a parameter whole only while its module runs; the rest of the time each rank holds one consecutive
part of the flattened tensor (and of its fp32 master copy, gradient and optimizer state). The quadratic penalties
are sums over values with a gradient value by value, so each rank computes them on its own part, against its own
part of w0 (1/world of the anchor per rank). The value's parts are summed across ranks when it is logged.

Why here, and not in the forward pass: a penalty on the gathered parameters would need w0 gathered with them (the
full anchor again, or its communication every step), and autograd would deliver its gradient to a parameter
that ZeRO-3 may already have released. Instead the penalty acts at the start of `engine.step()` at an accumulation
boundary: DeepSpeed has by then reduce-scattered and averaged the step's gradient into the partitions, and has not
yet measured the gradient norm, clipped or stepped. It reads and writes only through DeepSpeed's public partition
API (`deepspeed.utils.safe_get_local_fp32_param`, `safe_get_local_grad`, `safe_set_local_grad`,
`safe_set_local_fp32_param`):

- `sp_mode` 'loss' and 'grad':  g_r += coef * c_r * (w_r - a_r), once per optimizer step, before clipping: the
  gradient one process gets from Omega in the loss, whatever the accumulation. The value joins the logged loss as in
  'grad' mode.
- 'decoupled':  w_r <- w_r - lr * coef * c_r * (w_r - a_r) on the fp32 master before the optimizer's own update
  (DeepSpeed then copies the master into the 16-bit partition).

Supported: the quadratic penalties (l2, l2_sp, l2_sp_fisher; 'none' logs the distance). Refused at start, with the
reason: l1_sp and group_lasso_sp, the feature penalties, PEFT adapters, fp16 (see `check_zero3_supported`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from ..anchor.parameters import SPParameters, rows_numel
from ..anchor.reference import FlatPartition, Reference
from ..loading.model_parts import canonical_name, unwrap_model
from ..penalties.kernels import NormSums
from ..penalties.streaming import piece_budget
from ..penalties.weight import PenaltyTerms, QuadraticForm
from ..utils.errors import ConfigError

#: DeepSpeed attributes of a ZeRO-3 parameter this module reads; checked when the penalty attaches.
_PARAMETER_ATTRIBUTES = ("ds_id", "ds_numel", "ds_tensor", "ds_process_group")
#: Public partition API (deepspeed.utils) this module calls; checked when the penalty attaches.
_PARTITION_API = ("safe_get_local_fp32_param", "safe_set_local_fp32_param", "safe_get_local_grad",
                  "safe_set_local_grad")


def zero_stage(accelerator) -> int | None:
    """The DeepSpeed ZeRO stage accelerate runs, or None without DeepSpeed."""
    from accelerate.utils import DistributedType

    state = accelerator.state
    if state.distributed_type != DistributedType.DEEPSPEED:
        return None
    return getattr(getattr(state, "deepspeed_plugin", None), "zero_stage", None)


def penalty_route(stage: int | None, sp_mode: str) -> str:
    """Where Omega acts: 'partitions' under ZeRO-3 (every sp_mode, see the module doc), 'loss' for sp_mode 'loss',
    'optimizer' (a torch optimizer step hook) for 'grad' / 'decoupled'.

    DeepSpeed below ZeRO-3 steps with its own optimizer, which takes no torch step hooks and keeps no `.grad`:
    there 'grad' goes through the loss (the same gradient, added before clipping) and 'decoupled' is refused."""
    if stage == 3:
        return "partitions"
    if stage is not None and sp_mode == "decoupled":
        raise ConfigError(f"sp_mode='decoupled' under DeepSpeed ZeRO-{stage}: DeepSpeed's optimizer steps the fp32 "
                          "master weights, where hf_l2sp can apply a decoupled step only under ZeRO-3. Use ZeRO-3, or "
                          "sp_mode='grad' (or 'loss').")
    return "loss" if sp_mode == "loss" or stage is not None else "optimizer"


def check_zero3_supported(args, regularizer, features, adapters, mixed_precision: str | None) -> None:
    """Refuse at construction what ZeRO-3 cannot make exact here, with the reason and what to use instead."""
    where = "Under DeepSpeed ZeRO-3 hf_l2sp applies the penalty to each rank's partition of the fp32 master weights"
    if regularizer.active and regularizer.quadratic_form() is None:
        raise ConfigError(
            f"{where}, which it does for the quadratic penalties (l2, l2_sp, l2_sp_fisher); {regularizer.name!r} is "
            "not one (group lasso's groups also cross the partitions). Use ZeRO-2 or FSDP2 for it.")
    if any(f.active for f in features):
        raise ConfigError(
            f"{where}; the feature penalties ({', '.join(f.name for f in features if f.active)}) are not supported "
            "there: DELTA runs a frozen copy of the whole source network on every rank, which ZeRO-3 is there to "
            "avoid, and BSS has not been verified under ZeRO-3. Use ZeRO-2 or FSDP2 for them.")
    if adapters is not None and adapters.lora:
        raise ConfigError(f"{where}; PEFT adapters' penalty is computed from whole LoRA factors, which ZeRO-3 "
                          "partitions. Use ZeRO-2 (the adapters are small) or FSDP2.")
    if args.fp16 or mixed_precision == "fp16":
        raise ConfigError(f"{where}; with fp16 those gradients carry DeepSpeed's loss scale, which hf_l2sp does not "
                          "read. Use bf16 (bf16=True and mixed_precision: bf16 in the accelerate config).")


@dataclass
class _Part:
    """One tensor's values on this rank: the master partition's [lo, hi) are anchored (to `anchor`, weighted by
    `weights`) or new (`anchor` None, pulled to 0 by the head coefficient)."""

    param: torch.nn.Parameter
    lo: int
    hi: int
    anchor: Tensor | None
    weights: Tensor | None
    new: bool


class PartitionedPenalty:
    """A `QuadraticForm` applied to ZeRO-3 partitions at the start of each optimizer step (see the module doc).

    `on_terms` receives each step's local `PenaltyTerms` (partial sums: the log sums them across ranks).
    """

    def __init__(self, engine, params: SPParameters, form: QuadraticForm, reference: Reference, mode: str,
                 on_terms, active: bool, measure=None):
        import deepspeed.utils as ds_utils

        missing = [name for name in _PARTITION_API if not callable(getattr(ds_utils, name, None))]
        if missing:
            raise RuntimeError(f"deepspeed.utils no longer has {missing}: hf_l2sp cannot apply the penalty under "
                               "ZeRO-3 with this DeepSpeed. Install the tested one: deepspeed==0.19.8.")
        self.api, self.engine, self.form, self.mode, self.on_terms = ds_utils, engine, form, mode, on_terms
        self.parts = self._partition(params, form, reference)
        self._by_param: dict[int, list[_Part]] = {}  # a resized tensor has an anchored and a new part
        for part in self.parts:
            self._by_param.setdefault(id(part.param), []).append(part)
        device = self.parts[0].param.ds_tensor.device if self.parts else None
        self._budget = piece_budget([p.hi - p.lo for p in self.parts], device)  # values per piece, as elsewhere
        self.active = active
        self._measure = measure or (lambda: True)  # whether this optimizer step needs Omega's value
        if not callable(getattr(engine, "is_gradient_accumulation_boundary", None)):
            raise RuntimeError("The DeepSpeed engine has no is_gradient_accumulation_boundary(): cannot tell when an "
                               "optimizer step happens.")
        self._original_step = engine.step
        engine.step = self._step  # accelerate calls engine.step() right after the boundary's backward pass

    def detach(self) -> None:
        self.engine.step = self._original_step

    @staticmethod
    def _partition(params: SPParameters, form: QuadraticForm, reference: Reference) -> list[_Part]:
        """This rank's part of every penalised tensor, its anchor (and Fisher weights) cut alike."""
        layout = partition_anchor(params, reference)
        weights = form.weights or [None] * len(params.anchored)
        parts = []
        for name, param, weight in zip(params.anchored_names, params.anchored, weights):
            part = reference.partitions[name]
            local_weight = None if weight is None else weight.reshape(-1)[part.start: part.start + part.held].clone()
            parts.append(_Part(param, 0, part.held, reference.tensors[name], local_weight, False))
        for param, start in params.head_entries():
            where = layout[id(param)]
            first_new = rows_numel(param, start) if start else 0
            lo = min(max(first_new - where.start, 0), where.held)
            parts.append(_Part(param, lo, where.held, None, None, True))
        return [p for p in parts if p.hi > p.lo]

    def _step(self, *args, **kwargs):
        if self.active and self.engine.is_gradient_accumulation_boundary():
            terms = self.apply(update=True, measure=self._measure())
            if self.on_terms is not None:
                self.on_terms(terms)
        return self._original_step(*args, **kwargs)

    def measure(self) -> PenaltyTerms:
        """This rank's part of Omega and of ||w - w0||^2 now, nothing changed."""
        return self.apply(update=False)

    @torch.no_grad()
    def apply(self, update: bool, measure: bool = True) -> PenaltyTerms | None:
        """Local (value, head value, squared distance), adding the gradient or the decoupled step when `update`;
        None, and no sums taken, unless `measure`.

        Sums as the other passes take them (`NormSums`: fp32 rows, float64 across, no host sync per piece); for
        l2_sp the distance's sum of squares is the value's."""
        form = self.form
        lr = self._learning_rate() if update and self.mode == "decoupled" else None
        device = self.parts[0].param.ds_tensor.device if self.parts else None
        distance = NormSums(2)  # sum (w - w0)^2 over the anchored parts
        anchored = distance if form.use_anchors and form.weights is None else NormSums(2)  # sum c x^2, x the pull
        head = NormSums(2)
        for parts in self._by_param.values():
            param = parts[0].param
            master = self.api.safe_get_local_fp32_param(param)
            target = None
            if update and self.mode == "decoupled":
                target = master.clone()
            elif update:
                target = self.api.safe_get_local_grad(param).clone()
            for part in parts:
                coef = form.head_coef if part.new else form.coef
                sums = head if part.new else anchored
                for lo in range(part.lo, part.hi, self._budget):
                    hi = min(part.hi, lo + self._budget)
                    w = master[lo:hi].float()
                    if not part.new:
                        to_anchor = w - part.anchor[lo:hi]
                        if measure:
                            distance.add([to_anchor])
                    if not coef:
                        continue
                    pull = to_anchor if not part.new and form.use_anchors else w
                    if part.weights is not None:
                        c = part.weights[lo:hi].float()
                        if measure:
                            sums.add([torch.sqrt(c) * pull])
                        pull = c * pull
                    elif sums is not distance and measure:
                        sums.add([pull])
                    if target is not None:
                        target[lo:hi].add_(pull, alpha=-lr * coef if self.mode == "decoupled" else coef)
            if target is not None:
                if self.mode == "decoupled":
                    self.api.safe_set_local_fp32_param(param, target)
                else:
                    self.api.safe_set_local_grad(param, target)
        if not measure:
            return None
        zero = torch.zeros((), dtype=torch.float64, device=device)
        anchored_value = 0.5 * form.coef * anchored.total(device) if form.coef else zero
        head_value = 0.5 * form.head_coef * head.total(device) if form.head_coef else zero
        anchored_value, head_value, sq_distance = (t.float() for t in (anchored_value, head_value,
                                                                        distance.total(device)))
        return PenaltyTerms(penalty=anchored_value + head_value, head_penalty=head_value,
                            distance=sq_distance.clamp(min=0).sqrt())

    def _learning_rate(self) -> float:
        rates = set(self.engine.get_lr())
        if len(rates) != 1:
            raise ConfigError(f"sp_mode='decoupled' under ZeRO-3 needs one learning rate for every parameter group, "
                              f"got {sorted(rates)}: use sp_mode='grad' or one learning rate.")
        return rates.pop()



def gathered_values(model: torch.nn.Module) -> dict[str, Tensor]:
    """Canonical name -> whole value of every ZeRO-3 partitioned parameter, gathered one at a time (a collective:
    every process calls it). For the drift report of a finished run."""
    import deepspeed  # `deepspeed.zero` is an attribute of the package, not an importable module

    values = {}
    for name, param in unwrap_model(model).named_parameters():
        if hasattr(param, "ds_id"):
            with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
                values[canonical_name(name)] = param.detach().clone()
    return values


def is_partitioned(model: torch.nn.Module) -> bool:
    """Whether DeepSpeed ZeRO-3 has partitioned the parameters of `model` (each rank holds a part of each)."""
    return any(hasattr(p, "ds_id") for p in model.parameters())


def whole_parameters(model: torch.nn.Module):
    """A context in which a model DeepSpeed already partitioned has its parameters whole (gathered on every rank),
    so that it can be anchored and sorted like any model; a no-op otherwise. Under ZeRO-3 `transformers` builds a
    model partitioned whenever its TrainingArguments exist already, the usual order in a script."""
    if not is_partitioned(model):
        return contextlib.nullcontext()
    import deepspeed  # `deepspeed.zero` is an attribute of the package, not an importable module

    return deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None)


def partition_anchor(params: SPParameters, reference: Reference) -> dict[int, FlatPartition]:
    """Keep of every anchor only this rank's flat part, laid out as ZeRO-3 partitions its parameter (the full copy
    is freed). Returns each penalised parameter's partition, by `id`."""
    layout: dict[int, FlatPartition] = {}
    for param in params.anchored + params.head:
        missing = [a for a in _PARAMETER_ATTRIBUTES if not hasattr(param, a)]
        if missing:
            raise RuntimeError(f"A ZeRO-3 parameter has no {missing}: DeepSpeed changed how it partitions; hf_l2sp "
                               "cannot find this rank's values.")
        size = param.ds_tensor.ds_numel
        start = size * dist.get_rank(group=param.ds_process_group)
        held = max(0, min(size, param.ds_numel - start))
        layout[id(param)] = FlatPartition(tuple(param.ds_shape), start, size, held, param.ds_process_group)
    parts = {}
    for name, (param, _, rows) in zip(params.anchored_names, params.anchored_entries()):
        where = layout[id(param)]
        end = rows_numel(param, rows)  # a resized tensor's pretrained rows are its first values
        held = max(0, min(where.start + where.held, end) - where.start)
        shape = where.shape if rows is None else (rows, *where.shape[1:])
        parts[name] = FlatPartition(shape, where.start, where.size, held, where.group)
    reference.keep_partitions(parts)
    params.anchors[:] = [reference.tensors[name] for name in params.anchored_names]  # the full copies go
    return layout
