"""The penalty side of SPTrainer: the explicit inductive bias added to a `transformers.Trainer`'s training loss.

`PenaltyMixin` anchors the model (w0), adds Omega once per optimizer step whatever the set-up, logs its parts and
keeps in each checkpoint what resuming needs; its state is one `PenaltyState` (`training/state.py`). What a finished
run leaves behind (weights timm loads, drift, model card) is added by `hf_l2sp.artefacts.trainer.SPMixin`, the
mixin users combine with any Trainer subclass (`SPTrainer` is `SPMixin` over `Trainer`).
"""

from __future__ import annotations

import contextlib
import inspect
import logging

import torch
from torch import Tensor, nn

from ..anchor.adapters import find_adapters
from ..anchor.parameters import (
    SPParameters,
    check_adapters_supported,
    check_groups_defined,
    check_something_is_anchored,
    fsdp_unsharded_now,
    resolve_parameters,
)
from ..anchor.reference import Reference
from ..loading.forward import loss_uses_num_items_in_batch
from ..loading.model_parts import find_head_modules, parse_head_option, peft_base_model
from ..loading.model_parts import unwrap_model, validate_head_modules
from ..loading.new_tensors import find_new_tensors, resized_tensors
from ..penalties import FeatureContext, PenaltyTerms, Regularizer
from ..penalties.weight import QuadraticForm
from ..utils.errors import ConfigError, DivergedError
from .checkpoints import CheckpointMixin
from .compat import check_mixin_order, check_trainer_hooks, loss_comes_from_model
from .config import SPArguments, SPConfig
from .coverage import log_coverage
from .optimizer_side import OptimizerSidePenalty
from .penalty_log import step_is_logged
from .state import OptimizerHook, PenaltyState
from .topology import check_supported
from .zero3 import PartitionedPenalty, check_zero3_supported, is_partitioned, partition_anchor, penalty_route
from .zero3 import whole_parameters, zero_stage

logger = logging.getLogger(__name__)


