"""The penalty trainer: `transformers.Trainer` with the explicit inductive bias added to the training loss.

`PenaltyTrainer` anchors the model (w0), adds Omega once per optimizer step whatever the set-up, logs its parts and
keeps in each checkpoint what resuming needs. What a finished run leaves behind (timm-loadable weights, drift,
model card) is added by `hf_l2sp.artefacts.trainer.SPTrainer`, the class users import.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor, nn
from transformers import Trainer

from ..anchor.fisher_io import load_fisher
from ..anchor.parameters import SPParameters, fsdp_unsharded_now, resolve_parameters
from ..anchor.reference import Reference
from ..anchor.resume import (
    compare_anchors,
    is_complete,
    last_complete_checkpoint,
    load_anchor,
    mark_complete,
    save_anchor,
)
from ..loading.model_parts import (
    find_head_modules,
    parse_head_option,
    unwrap_model,
    validate_head_modules,
)
from ..penalties import FEATURE_REGULARIZERS, FeatureContext, PenaltyTerms, Regularizer, get_regularizer_class
from ..penalties.l2 import L2
from ..penalties.none import NoRegularizer
from ..penalties.spec import RegularizerSpec, parse_regularizer
from ..utils.hub import public_name
from .config import SPConfig
from .optimizer_side import OptimizerSidePenalty
from .penalty_log import PenaltyLog
from .topology import check_supported

logger = logging.getLogger(__name__)


def build_weight_regularizer(spec: RegularizerSpec, args: SPConfig) -> Regularizer:
    """The weight part of `args.regularizer`; feature penalties alone imply DELTA's head L2 (or nothing, for BSS)."""
    if spec.weight_named:
        return get_regularizer_class(spec.weight).from_config(args)
    return L2(alpha=0.0, beta=args.sp_beta) if spec.weight == "l2" else NoRegularizer()


