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
    find_head_modules,
    parse_head_option,
    resolve_parameters,
    unwrap_model,
    validate_head_modules,
)
from .features import FEATURE_REGULARIZERS
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
        super().__init__(model, args, *trainer_args, **trainer_kwargs)
        check_supported(self.accelerator)  # refuse ZeRO-3 / FSDP1 before anything is built
        self.regularizer_spec = parse_regularizer(args.regularizer)
        self.regularizer = regularizer or build_weight_regularizer(self.regularizer_spec, args)
        self.feature_regularizers = [FEATURE_REGULARIZERS[name].from_config(args)
                                     for name in self.regularizer_spec.features]
        self._given_reference = reference
        self._sp_params: SPParameters | None = None
        self._sp_params_model_id: int | None = None
        self._reset_sp_logs()
        self._sp_bad_step: Tensor | None = None
        self._sp_hook = None  # (optimizer, hook handle) for sp_mode 'grad' / 'decoupled'
        self.sp_metrics: dict[str, float] = {}  # latest evaluation results, for model cards
        self.backbone_report = None  # set by hf-l2sp train (what was pretrained), used in model cards
        self.data_description = None  # set by hf-l2sp train (dataset, splits, sizes), used in model cards
        if self.model is not None:  # with model_init the model (and its anchor) comes in call_model_init
            self._anchor(self.model)
            if hasattr(self.model, "add_model_tags"):
                self.model.add_model_tags(self._tag_names + [f"regularizer:{self.regularizer_spec.label}"])

    # ---- anchor -------------------------------------------------------------------------------------------------

    def _anchor(self, model: nn.Module) -> None:
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
        self._sp_params = None
        sets = self.sp_parameters(model)
        for feature in self.feature_regularizers:  # frozen source copies, layers, channel attention
            feature.setup(self)
        logger.info("hf_l2sp: %s on %s; anchor: %s", self.regularizer, sets.summary(), self.sp_reference.source)

    def call_model_init(self, trial=None):
        model = super().call_model_init(trial)
        self._anchor(model)
        return model

    def sp_parameters(self, model: nn.Module | None = None) -> SPParameters:
        """The (anchored, head) parameter sets for `model` (any wrapper), resolved once per model object.

        Call `refresh_sp_parameters()` after changing which parameters require grad.
        """
        model = model if model is not None else self.model
        if self._sp_params is None or self._sp_params_model_id != id(model):
            self._sp_params = resolve_parameters(model, self.sp_reference.tensors, self.args.sp_include)
            self._sp_params_model_id = id(model)
            self.regularizer.prepare(self._sp_params)
        return self._sp_params

    def refresh_sp_parameters(self) -> None:
        self._sp_params = None

    # ---- loss ---------------------------------------------------------------------------------------------------

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        features = self.feature_regularizers if model.training else []
        with contextlib.ExitStack() as hooks:  # feature hooks live only around the training forward
            for feature in features:
                hooks.enter_context(feature.capture(model))
            loss, outputs = super().compute_loss(model, inputs, return_outputs=True,
                                                 num_items_in_batch=num_items_in_batch)
        if model.training:
            if self.args.sp_mode == "loss":
                with torch.autocast(device_type=self.args.device.type, enabled=False):
                    terms = self.regularizer(self.sp_parameters(model))
                    parts = {feature.name: feature.penalty(inputs) for feature in features}
                penalty = terms.penalty.to(loss.device) + sum(p.to(loss.device) for p in parts.values())
                loss = loss + penalty * self._penalty_scale(num_items_in_batch)
                self._record(PenaltyTerms(penalty, terms.head_penalty, terms.distance), parts)
            elif self._sp_hook is None or self._sp_hook[0] is not getattr(self.optimizer, "optimizer", self.optimizer):
                # 'grad' / 'decoupled': the optimizer step applies Omega and records its value (optimizer_side.py)
                self._attach_optimizer_side(model)
        return (loss, outputs) if return_outputs else loss

    def _attach_optimizer_side(self, model) -> None:
        """sp_mode 'grad'/'decoupled': hook the torch optimizer (inside accelerate's wrapper) once."""
        optimizer = getattr(self.optimizer, "optimizer", self.optimizer)  # AcceleratedOptimizer -> torch optimizer
        penalty = OptimizerSidePenalty(self.args.sp_mode, self.regularizer.quadratic_form(), self.sp_parameters(model),
                                       on_terms=self._record)
        self._sp_hook = (optimizer, penalty.attach(optimizer))

    def _penalty_scale(self, num_items_in_batch) -> float:
        """Factor that makes Omega enter each optimizer step exactly once.

        `training_step` divides the returned loss by the number of accumulation steps only when it does not consider
        it already scaled (models that normalise by `num_items_in_batch`, or a `compute_loss_func`). In that case
        we divide Omega ourselves. Omega is never multiplied by the number of processes: every rank computes the
        same Omega and DDP averages the identical gradients.
        """
        if self.loss_is_scaled_for_ga is not None:
            scaled = self.loss_is_scaled_for_ga
        else:
            scaled = (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or (
                self.compute_loss_func is not None
            )
        return 1.0 / getattr(self, "current_gradient_accumulation_steps", 1) if scaled else 1.0

    # ---- logging and safety -------------------------------------------------------------------------------------

    def _reset_sp_logs(self) -> None:
        self._sp_sums: Tensor | None = None
        self._sp_count = 0

    def _record(self, terms: PenaltyTerms, parts: dict[str, Tensor] | None = None) -> None:
        """Accumulate on device (no host sync); remember the first optimizer step whose Omega is not finite."""
        penalty = terms.penalty.detach()
        values = torch.stack([penalty, terms.head_penalty.to(penalty.device),
                              terms.distance.to(penalty.device).square(),
                              *(p.detach().float().to(penalty.device) for p in (parts or {}).values())])
        if self._sp_sums is None:
            self._sp_sums = torch.zeros_like(values)
        self._sp_sums += values
        self._sp_count += 1
        if self._sp_bad_step is None:
            self._sp_bad_step = torch.full((), -1, dtype=torch.long, device=penalty.device)
        newly_bad = ~torch.isfinite(penalty) & (self._sp_bad_step < 0)
        self._sp_bad_step = torch.where(newly_bad, self.state.global_step + 1, self._sp_bad_step)

    def _check_penalty_finite(self) -> None:
        if self._sp_bad_step is not None and (step := int(self._sp_bad_step)) >= 0:
            raise FloatingPointError(
                f"The {self.regularizer_spec.label} penalty became NaN/inf at optimizer step {step} "
                f"({self.regularizer}). Training stopped before anything else was saved; lower the learning rate or "
                "sp_alpha, or check the inputs of that step."
            )

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self._sp_count and "loss" in logs:  # a training log: flush the window's averages
            self._check_penalty_finite()
            sums = self._sp_sums
            if self._sp_params is not None and self._sp_params.sharded:  # FSDP2: each rank holds partial sums
                sums = sums.clone()
                torch.distributed.all_reduce(sums)
            penalty, head, sq_distance, *parts = (sums / self._sp_count).tolist()
            logs.update({"sp/penalty": round(penalty, 8), "sp/head_penalty": round(head, 8),
                         "sp/distance": round(sq_distance ** 0.5, 8)})  # root of the window's mean squared distance
            if len(parts) == len(self.feature_regularizers):  # 'sp/delta', 'sp/bss': each feature penalty's part
                logs.update({f"sp/{f.name}": round(v, 8) for f, v in zip(self.feature_regularizers, parts)})
            self._reset_sp_logs()
        super().log(logs, start_time)

    def _save_checkpoint(self, model, trial):
        self._check_penalty_finite()
        result = super()._save_checkpoint(model, trial)
        if self.args.should_save:  # after weights, optimizer, scheduler, RNG and state: the anchor, then the marker
            folder = Path(self._get_output_dir(trial=trial)) / f"checkpoint-{self.state.global_step}"
            save_anchor(self.sp_reference, folder)
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
        self._sp_params = None
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
        if not self.args.should_save:
            return
        folder = Path(output_dir if output_dir is not None else self.args.output_dir)
        if is_timm_wrapper(model):
            finalize_timm_folder(folder)
        drift = compute_drift(model, self.sp_reference.tensors, set(self.sp_parameters().anchored_names))
        save_drift(drift, folder, title=f"{folder.name}: {self.regularizer.name}")
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