class PenaltyMixin(CheckpointMixin):
    """The training side of `SPMixin` / `SPTrainer` (use those): anchoring, Omega in the loss or the optimizer step,
    the `sp/*` logs, and checkpoints that resume without re-anchoring. Mixed in before a `transformers.Trainer`
    (or any subclass, e.g. TRL's): every override calls `super()`. Takes `regularizer=` (a ready `Regularizer`) and
    `reference=` (a ready `Reference`) besides the trainer's own arguments.
    """

    _sp_tags = ["hf_l2sp", "transfer-learning"]

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        check_mixin_order(cls, PenaltyMixin)  # `class X(Trainer, SPMixin)` would build a plain Trainer: refused

    def __init__(self, *trainer_args, regularizer: Regularizer | None = None, reference: Reference | None = None,
                 **trainer_kwargs):
        check_trainer_hooks(type(self))  # before anything else: a renamed hook must stop here, loudly
        # The trainer's own signature decides what each argument is: TRL's DPOTrainer takes ref_model second.
        bound = inspect.signature(super().__init__).bind_partial(*trainer_args, **trainer_kwargs)
        args = bound.arguments.get("args")
        if args is None:
            args = bound.arguments["args"] = SPConfig(output_dir="sp_trainer_output")
        if not isinstance(args, SPArguments):
            raise TypeError(
                f"{type(self).__name__} needs its arguments to include SPArguments, got {type(args).__name__}. "
                "Replace TrainingArguments(...) with SPConfig(...) (same arguments plus regularizer, sp_alpha, "
                "sp_beta, ...), or for another trainer's config declare "
                "`@dataclass class MyConfig(SPArguments, ThatConfig)`."
            )
        # Everything the penalty needs is set before Trainer.__init__, which may call call_model_init (model_init).
        self._given_regularizer, self._given_reference = regularizer, reference
        self.sp = self._new_state(args)
        super().__init__(*bound.args, **bound.kwargs)
        check_supported(self.accelerator)  # refuse FSDP1 before anything is built
        self.sp.where = penalty_route(zero_stage(self.accelerator), self.args.sp_mode)
        self.sp.ready = True
        if self.model is not None:  # with model_init, Trainer.__init__ built the model through call_model_init
            with whole_parameters(self.model):  # ZeRO-3 may have partitioned it already: anchored whole, once
                self._fix_loss_normalisation(self.model)
                self._anchor(self.model)
            if is_partitioned(self.model):
                partition_anchor(self.sp_parameters(), self.sp.reference)

    def _new_state(self, args: SPArguments) -> PenaltyState:
        return PenaltyState.from_config(args, self._given_regularizer)

    def _build_regularizers(self, args: SPArguments) -> None:
        self.sp = self.sp.rebuilt(args, self._given_regularizer)
        self.sp.where = penalty_route(zero_stage(self.accelerator), args.sp_mode)  # a trial may set sp_mode

    # The names users and the artefact side read; all of it lives in `self.sp`.
    regularizer = property(lambda self: self.sp.regularizer)
    regularizer_spec = property(lambda self: self.sp.spec)
    feature_regularizers = property(lambda self: self.sp.features)
    penalty_log = property(lambda self: self.sp.log)
    sp_reference = property(lambda self: self.sp.reference)

    # ---- loss normalisation -------------------------------------------------------------------------------------

    def _fix_loss_normalisation(self, model: nn.Module) -> None:
        """Keep Trainer's normalisation wherever the loss really uses `num_items_in_batch` (causal LMs, TRL's own
        token losses); override it only for models that take `**kwargs` but compute a per-micro-batch mean.

        transformers' CNN and BERT-style classifiers take `**kwargs`, so Trainer believes they divide by
        `num_items_in_batch`, which they drop: it would then skip the 1/accumulation division and multiply by the
        number of processes. For them we say the model does not accept loss kwargs: Trainer divides by the
        accumulation steps and DDP/FSDP average over processes. A trainer subclass that computes its own loss (TRL)
        decides for itself.
        """
        if not self.model_accepts_loss_kwargs or not loss_comes_from_model(type(self), PenaltyMixin):
            return
        if loss_uses_num_items_in_batch(peft_base_model(self.accelerator.unwrap_model(model))) is False:
            self.model_accepts_loss_kwargs = False
            self.sp.corrects_loss_normalisation = True

    def _remove_unused_columns(self, dataset, description=None):
        """Trainer's column removal, except for a dataset with a transform (`with_transform` / `set_transform`):
        the transform reads the raw columns (an image column) that the model's signature does not name."""
        if (dataset.format or {}).get("type") == "custom":
            return dataset
        return super()._remove_unused_columns(dataset, description)

    # ---- anchor -------------------------------------------------------------------------------------------------

    def _anchor(self, model: nn.Module, setup_penalties: bool = True) -> None:
        """Anchor `model`: its w0 (snapshot, `sp_reference` or the given Reference), then the penalties on it."""
        head_modules = self.sp.head_modules = self._head_modules(model)
        adapters = self.sp.adapters = find_adapters(model, head_modules, strict=self.sp.active)
        if adapters is not None:
            adapters.anchor_pretrained_rows(resized_tensors(model, adapters.originals))
        new = self.sp.new_tensors = (find_new_tensors(model, head_modules) if adapters is None
                                     else adapters.new_tensors(model, head_modules))
        if self._given_reference is not None:
            self.sp.reference = self._given_reference
        elif self.args.sp_reference:
            self.sp.reference = Reference.from_checkpoint(self.args.sp_reference, model, head_modules,
                                                          self.args.device, self.args.sp_reference_revision,
                                                          new_names=new.names)
        else:
            self.sp.reference = Reference.snapshot(model, head_modules, self.args.device, new_names=new.names,
                                                   trainable_only=adapters is not None, resized=new.resized)
        if self.sp.reference.new_description is None:
            self.sp.reference.new_description = new.describe()
        if setup_penalties:
            self._setup_penalties(model)

    def _setup_penalties(self, model: nn.Module) -> None:
        """Parameter sets and feature penalties (frozen source copies, layers, channel attention) for `model`."""
        self.refresh_sp_parameters()
        sets = self.sp_parameters(model)
        check_adapters_supported(sets, self.sp.regularizer, self.sp.features, self.args.sp_mode)
        check_something_is_anchored(model, sets, self.sp.regularizer, self.sp.spec, self.args.sp_include)
        check_groups_defined(sets, self.sp.regularizer, self.sp.new_tensors.converted if self.sp.new_tensors else [])
        if self.sp.zero3:
            check_zero3_supported(self.args, self.sp.regularizer, self.sp.features, self.sp.adapters,
                                  self.accelerator.state.mixed_precision)
        if self.sp.features:
            context = FeatureContext(anchors=self.sp.reference.tensors, head_names=self.sp.reference.head_names,
                                     head_modules=self.sp.head_modules, device=self.args.device,
                                     train_batches=self.get_train_dataloader)
            for feature in self.sp.features:
                feature.setup(model, context)
        if hasattr(model, "add_model_tags"):
            model.add_model_tags(self._sp_tags + [f"regularizer:{self.sp.spec.label}"])
        log_coverage(model, sets, self.sp, self.args.sp_include)

    def _head_modules(self, model: nn.Module) -> list[str]:
        """`sp_head`, else the detected task head. A model with no head hf_l2sp can find (a plain module, a custom
        model) is trained with none: every trainable tensor anchored to its starting value, nothing new (a WARNING
        names sp_head when a penalty acts)."""
        head_modules = parse_head_option(self.args.sp_head)
        if head_modules is None:
            try:
                return find_head_modules(model)
            except ConfigError:
                if self.sp.active:
                    logger.warning("hf_l2sp: found no classification head in %s, so every trainable tensor is "
                                   "anchored to its starting value and none is new. Set sp_head to the new head's "
                                   "module name(s) (e.g. sp_head='fc') if it has one, or sp_head='none' to say it "
                                   "has none.", type(unwrap_model(model)).__name__)
                return []
        validate_head_modules(model, head_modules)
        return head_modules

    def call_model_init(self, trial=None):
        """Each model from `model_init` (every `hyperparameter_search` trial) is anchored to its own weights."""
        model = super().call_model_init(trial)
        if self.sp.ready:  # during Trainer.__init__ the model is anchored once __init__ has the rest
            self._fix_loss_normalisation(model)
            # A search trial's sp_* values arrive in _hp_search_setup, which Trainer calls right after this: the
            # penalties are set up there, once, with the trial's values.
            self._anchor(model, setup_penalties=trial is None or self.hp_search_backend is None)
        return model

    def _hp_search_setup(self, trial) -> None:
        """A trial may set sp_* fields (sp_alpha, regularizer, ...): rebuild the penalty from the trial's args."""
        super()._hp_search_setup(trial)
        if trial is not None and self.hp_search_backend is not None:
            self._build_regularizers(self.args)
            if self.model is not None:
                self._setup_penalties(self.model)

    def sp_parameters(self, model: nn.Module | None = None) -> SPParameters:
        """The (anchored, head) parameter sets for `model` (any wrapper), resolved on its current parameters.

        The sets are keyed on the parameter objects themselves, so they follow in-place changes of the model:
        FSDP2's `fully_shard` (run by accelerate's `prepare`) swaps every parameter for a DTensor shard on the same
        module object; the sets are then resolved on the shards and the anchor is cut to each process's shard,
        freeing the full copy. Call `refresh_sp_parameters()` after changing which parameters require grad.
        """
        model = model if model is not None else self.model
        state = self.sp
        if state.parameters_are_for(model):
            return state.parameters
        if state.weights_sharded and fsdp_unsharded_now(model):
            return state.parameters  # FSDP2 between a unit's forward and backward: the shards are still these
        state.reference.shard_like(model)  # FSDP2: keep only this process's shard of w0
        state.parameters = resolve_parameters(model, state.reference.tensors, self.args.sp_include, state.adapters)
        # DeepSpeed moves gradients out of .grad during the backward pass: the kernels return theirs to autograd.
        state.parameters.direct_gradients = not getattr(self, "is_deepspeed_enabled", False)
        state.parameters_key = tuple(id(p) for p in model.parameters())
        state.regularizer.prepare(state.parameters)
        state.detach_optimizer_hook()  # the optimizer-side hook must see the new parameters
        return state.parameters

    def refresh_sp_parameters(self) -> None:
        self.sp.parameters = None

    # ---- loss ---------------------------------------------------------------------------------------------------

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        training = model.training
        terms = None
        if training and self.sp.where == "loss" and self.sp.regularizer.active:
            # Only what acts is computed per step ('none' and zero coefficients: the distance, at logging steps).
            # Before the forward: under FSDP2 every parameter is then its shard (the root unit stays unsharded
            # from its forward until its backward), so Omega's gradient lands on the shards it belongs to.
            with torch.autocast(device_type=self.args.device.type, enabled=False):
                terms = self.sp.regularizer(self.sp_parameters(model))
        features = self.sp.features if training else []
        with contextlib.ExitStack() as hooks:  # feature hooks live only around the training forward
            for feature in features:
                hooks.enter_context(feature.capture(model))
            # return_outputs passed through: a subclass may pay an extra forward for outputs (TRL's SFTTrainer).
            result = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                          num_items_in_batch=num_items_in_batch)
        loss, outputs = result if return_outputs else (result, None)
        if training:
            step = self.state.global_step + 1
            with torch.autocast(device_type=self.args.device.type, enabled=False):
                parts = {f.name: f.penalty(inputs) * self._feature_scale(f) for f in features}
            scale = self._penalty_scale(num_items_in_batch)
            # A token loss already divided by the window's token count is a part of the step's loss: log it as the
            # window's (the log averages micro-batches, as it does the per-micro-batch means of other models).
            self.sp.log.add_batch_terms(loss / scale, parts, step)
            penalty = sum((p.to(loss.device) for p in parts.values()), torch.zeros((), device=loss.device))
            if terms is not None:
                self.sp.log.add_weight_terms(terms, step)
                penalty = penalty + self._whole_value(terms.penalty).to(loss.device)
            elif self.sp.where == "partitions":  # ZeRO-3, every mode: at the optimizer step (training/zero3.py)
                self._attach_partitioned_penalty()
            elif self.sp.where == "optimizer":  # 'grad' / 'decoupled': the optimizer side applies it
                self._attach_optimizer_side(model)
            loss = loss + penalty * scale
        return (loss, outputs) if return_outputs else loss

    def _whole_value(self, penalty: Tensor) -> Tensor:
        """Under FSDP2 each process's Omega covers its shards only: give the returned loss the value of the whole
        Omega (so Trainer's `loss` log counts it once) while the gradient stays that of the local part."""
        if not self.sp.parameters.sharded:
            return penalty
        total = penalty.detach().clone()
        torch.distributed.all_reduce(total)
        return penalty + (total - penalty.detach())

    def _feature_scale(self, feature) -> float:
        """DELTA-like penalties sum over the step's global batch: scale the micro-batch's sum by accumulation
        steps x processes, which Trainer's 1/accumulation division and the processes' gradient mean undo."""
        if not feature.batch_sum:
            return 1.0
        processes = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        return float(self.current_gradient_accumulation_steps * processes)

    def _attach_optimizer_side(self, model) -> None:
        """sp_mode 'grad'/'decoupled': hook the torch optimizer (inside accelerate's wrapper) once."""
        optimizer = getattr(self.optimizer, "optimizer", self.optimizer)  # AcceleratedOptimizer -> torch optimizer
        sets = self.sp_parameters(model)  # may detach a stale hook (parameters swapped in place)
        hook = self.sp.optimizer_hook
        if hook is not None and hook.optimizer is optimizer:
            return
        self.sp.detach_optimizer_hook()
        side = OptimizerSidePenalty(self.args.sp_mode, self.sp.regularizer.quadratic_form(), sets,
                                    on_terms=self._record_side_terms, step_key=lambda: self.state.global_step,
                                    measure=lambda: step_is_logged(self.state, self.args))
        self.sp.optimizer_hook = OptimizerHook(optimizer, side, side.attach(optimizer))

    def _attach_partitioned_penalty(self) -> None:
        """DeepSpeed ZeRO-3: w0 cut to this rank's partitions and Omega applied there, once (training/zero3.py)."""
        if self.sp.partitioned is None:
            active = self.sp.regularizer.active
            form = self.sp.regularizer.quadratic_form() if active else QuadraticForm(0.0, True, None, 0.0)
            self.sp.partitioned = PartitionedPenalty(self.model_wrapped, self.sp_parameters(), form,
                                                     self.sp.reference, self.args.sp_mode, self._record_side_terms,
                                                     active, measure=lambda: step_is_logged(self.state, self.args))

    def _record_side_terms(self, terms: PenaltyTerms | None) -> None:
        self.sp.log.add_side_step(terms, self.state.global_step + 1)

    def _add_penalty_gradient(self) -> None:
        """sp_mode 'grad': add Omega's gradient before Trainer clips or measures the gradients, as 'loss' has it."""
        hook = self.sp.optimizer_hook
        if hook is None or self.args.sp_mode != "grad":
            return
        scaler = self.accelerator.scaler  # None unless fp16, where the gradients still carry the loss scale here
        scale = float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else 1.0
        hook.side.add_gradient(hook.optimizer, scale)

    def _clip_grad_norm(self, model):
        self._add_penalty_gradient()
        return super()._clip_grad_norm(model)

    def _get_grad_norm(self, model, grad_norm=None):
        self._add_penalty_gradient()
        return super()._get_grad_norm(model, grad_norm=grad_norm)

    def _penalty_scale(self, num_items_in_batch) -> float:
        """Factor that makes Omega enter each optimizer step exactly once.

        `training_step` divides the returned loss by the number of accumulation steps unless it considers it already
        scaled (`loss_is_scaled_for_ga`, or a `compute_loss_func`); then we divide Omega ourselves. Omega is never
        multiplied by the number of processes: every process adds the same Omega (or, under FSDP2, its shards'
        part, whose gradient lands on those shards only) and DDP averages identical gradients.
        """
        if self.loss_is_scaled_for_ga is not None:
            scaled = self.loss_is_scaled_for_ga
        else:
            scaled = (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or (
                self.compute_loss_func is not None
            )
        return 1.0 / self.current_gradient_accumulation_steps if scaled else 1.0

    # ---- logging and safety -------------------------------------------------------------------------------------

    def _check_penalty_finite(self) -> None:
        if (step := self.sp.log.first_bad_step()) is not None:
            raise DivergedError(
                f"The {self.sp.spec.label} penalty became NaN/inf at optimizer step {step} "
                f"({self.sp.regularizer}). Training stopped before anything else was saved; lower the learning rate "
                "or sp_alpha, or check the inputs of that step."
            )

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        # 'grad'/'decoupled' (and every mode under ZeRO-3): Omega is applied outside the returned loss, and its value
        # is computed at the step that logs (not averaged over the window): it stands for every step of the window
        side = self.sp.where != "loss"
        active = self.sp.regularizer.active
        if not self.sp.log.empty and "loss" in logs:  # a training log: flush the window's averages
            if not active and (self.sp.partitioned or not side):  # the distance, measured now
                terms = (self.sp.partitioned.measure() if self.sp.partitioned
                         else self.sp.regularizer(self.sp_parameters()))
                self.sp.log.add_weight_terms(terms, self.state.global_step)
            elif side and active and self.sp.log.side_steps and not self.sp.log.weight_evaluations:
                self.sp.measure_outside_loss(self.state.global_step)
            self._check_penalty_finite()
            steps = self.sp.log.side_steps  # optimizer steps in the window
            parts = self.sp.log.flush(weights_sharded=self.sp.weights_sharded)
            if side:  # so that 'loss' = sp/task_loss + sp/penalty here too
                logs["loss"] += parts["sp/penalty"]
                self.sp.side_penalty_total += parts["sp/penalty"] * steps
                self.sp.side_penalty_steps += steps
            logs.update(parts)
        if side and "train_loss" in logs:  # Trainer's mean loss over this train() call's steps: add Omega's mean
            steps = self.sp.log.side_steps  # steps after the last log, still in the window
            if steps:
                if active and not self.sp.log.weight_evaluations:
                    self.sp.measure_outside_loss(self.state.global_step)
                flushed = self.sp.log.flush(weights_sharded=self.sp.weights_sharded)
                self.sp.side_penalty_total += flushed["sp/penalty"] * steps
                self.sp.side_penalty_steps += steps
            logs["train_loss"] += self.sp.side_penalty_total / max(self.sp.side_penalty_steps, 1)
        super().log(logs, start_time)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        self._check_penalty_finite()
        return super().save_model(output_dir, _internal_call)

    def base_model(self) -> str | None:
        """The model the run started from: the anchor's (kept across resumes), else the model's own name."""
        if self.sp.reference is not None and self.sp.reference.base_model:
            return self.sp.reference.base_model
        return getattr(getattr(unwrap_model(self.model), "config", None), "_name_or_path", None) or None