class PenaltyTrainer(Trainer):
    """The training side of `SPTrainer` (use that class): anchoring, Omega in the loss or the optimizer step, the
    `sp/*` logs, and checkpoints that resume without re-anchoring. Takes `regularizer=` (a ready `Regularizer`) and
    `reference=` (a ready `Reference`) besides `Trainer`'s arguments.
    """

    _tag_names = ["hf_l2sp", "transfer-learning"]

    def __init__(self, model=None, args: SPConfig | None = None, *trainer_args,
                 regularizer: Regularizer | None = None, reference: Reference | None = None, **trainer_kwargs):
        if args is None:
            args = SPConfig(output_dir="sp_trainer_output")
        if not isinstance(args, SPConfig):
            raise TypeError(
                f"SPTrainer needs an SPConfig, got {type(args).__name__}. Replace TrainingArguments(...) with "
                "SPConfig(...): it takes the same arguments plus regularizer, sp_alpha, sp_beta, ..."
            )
        # Everything the penalty needs is set before Trainer.__init__, which may call call_model_init (model_init).
        self._sp_ready = False
        self._given_regularizer, self._given_reference = regularizer, reference
        self._build_regularizers(args)
        self._sp_params: SPParameters | None = None
        self._sp_params_key: tuple[int, ...] | None = None
        self._sp_side: tuple | None = None  # (torch optimizer, OptimizerSidePenalty, hook handle): 'grad'/'decoupled'
        super().__init__(model, args, *trainer_args, **trainer_kwargs)
        check_supported(self.accelerator)  # refuse ZeRO-3 / FSDP1 before anything is built
        # transformers CNN classifiers (ResNet, EfficientNet, RegNet, ...) take **kwargs in forward, so Trainer
        # believes they normalise by num_items_in_batch, which they drop: it would then skip the 1/accumulation
        # division and multiply by the number of processes. An image classifier's loss is a per-sample mean: say
        # so, and Trainer divides by the accumulation steps and DDP/FSDP average over processes, for every class.
        self.model_accepts_loss_kwargs = False
        self._sp_ready = True
        if self.model is not None:  # with model_init, Trainer.__init__ built the model through call_model_init
            self._anchor(self.model)

    def _build_regularizers(self, args: SPConfig) -> None:
        self.regularizer_spec = parse_regularizer(args.regularizer)
        self.regularizer = self._given_regularizer or build_weight_regularizer(self.regularizer_spec, args)
        self.feature_regularizers = [FEATURE_REGULARIZERS[name].from_config(args)
                                     for name in self.regularizer_spec.features]
        self.penalty_log = PenaltyLog([f.name for f in self.feature_regularizers])

    # ---- anchor -------------------------------------------------------------------------------------------------

    def _anchor(self, model: nn.Module, setup_penalties: bool = True) -> None:
        """Anchor `model`: its w0 (snapshot, `sp_reference` or the given Reference), then the penalties on it."""
        head_modules = self._head_modules(model)
        if self._given_reference is not None:
            self.sp_reference = self._given_reference
        elif self.args.sp_reference:
            self.sp_reference = Reference.from_checkpoint(self.args.sp_reference, model, head_modules,
                                                          self.args.device, self.args.sp_reference_revision)
        else:
            self.sp_reference = Reference.snapshot(model, head_modules, self.args.device)
        if setup_penalties:
            self._setup_penalties(model)

    def _setup_penalties(self, model: nn.Module) -> None:
        """Parameter sets and feature penalties (frozen source copies, layers, channel attention) for `model`."""
        self.refresh_sp_parameters()
        sets = self.sp_parameters(model)
        if self.feature_regularizers:
            context = FeatureContext(anchors=self.sp_reference.tensors, head_names=self.sp_reference.head_names,
                                     head_modules=self._head_modules(model), device=self.args.device,
                                     train_batches=self.get_train_dataloader)
            for feature in self.feature_regularizers:
                feature.setup(model, context)
        if hasattr(model, "add_model_tags"):
            model.add_model_tags(self._tag_names + [f"regularizer:{self.regularizer_spec.label}"])
        logger.info("hf_l2sp: %s on %s; anchor: %s", self.regularizer, sets.summary(), self.sp_reference.source)

    def _head_modules(self, model: nn.Module) -> list[str]:
        head_modules = parse_head_option(self.args.sp_head)
        if head_modules is None:
            return find_head_modules(model)
        validate_head_modules(model, head_modules)
        return head_modules

    def call_model_init(self, trial=None):
        """Each model from `model_init` (every `hyperparameter_search` trial) is anchored to its own weights."""
        model = super().call_model_init(trial)
        if self._sp_ready:  # during Trainer.__init__ the model is anchored once __init__ has the rest
            # A search trial's sp_* values arrive in _hp_search_setup, which Trainer calls right after this: the
            # penalties are set up there, once, with the trial's values.
            self._anchor(model, setup_penalties=trial is None or self.hp_search_backend is None)
        return model

    def _hp_search_setup(self, trial) -> None:
        """A trial may set sp_* fields (sp_alpha, regularizer, ...): rebuild the penalty from the trial's args."""
        super()._hp_search_setup(trial)
        if trial is not None and self.hp_search_backend is not None:
            self._build_regularizers(self.args)
            self._detach_optimizer_side()
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
        key = tuple(id(p) for p in model.parameters())
        if self._sp_params is not None and self._sp_params_key != key and self._sp_params.sharded \
                and fsdp_unsharded_now(model):
            return self._sp_params  # FSDP2 between a unit's forward and backward: the shards are still these
        if self._sp_params is None or self._sp_params_key != key:
            self.sp_reference.shard_like(model)  # FSDP2: keep only this process's shard of w0
            self._sp_params = resolve_parameters(model, self.sp_reference.tensors, self.args.sp_include)
            self._sp_params_key = key
            self.regularizer.prepare(self._sp_params)
            self._detach_optimizer_side()  # the optimizer-side hook must see the new parameters
        return self._sp_params

    def refresh_sp_parameters(self) -> None:
        self._sp_params = None

    # ---- loss ---------------------------------------------------------------------------------------------------

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        training = model.training
        terms = None
        if training and self.args.sp_mode == "loss":
            # Before the forward: under FSDP2 every parameter is then its shard (the root unit stays unsharded
            # from its forward until its backward), so Omega's gradient lands on the shards it belongs to.
            with torch.autocast(device_type=self.args.device.type, enabled=False):
                terms = self.regularizer(self.sp_parameters(model))
        features = self.feature_regularizers if training else []
        with contextlib.ExitStack() as hooks:  # feature hooks live only around the training forward
            for feature in features:
                hooks.enter_context(feature.capture(model))
            loss, outputs = super().compute_loss(model, inputs, return_outputs=True,
                                                 num_items_in_batch=num_items_in_batch)
        if training:
            step = self.state.global_step + 1
            with torch.autocast(device_type=self.args.device.type, enabled=False):
                parts = {f.name: f.penalty(inputs) * self._feature_scale(f) for f in features}
            self.penalty_log.add_batch_terms(loss, parts, step)
            penalty = sum((p.to(loss.device) for p in parts.values()), torch.zeros((), device=loss.device))
            if terms is not None:
                self.penalty_log.add_weight_terms(terms, step)
                penalty = penalty + self._whole_value(terms.penalty).to(loss.device)
            else:  # 'grad' / 'decoupled': the optimizer side applies the weight penalty (optimizer_side.py)
                self._attach_optimizer_side(model)
            loss = loss + penalty * self._penalty_scale(num_items_in_batch)
        return (loss, outputs) if return_outputs else loss

    def _whole_value(self, penalty: Tensor) -> Tensor:
        """Under FSDP2 each process's Omega covers its shards only: give the returned loss the value of the whole
        Omega (so Trainer's `loss` log counts it once) while the gradient stays that of the local part."""
        if not self._sp_params.sharded:
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
        return float(getattr(self, "current_gradient_accumulation_steps", 1) * processes)

    def _attach_optimizer_side(self, model) -> None:
        """sp_mode 'grad'/'decoupled': hook the torch optimizer (inside accelerate's wrapper) once."""
        optimizer = getattr(self.optimizer, "optimizer", self.optimizer)  # AcceleratedOptimizer -> torch optimizer
        sets = self.sp_parameters(model)  # may detach a stale hook (parameters swapped in place)
        if self._sp_side is not None and self._sp_side[0] is optimizer:
            return
        self._detach_optimizer_side()
        side = OptimizerSidePenalty(self.args.sp_mode, self.regularizer.quadratic_form(), sets,
                                    on_terms=self._record_side_terms, step_key=lambda: self.state.global_step)
        self._sp_side = (optimizer, side, side.attach(optimizer))

    def _detach_optimizer_side(self) -> None:
        if getattr(self, "_sp_side", None) is not None:
            self._sp_side[2].remove()
            self._sp_side = None

    def _record_side_terms(self, terms: PenaltyTerms) -> None:
        self.penalty_log.add_weight_terms(terms, self.state.global_step + 1)

    def _add_penalty_gradient(self) -> None:
        """sp_mode 'grad': add Omega's gradient before Trainer clips or measures the gradients, as 'loss' has it."""
        if self._sp_side is None or self.args.sp_mode != "grad":
            return
        scaler = getattr(self.accelerator, "scaler", None)  # fp16: the gradients still carry the loss scale here
        scale = float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else 1.0
        self._sp_side[1].add_gradient(self._sp_side[0], scale)

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
        return 1.0 / getattr(self, "current_gradient_accumulation_steps", 1) if scaled else 1.0

    # ---- logging and safety -------------------------------------------------------------------------------------

    def _check_penalty_finite(self) -> None:
        if (step := self.penalty_log.first_bad_step()) is not None:
            raise FloatingPointError(
                f"The {self.regularizer_spec.label} penalty became NaN/inf at optimizer step {step} "
                f"({self.regularizer}). Training stopped before anything else was saved; lower the learning rate or "
                "sp_alpha, or check the inputs of that step."
            )

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if not self.penalty_log.empty and "loss" in logs:  # a training log: flush the window's averages
            self._check_penalty_finite()
            sharded = self._sp_params is not None and self._sp_params.sharded
            logs.update(self.penalty_log.flush(weights_sharded=sharded))
        super().log(logs, start_time)

    def _save_checkpoint(self, model, trial):
        self._check_penalty_finite()
        result = super()._save_checkpoint(model, trial)
        anchors = self.sp_reference.full_tensors()  # FSDP2: assembled from the shards, on every process (collective)
        if self.args.should_save:  # after weights, optimizer, scheduler, RNG and state: the anchor, then the marker
            folder = Path(self._get_output_dir(trial=trial)) / f"checkpoint-{self.state.global_step}"
            save_anchor(self.sp_reference, folder, anchors)
            self.save_feature_state(folder)
            mark_complete(folder, self.state.global_step)
        return result

    def train(self, resume_from_checkpoint: str | bool | None = None, *args, **kwargs):
        """`Trainer.train`, resuming only from completely written checkpoints and restoring their anchor."""
        if resume_from_checkpoint is True:
            resume_from_checkpoint = last_complete_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"resume_from_checkpoint=True but {self.args.output_dir!r} holds no completely "
                                 "written checkpoint-N folder.")
        if resume_from_checkpoint:
            self._restore_anchor(str(resume_from_checkpoint))
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _restore_anchor(self, checkpoint: str) -> None:
        if not Path(checkpoint).is_dir():
            raise FileNotFoundError(f"Checkpoint {checkpoint!r} does not exist.")
        if not is_complete(checkpoint):
            last = last_complete_checkpoint(Path(checkpoint).parent)
            raise ValueError(f"Checkpoint {checkpoint!r} was not completely written (interrupted while saving?); "
                             f"it cannot be resumed from. Last complete checkpoint: {last or 'none'}.")
        stored = load_anchor(checkpoint, self.args.device)
        problems = compare_anchors(stored, self.sp_reference)
        if problems:
            raise ValueError(f"Cannot resume from {checkpoint!r}: the model does not match the anchor stored there ("
                             + "; ".join(problems) + "). Resume with the model and regularizer the run started with.")
        if stored.fingerprint() != self.sp_reference.fingerprint():
            if self.args.sp_reference or self._given_reference is not None:
                raise ValueError(f"Cannot resume from {checkpoint!r}: its anchor w0 differs from the one given now "
                                 f"({self._anchor_description()}). Resuming must keep the anchor the run started "
                                 "with; remove sp_reference or point it at the original checkpoint.")
            logger.warning("hf_l2sp: the weights at construction differ from the anchor stored in %s; using the "
                           "stored anchor (resuming never re-anchors).", checkpoint)
        stored.head_names = self.sp_reference.head_names
        self.sp_reference = stored
        self.refresh_sp_parameters()
        self._check_fisher_unchanged(checkpoint)
        for feature in self.feature_regularizers:  # e.g. DELTA's channel attention: the run's, not a recomputed one
            feature.load_state(checkpoint)

    def _check_fisher_unchanged(self, checkpoint: str) -> None:
        fisher = getattr(self.regularizer, "fisher", None)
        stored = Path(checkpoint) / "fisher.safetensors"
        if fisher is None or not stored.is_file():
            return
        saved = load_fisher(str(stored))
        if saved.tensors.keys() != fisher.tensors.keys() or any(
                not torch.equal(saved.tensors[k], fisher.tensors[k].cpu()) for k in saved.tensors):
            raise ValueError(f"Cannot resume from {checkpoint!r}: the Fisher diagonal given now ({self.args.sp_fisher})"
                             " differs from the one the run used (stored in the checkpoint).")

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        self._check_penalty_finite()
        return super().save_model(output_dir, _internal_call)

    def save_feature_state(self, folder: str | Path) -> None:
        """What the feature penalties need to resume or to be reused (e.g. DELTA's channel attention)."""
        for feature in self.feature_regularizers:
            for name, tensors in feature.state_files().items():
                save_file(tensors, str(Path(folder) / name))

    def _anchor_description(self) -> str:
        if self.args.sp_reference:
            revision = f" @ {self.args.sp_reference_revision}" if self.args.sp_reference_revision else ""
            return f"loaded from {public_name(self.args.sp_reference)}{revision}"
        base = public_name(getattr(unwrap_model(self.model).config, "_name_or_path", None) or None)
        return f"the pretrained weights{f' of {base}' if base else ''}, copied when training started"
