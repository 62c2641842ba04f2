"""PEFT adapters as the penalty sees them.

With LoRA the pretrained weight W0 stays frozen in the model and the effective weight is W = W0 + s B A, so the
distance to the starting point is s B A itself: w0 needs no copy. For one adapted layer (B: out x r, A: r x in,
a convolution's factors flattened the same way)

    ||W - W0||_F^2 = s^2 ||B A||_F^2 = s^2 sum((B^T B) * (A A^T))      (* elementwise, r x r matrices)

which costs O(r^2 (out + in)) and never forms B A. Row g of W - W0 (one output channel) has squared norm
s^2 B_g (A A^T) B_g^T, which gives group lasso exactly at O(out r^2 + r^2 in).

`modules_to_save` copies train a full copy of a module next to its frozen original: the original is their anchor
(again no copy), unless the module is the task head, which is new (beta).

Refused, with a message that says so: DoRA (its magnitude vector re-normalises W), LoRA on embeddings, and every
other PEFT tuner type (IA3, LoHa, LoKr, ...), whose effective weight this module does not model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..loading.model_parts import canonical_name, head_parameter_names, in_modules, is_peft_model, peft_base_model
from ..loading.new_tensors import NewTensors
from ..utils.errors import ConfigError


@dataclass
class LoraTerm:
    """One active LoRA adapter on one layer: W - W0 = scaling * B A."""

    name: str  # canonical module name
    lora_A: Tensor  # (r, in) or (r, in, kh, kw): the trainable parameter
    lora_B: Tensor  # (out, r) or (out, r, 1, 1)
    scaling: float  # lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA: what PEFT's forward multiplies by
    base_weight: Tensor  # the frozen W0 (its norm scales the drift report)
    transposed: bool = False  # the base layer stores W transposed (transformers Conv1D: PEFT's fan_in_fan_out)

    def factors(self) -> tuple[Tensor, Tensor]:
        """(B, A) as fp32 matrices: B out x r, A r x fan_in."""
        return self.lora_B.float().flatten(1), self.lora_A.float().flatten(1)

    def grams(self) -> tuple[Tensor, Tensor]:
        b, a = self.factors()
        return b.T @ b, a @ a.T

    def squared_distance(self) -> Tensor:
        """||W - W0||_F^2 = s^2 sum((B^T B) * (A A^T)), differentiable in A and B."""
        gram_b, gram_a = self.grams()
        return self.scaling ** 2 * (gram_b * gram_a).sum()

    def row_squared_norms(self) -> Tensor:
        """||(W - W0)_g||^2 for every slice g along dim 0 of the stored weight, as group lasso groups plain tensors:
        s^2 B_g (A A^T) B_g^T for an output row; for a transposed layer, s^2 A_j^T (B^T B) A_j (a column of B A).
        Differentiable."""
        b, a = self.factors()
        if self.transposed:
            return self.scaling ** 2 * ((a.T @ (b.T @ b)) * a.T).sum(1)
        return self.scaling ** 2 * ((b @ (a @ a.T)) * b).sum(1)


@dataclass
class ExpertLoraTerm(LoraTerm):
    """LoRA on a mixture of experts' fused 3-D weight (PEFT's `ParamWrapper`, `target_parameters`): one low-rank
    update per expert, W_e - W0_e = s B_e A_e."""

    module: nn.Module | None = None  # PEFT's ParamWrapper: its num_experts lays out the factors

    def expert_factors(self) -> tuple[Tensor, Tensor]:
        """(B_e, A_e) for every expert in fp32, (experts, out, r) and (experts, r, in), as PEFT's
        `get_delta_factors` lays out lora_B (out, r * experts) and lora_A (r * experts, in). Which side PEFT
        transposes for the stored layout does not change the Frobenius norm."""
        experts = self.module.num_experts
        a = self.lora_A.float().reshape(experts, -1, self.lora_A.shape[-1])
        b = self.lora_B.float().reshape(self.lora_B.shape[0], -1, experts).permute(2, 0, 1)
        return b, a

    def squared_distance(self) -> Tensor:
        """sum_e ||s B_e A_e||_F^2 = s^2 sum_e sum((B_e^T B_e) * (A_e A_e^T)), differentiable; B A never formed."""
        b, a = self.expert_factors()
        return self.scaling ** 2 * ((b.transpose(-2, -1) @ b) * (a @ a.transpose(-2, -1))).sum()

    def row_squared_norms(self) -> Tensor:
        raise ConfigError(f"group_lasso_sp on LoRA of fused expert weights ({self.name}) is not supported: its groups "
                          "would be the per-expert output rows. Use l2_sp on these adapters.")


@dataclass
class AdapterPlan:
    """What a PEFT model trains besides plain tensors: LoRA terms, and `modules_to_save` copies (canonical name ->
    the frozen original parameter that anchors it; head copies are absent: they are new)."""

    lora: list[LoraTerm] = field(default_factory=list)
    originals: dict[str, Tensor] = field(default_factory=dict)
    lora_parameter_names: list[str] = field(default_factory=list)  # every LoRA parameter, active or not
    resized: dict[str, int] = field(default_factory=dict)  # copies of resized tensors: name -> pretrained rows

    def new_names(self) -> list[str]:
        """Names a snapshot of w0 must skip: LoRA factors (their w0 is 0 in W's terms) and anchored copies."""
        return [*self.lora_parameter_names, *self.originals]

    def anchor_pretrained_rows(self, resized: dict[str, int]) -> None:
        """A `modules_to_save` copy of a resized vocabulary: only the checkpoint's rows [0, V) are anchored (to
        the frozen original's rows); the rows added after them are new, as for a plain model."""
        for name, rows in resized.items():
            if name in self.originals:
                self.originals[name] = self.originals[name][:rows]
        self.resized = {name: rows for name, rows in resized.items() if name in self.originals}

    def new_tensors(self, model: nn.Module, head_modules: list[str]) -> NewTensors:
        """S-bar of a PEFT model: the task head, plus what a snapshot of w0 skips (the adapters are measured
        against the frozen base they sit on, which needs no copy)."""
        note = f"LoRA on {len(self.lora)} layers, measured as s B A against the frozen base"
        if self.originals:
            note += f"; {len(self.originals)} modules_to_save tensors anchored to their frozen originals"
        names = sorted(head_parameter_names(model, head_modules) | set(self.new_names()))
        if self.resized:
            note += "; resized (first rows anchored, added rows new): " + ", ".join(
                f"{name} rows [0, {rows})" for name, rows in sorted(self.resized.items()))
        return NewTensors(names, head_modules, note=note, resized=dict(self.resized))


def find_adapters(model: nn.Module, head_modules: list[str], strict: bool = True) -> AdapterPlan | None:
    """The adapter plan of a PEFT model (None for any other model); refuses what it cannot penalise exactly, unless
    not `strict` (no penalty acts): such adapters are then only left out of the distance log."""
    if not is_peft_model(model):
        return None
    base = peft_base_model(model)
    from peft.tuners.lora import LoraLayer
    from peft.tuners.lora.layer import ParamWrapper
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils import ModulesToSaveWrapper

    plan = AdapterPlan()
    for module_name, module in base.named_modules():
        name = canonical_name(module_name)
        if isinstance(module, ModulesToSaveWrapper):
            _add_copies(plan, name, module, head_modules)
        elif isinstance(module, ParamWrapper):  # LoRA on a fused expert parameter (target_parameters)
            plan.lora_parameter_names += [canonical_name(f"{module_name}.{n}") for n, _ in
                                          module.named_parameters() if "lora_" in n]
            plan.lora += _expert_terms(name, module)
        elif isinstance(module, LoraLayer):
            plan.lora_parameter_names += [canonical_name(f"{module_name}.{n}") for n, _ in
                                          module.named_parameters() if "lora_" in n]
            plan.lora += _lora_terms(name, module, strict)
        elif strict and isinstance(module, BaseTunerLayer) and any(
                p.requires_grad for n, p in module.named_parameters() if not n.startswith("base_layer.")):
            kind = type(module).__module__.removeprefix("peft.tuners.").split(".")[0].upper()
            raise ConfigError(f"{kind} adapters ({type(module).__name__} at {name}) are not supported by the SP "
                              "penalties: "
                              "their effective weight is not W0 + s B A. Use LoRA, or regularizer='none'.")
    return plan


def _lora_terms(name: str, module, strict: bool = True) -> list[LoraTerm]:
    terms = []
    for adapter in module.active_adapters:
        unsupported = adapter in getattr(module, "lora_embedding_A", {}) or module.use_dora.get(adapter, False)
        if unsupported and not strict:
            continue
        if adapter in getattr(module, "lora_embedding_A", {}):
            raise ConfigError(f"LoRA on an embedding ({name}) is not supported by the SP penalties yet; leave "
                              "embeddings out of target_modules.")
        if adapter not in module.lora_A:
            continue
        if module.use_dora.get(adapter, False):
            raise ConfigError(f"DoRA ({name}, adapter {adapter!r}) re-normalises the weight with a trained "
                              "magnitude, so its distance to W0 is not s B A; the SP penalties refuse it rather "
                              "than be wrong. Use plain LoRA (use_dora=False).")
        lora_a, lora_b = module.lora_A[adapter].weight, module.lora_B[adapter].weight
        if lora_a.requires_grad or lora_b.requires_grad:
            terms.append(LoraTerm(name, lora_a, lora_b, float(module.scaling[adapter]),
                                  module.get_base_layer().weight, bool(getattr(module, "fan_in_fan_out", False))))
    return terms


def _expert_terms(name: str, module) -> list[LoraTerm]:
    terms = []
    for adapter in module.active_adapters:
        if adapter not in module.lora_A:
            continue
        lora_a, lora_b = module.lora_A[adapter].weight, module.lora_B[adapter].weight
        if lora_a.requires_grad or lora_b.requires_grad:
            terms.append(ExpertLoraTerm(f"{name}.{module.parameter_name}", lora_a, lora_b,
                                        float(module.scaling[adapter]), module.get_param(), module=module))
    return terms


def _add_copies(plan: AdapterPlan, name: str, wrapper, head_modules: list[str]) -> None:
    if in_modules(name, head_modules):
        return  # the task head: new, beta
    originals = dict(wrapper.original_module.named_parameters())
    for adapter in wrapper.active_adapters:
        for param_name, param in wrapper.modules_to_save[adapter].named_parameters():
            if param.requires_grad:
                plan.originals[f"{name}.{param_name}" if name else param_name] = originals[param_name]
