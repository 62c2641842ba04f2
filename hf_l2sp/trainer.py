"""SPTrainer: `transformers.Trainer` with the explicit inductive bias added to the training loss."""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor, nn
from transformers import Trainer

from .card import card_facts, non_default_hyperparameters, public_name, render_model_card
from .checkpoint import finalize_timm_folder, is_timm_wrapper, prepare_config_for_save
from .config import SPConfig
from .drift import compute_drift, save_drift
from .fisher_io import load_fisher, save_fisher
from .optimizer_side import OptimizerSidePenalty
from .parameters import (
    SPParameters,
    canonical_name,
    fsdp_unsharded_now,
    find_head_modules,
    parse_head_option,
    resolve_parameters,
    unwrap_model,
    validate_head_modules,
)
from .features import FEATURE_REGULARIZERS
from .penalty_log import PenaltyLog
from .reference import Reference
from .regularizer_spec import RegularizerSpec, parse_regularizer
from .regularizers import L2, NoRegularizer, PenaltyTerms, Regularizer, get_regularizer_class
from .resume import compare_anchors, is_complete, last_complete_checkpoint, load_anchor, mark_complete, save_anchor
from .topology import check_supported

logger = logging.getLogger(__name__)


def build_weight_regularizer(spec: RegularizerSpec, args: SPConfig) -> Regularizer:
    """The weight part of `args.regularizer`; feature penalties alone imply DELTA's head L2 (or nothing, for BSS)."""
    if spec.weight_named:
        return get_regularizer_class(spec.weight).from_config(args)
    return L2(alpha=0.0, beta=args.sp_beta) if spec.weight == "l2" else NoRegularizer()


class SPTrainer(Trainer):
    """A drop-in `Trainer` whose training loss is `task loss + Omega(w)` (Li et al., ICML 2018).

    Use it exactly like `Trainer`, with an `SPConfig` instead of `TrainingArguments`. At construction it snapshots
    the pretrained tensors w0 (fp32, on the training device, outside the model) or loads them from
    `args.sp_reference`. In every training forward it adds the regularizer's Omega, once per optimizer step whatever
    the gradient accumulation and model class; evaluation losses never include it. It logs `sp/penalty` (Omega),
    `sp/head_penalty` (its beta part) and `sp/distance` (||w_S - w0_S||_2), averaged over each logging window.

    Args:
        regularizer: a ready `Regularizer` to use instead of the one named by `args.regularizer`.
        reference: a ready `Reference` (anchors) instead of a snapshot / `args.sp_reference`.
        Every other argument is `Trainer`'s.
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
        self.sp_metrics: dict[str, float] = {}  # latest evaluation results, for model cards
        self.backbone_report = None  # set by hf-l2sp train (what was pretrained), used in model cards
        self.data_description = None  # set by hf-l2sp train (dataset, splits, sizes), used in model cards
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
        head_modules = parse_head_option(self.args.sp_head)
        if head_modules is None:
            head_modules = find_head_modules(model)
        else:
            validate_head_modules(model, head_modules)
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
        for feature in self.feature_regularizers:
            feature.setup(self, model)
        if hasattr(model, "add_model_tags"):
            model.add_model_tags(self._tag_names + [f"regularizer:{self.regularizer_spec.label}"])
        logger.info("hf_l2sp: %s on %s; anchor: %s", self.regularizer, sets.summary(), self.sp_reference.source)

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

    # ---- saving: loadable everywhere, with drift and a model card -------------------------------------------------

    def evaluate(self, *args, **kwargs):
        metrics = super().evaluate(*args, **kwargs)
        self.sp_metrics.update(metrics)
        return metrics

    def _save(self, output_dir: str | None = None, state_dict=None):
        model = unwrap_model(self.model)
        prepare_config_for_save(model)
        super()._save(output_dir, state_dict)
        anchors = self.sp_reference.full_tensors()  # FSDP2: assembled from the shards, on every process (collective)
        if not self.args.should_save:
            return
        folder = Path(output_dir if output_dir is not None else self.args.output_dir)
        if is_timm_wrapper(model):
            finalize_timm_folder(folder)
        values = {canonical_name(k): v for k, v in state_dict.items()} if state_dict is not None else None
        drift = compute_drift(model, anchors, set(self.sp_parameters().anchored_names), values=values)
        save_drift(drift, folder, title=f"{folder.name}: {self.regularizer.name}")  # sets drift["plot"] if drawn
        if getattr(self.regularizer, "fisher", None) is not None:
            save_fisher(self.regularizer.fisher, folder / "fisher.safetensors")
        for feature in self.feature_regularizers:  # e.g. DELTA's channel attention, reusable by a later run
            for name, tensors in feature.state_files().items():
                save_file(tensors, str(folder / name))
        (folder / "sp_config.json").write_text(json.dumps(self._sp_provenance(), indent=2))
        self._render_card(drift).save(folder / "README.md")

    def create_model_card(self, *args, **kwargs) -> None:
        """Trainer.push_to_hub calls this: write our card (formula, alpha, beta, drift, results) as README.md."""
        if not self.is_world_process_zero():
            return
        folder = Path(self.args.output_dir)
        drift_file = folder / "drift.json"
        drift = json.loads(drift_file.read_text()) if drift_file.is_file() else None
        self._render_card(drift).save(folder / "README.md")

    def _sp_provenance(self) -> dict:
        from . import __version__

        return {
            "hf_l2sp_version": __version__,
            "regularizer": self.regularizer.config_dict(),
            "sp_include": self.args.sp_include,
            "anchor": {"source": self._anchor_description(), "fingerprint": self.sp_reference.fingerprint(),
                       "tensors": len(self.sp_reference.tensors),
                       "parameters": self.sp_reference.num_parameters()},
        }

    def _anchor_description(self) -> str:
        if self.args.sp_reference:
            revision = f" @ {self.args.sp_reference_revision}" if self.args.sp_reference_revision else ""
            return f"loaded from {public_name(self.args.sp_reference)}{revision}"
        base = public_name(getattr(unwrap_model(self.model).config, "_name_or_path", None) or None)
        return f"the pretrained weights{f' of {base}' if base else ''}, copied when training started"

    def _render_card(self, drift: dict | None):
        model = unwrap_model(self.model)
        report = self.backbone_report
        name = Path(self.args.output_dir).name
        return render_model_card(card_facts(
            model_name=name, repo_id=self.args.hub_model_id or name, regularizer=self.regularizer,
            sp_summary=self.sp_parameters().summary(), include=self.args.sp_include,
            anchor_source=self._anchor_description(),
            base_model=getattr(model.config, "_name_or_path", None) or None,
            base_revision=report.revision if report is not None else None, is_timm=is_timm_wrapper(model),
            data=self.data_description, metrics=self.sp_metrics, drift=drift,
            hyperparameters=non_default_hyperparameters(self.args),
            fisher_source=self.args.sp_fisher, features=self.feature_regularizers,
            label=self.regularizer_spec.label,
        ))
