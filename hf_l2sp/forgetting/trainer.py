"""The trainer side of retention sets: what fine-tuning forgets, measured against the starting model at every
evaluation (`plan.py` says what each measure is).

`RetentionMixin` sits in `SPMixin` over `PenaltyMixin`: it builds the plan once the trainer and the anchor exist
(every refusal comes then, before any training), measures the start values when training begins (one evaluation,
logged at step 0), adds `eval_<name>_forgetting` (and the measure's own metrics) to each evaluation of a retention
set, the KL to the starting model on `sp_retention_kl`'s set, and keeps the start values in every checkpoint.
Nothing runs per training step.
"""

from __future__ import annotations

import inspect
import logging
from pathlib import Path

import torch
from transformers import TrainerCallback
from transformers.trainer_utils import EvalLoopOutput

from ..anchor.parameters import is_sharded
from ..loading import assets
from ..loading.model_parts import base_prefix, model_task, peft_base_model, unwrap_model
from ..loading.weights import read_state_dict
from ..utils.errors import ConfigError, UserError
from ..utils.logs import announce
from .measures import find_module, shifted_mask, source_head, starting_weights, swappable, token_kl
from .plan import LANGUAGE_MODEL_TASKS, SOURCE_HEAD_MEASURES, RetentionPlan, parse_names, resolve_measure

logger = logging.getLogger("hf_l2sp")


def _through(head: torch.nn.Module, features: torch.Tensor) -> torch.Tensor:
    """The source head on the features, wherever training put them: the head follows their device (a model that
    FSDP2 or DeepSpeed moved after the head was read) and reads them in its own dtype (bf16 features, fp32 head)."""
    weight = next(head.parameters())
    if weight.device != features.device:
        head.to(features.device)
    return head(features.to(weight.dtype))


class _MeasureStart(TrainerCallback):
    """Before the first step: the start values (one evaluation, logged at step 0), unless a resume restored them."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer._measure_retention_start()


class RetentionMixin:
    """Retention sets for `SPMixin` (see the module's docstring). Takes `retention_datasets=` ({name: dataset}:
    sets measured beside Trainer's eval_dataset rather than in it) besides the trainer's own arguments."""

    def __init__(self, *trainer_args, retention_datasets: dict | None = None, **trainer_kwargs):
        self._retention_apart = dict(retention_datasets or {})
        self.retention: RetentionPlan | None = None
        super().__init__(*trainer_args, **trainer_kwargs)
        self.retention = self._build_retention_plan()
        if self.retention is not None:
            announce(logger, self.retention.describe())
            self.add_callback(_MeasureStart(self))

    # ---- construction: every refusal before training ---------------------------------------------------------

    def _build_retention_plan(self) -> RetentionPlan | None:
        args = self.args
        named = parse_names(args.sp_retention, "sp_retention")
        kl_set = args.sp_retention_kl
        if not named and not self._retention_apart and not kl_set:
            return None
        evals = self.eval_dataset if isinstance(self.eval_dataset, dict) else {}
        sets = {}
        for name in named:
            if name not in evals:
                where = (f"eval_dataset's keys are {', '.join(map(repr, evals))}" if evals else
                         "eval_dataset is not a dict of named sets")
                raise ConfigError(f"sp_retention names {name!r}, but {where}. Pass eval_dataset={{'target': ..., "
                                  f"{name!r}: ...}} or retention_datasets={{{name!r}: ...}}.")
            sets[name] = evals[name]
        for name, ds in self._retention_apart.items():
            if name in evals:
                raise ConfigError(f"retention_datasets and eval_dataset both name {name!r}: a set is given once.")
            sets[name] = ds
        if kl_set is not None and kl_set not in evals:
            raise ConfigError(f"sp_retention_kl names {kl_set!r}, which is not a key of eval_dataset "
                              f"({', '.join(map(repr, evals)) or 'not a dict'}): give the held-out target set there.")
        model = self.model
        for name, ds in sets.items():
            self._check_retention_set(name, ds, model)
        task = model_task(model)
        language_model = task in LANGUAGE_MODEL_TASKS
        head_name = self.sp.head_modules[0] if self.sp.head_modules else None
        source, note = (None, "no source head is read for a model without a task head")
        asked = args.sp_retention_measure
        if self.sp.zero3:
            note = "DeepSpeed ZeRO-3 partitions the head, so no copy of the source head is kept beside it"
        elif head_name and not language_model and asked in ("auto", *SOURCE_HEAD_MEASURES) and sets:
            source, note = self._read_source_head(model, head_name)
        measures = {name: resolve_measure(asked, language_model, head_name is not None, source is not None, note)
                    for name in sets}
        if "source_accuracy" in measures.values():
            for name in sets:
                if "labels" not in self._first_batch(sets[name])[1]:
                    raise ConfigError(f"sp_retention_measure='source_accuracy' needs the source task's labels, and "
                                      f"retention set {name!r} has no 'labels'. Use 'agreement' (no labels needed).")
        if kl_set is not None:
            self._check_kl_possible(model, task, kl_set)
        uses_source = any(m in SOURCE_HEAD_MEASURES for m in measures.values())
        return RetentionPlan(measures=measures, apart=self._retention_apart, kl_set=kl_set,
                             head_name=head_name if any(m != "loss" for m in measures.values()) else None,
                             source_head=source if uses_source else None, source_note=note if uses_source else "")

    def _first_batch(self, dataset) -> tuple[dict, dict]:
        """The set's first example and the batch the trainer's collator makes of it (the example itself when the
        collator needs more than one example or other columns)."""
        example = dataset[0]
        try:
            return example, self.data_collator([example])
        except Exception:
            return example, example

    def _check_retention_set(self, name: str, dataset, model) -> None:
        try:
            size = len(dataset)
        except TypeError:
            size = None
        if size == 0:
            raise ConfigError(f"Retention set {name!r} is empty: give it the examples whose forgetting to measure.")
        needed = getattr(peft_base_model(model), "main_input_name", None)
        if needed and size:
            example, batch = self._first_batch(dataset)
            if needed not in batch and "inputs_embeds" not in batch:
                raise ConfigError(f"Retention set {name!r} has no {needed!r} (it gives {', '.join(sorted(example))}); "
                                  f"{type(unwrap_model(model)).__name__} needs {needed!r}: tokenize or transform it "
                                  "as the target's evaluation set is.")

    def _read_source_head(self, model, head_name: str):
        """The source checkpoint's head (sp_reference, else the checkpoint the model came from), or why not."""
        source = self.args.sp_reference or self.base_model()
        if not source:
            return None, "the model does not say which checkpoint it came from"
        try:
            state = read_state_dict(assets.resolve(source), self.args.sp_reference_revision, what="source head")
        except (UserError, OSError) as err:
            return None, f"its checkpoint {source!r} could not be read ({type(err).__name__})"
        head, note = source_head(model, head_name, state, base_prefix(model))
        del state
        return head, note

    def _check_kl_possible(self, model, task: str | None, kl_set: str) -> None:
        engine = ("FSDP" if getattr(self, "is_fsdp_enabled", False) else
                  "DeepSpeed ZeRO-3" if self.sp.zero3 else None)
        if engine:
            raise ConfigError(f"sp_retention_kl needs the whole anchor beside the model, and {engine} shards it: "
                              "measure the KL in a run without sharding (DDP, ZeRO-1/2), or drop sp_retention_kl.")
        if task != "text-generation":
            raise ConfigError(f"sp_retention_kl is the KL between the starting and the current next-token "
                              f"distributions, for causal language models; {type(unwrap_model(model)).__name__} is "
                              f"a {task or 'model of another kind'}. Use sp_retention for its retention sets.")
        missing = swappable(model, self.sp.reference.tensors)
        if missing:
            raise ConfigError(f"sp_retention_kl rebuilds the starting model from the anchor, which has no start "
                              f"value for {len(missing)} tensor(s) ({', '.join(missing[:3])}: new or resized): the "
                              "KL to the start cannot be computed for this model.")

    # ---- start values -----------------------------------------------------------------------------------------

    def call_model_init(self, trial=None):
        model = super().call_model_init(trial)
        if getattr(self, "retention", None) is not None:
            self.retention.start.clear()  # a new model (a search trial): its own start
        return model

    def _measure_retention_start(self) -> None:
        plan = self.retention
        if plan is None or all(name in plan.start for name in plan.measures):
            return
        if self.state.global_step > 0:
            raise ConfigError("Training resumed without the retention sets' start values: resume through train("
                              "resume_from_checkpoint=...), which reads them from the checkpoint.")
        if not self.args.eval_on_start:  # Trainer evaluates right after this, before the first step, otherwise
            self.evaluate()

    def save_resume_extras(self, folder: Path) -> None:
        super().save_resume_extras(folder)
        if self.retention is not None:
            self.retention.save_start(folder)

    def restore_resume_extras(self, checkpoint: str) -> None:
        super().restore_resume_extras(checkpoint)
        if self.retention is not None and self.retention.measures:
            self.retention.load_start(checkpoint)  # refuses a checkpoint without them

    # ---- evaluation ---------------------------------------------------------------------------------------------

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        plan = self.retention
        apart = plan.apart if plan is not None and eval_dataset is None and metric_key_prefix == "eval" else {}
        metrics = {}
        if eval_dataset is not None or self.eval_dataset is not None or not apart:
            metrics = super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        for name, dataset in apart.items():  # the sets given apart, beside Trainer's own
            metrics.update(super().evaluate(dataset, ignore_keys, f"eval_{name}"))
        return metrics

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix: str = "eval"):
        plan = self.retention
        name = plan.set_for(metric_key_prefix) if plan is not None else None
        if name is None:
            output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys,
                                              metric_key_prefix)
            if plan is not None and plan.kl_set is not None and metric_key_prefix == f"eval_{plan.kl_set}":
                output.metrics[f"{metric_key_prefix}_kl"] = self._kl_to_start(dataloader)
            return output
        if plan.measures[name] == "loss":  # the model's own loss, through Trainer's loop (no logits kept)
            output = super().evaluation_loop(dataloader, description, True, ignore_keys, metric_key_prefix)
            current = {"loss": output.metrics[f"{metric_key_prefix}_loss"]}
        else:
            current = self._classifier_pass(dataloader, plan)
            output = EvalLoopOutput(predictions=None, label_ids=None, metrics={},
                                    num_samples=int(current["features"].shape[0]))
        output.metrics.update({f"{metric_key_prefix}_{k}": v for k, v in plan.record(name, current).items()})
        return output

    def _model_inputs(self, batch: dict) -> tuple[dict, torch.Tensor | None]:
        """The batch's model inputs on the device (labels apart: a source-label set must not reach the loss)."""
        inputs = dict(self._prepare_inputs(batch))
        labels = inputs.pop("labels", None)
        forward = inspect.signature(peft_base_model(self.model).forward).parameters
        named = {n for n, p in forward.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
        inputs = {k: v for k, v in inputs.items() if k in named}
        if "use_cache" in named:
            inputs["use_cache"] = False
        return inputs, labels

    def _classifier_pass(self, dataloader, plan: RetentionPlan) -> dict[str, torch.Tensor]:
        """Features entering the task head (and the source head's predictions through them) for every example,
        gathered over processes in the set's order."""
        model = self.model
        module = find_module(model, plan.head_name)
        captured = []
        handle = module.register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
        features, predictions, labels = [], [], []
        training = model.training
        model.eval()
        try:
            with torch.no_grad():
                for batch in dataloader:
                    inputs, label = self._model_inputs(batch)
                    captured.clear()
                    with self.compute_loss_context_manager():
                        model(**inputs)
                        if plan.source_head is not None:
                            source = _through(plan.source_head, captured[0]).argmax(-1)
                            predictions.append(self.accelerator.gather_for_metrics(source))
                    features.append(self.accelerator.gather_for_metrics(captured[0].flatten(1).float()))
                    if label is not None:
                        labels.append(self.accelerator.gather_for_metrics(label))
        finally:
            handle.remove()
            model.train(training)
        out = {"features": torch.cat(features).cpu()}
        if predictions:
            out["predictions"] = torch.cat(predictions).cpu()
            if labels and "source_accuracy" in plan.measures.values():
                out["accuracy"] = (out["predictions"] == torch.cat(labels).cpu()).double().mean()
        return out

    def _kl_to_start(self, dataloader) -> float:
        """Mean over the set's predicted tokens of KL(p_start || p): the starting model rebuilt from the anchor by
        swapping storages (LoRA: adapters disabled), never copied."""
        model = self.model
        if any(is_sharded(p) for p in model.parameters()):  # sharded after construction (fully_shard by hand)
            raise ConfigError("sp_retention_kl needs the whole anchor beside the model, and the model's parameters "
                              "are sharded (FSDP2): drop sp_retention_kl in sharded runs.")
        training = model.training
        model.eval()
        total, count = 0.0, 0
        try:
            with torch.no_grad():
                for batch in dataloader:
                    inputs, labels = self._model_inputs(batch)
                    with self.compute_loss_context_manager():
                        logits = model(**inputs).logits
                        with starting_weights(model, self.sp.reference.tensors):
                            start = model(**inputs).logits
                    mask = shifted_mask(labels, inputs.get("attention_mask"), logits)
                    sums, counts = self.accelerator.gather_for_metrics(token_kl(start, logits, mask))
                    total += float(sums.double().sum())
                    count += int(counts.sum())
        finally:
            model.train(training)
        return total / max(count, 1)
