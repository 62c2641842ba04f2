"""`SPMixin` (the penalty plus what a finished run leaves behind, over any Trainer subclass) and `SPTrainer`.

Every save (checkpoints included) writes weights that timm and transformers both load. The final save
(`save_model()` called by the user or `hf-l2sp train`) and `push_to_hub` also write, once, the run's artefacts:
`drift.json` / `drift.png`, the Fisher file the run used, the feature penalties' state, `sp_config.json` and the
model card. Checkpoints keep only what resuming needs (see `PenaltyMixin._save_checkpoint`), unless
`sp_checkpoint_artefacts` asks for the artefacts there too.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

from transformers import Trainer

from ..anchor.fisher_io import FISHER_FILENAME, save_fisher
from ..anchor.parameters import full_values
from ..loading.model_parts import is_peft_model, model_task, unwrap_model
from ..loading.models import is_timm_wrapper, set_eval_data_config
from ..loading.transforms import transform_facts
from ..loading.weights import weight_files
from ..forgetting.report import save_retention
from ..forgetting.trainer import RetentionMixin
from ..training.trainer import PenaltyMixin
from ..training.zero3 import gathered_values
from ..utils.errors import ConfigError
from ..utils.files import write_text_atomically
from ..utils.secrets import check_upload, tokens_in_use
from ..utils.version import __version__
from .card import card_facts, non_default_hyperparameters, render_model_card
from .drift import DRIFT_JSON, adapter_drift, compute_drift, save_drift
from .formats import finalize_timm_folder, prepare_config_for_save
from .hub import IGNORE_PATTERNS

SP_CONFIG_FILE = "sp_config.json"
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")
logger = logging.getLogger(__name__)


class SPMixin(RetentionMixin, PenaltyMixin):
    """Adds the explicit inductive bias (Li et al., ICML 2018) to any `transformers.Trainer` subclass: its training
    loss becomes `task loss + Omega(w)`. Put it first: `class SFTSPTrainer(SPMixin, SFTTrainer)`, with a config that
    includes `SPArguments` (`@dataclass class SFTSPConfig(SPArguments, SFTConfig)`). `SPTrainer` is
    `SPMixin` over `Trainer`.

    What it overrides, each calling the trainer's own: `__init__` (anchor), `compute_loss` (Omega),
    `_clip_grad_norm` / `_get_grad_norm` (sp_mode 'grad'), `log` (`sp/*`), `_save_checkpoint` (anchor, marker,
    optional artefacts), `train` (resume restores the anchor), `_load_from_checkpoint` (the fused and renamed
    tensors Trainer's resume leaves out), `_save` / `save_model` / `push_to_hub` (weights timm loads, drift, card),
    `evaluate` (metrics for the card), `call_model_init` / `_hp_search_setup` (model_init and search trials),
    `_remove_unused_columns` (datasets with a transform keep their columns).

    Use it exactly like the trainer it extends. At construction it decides which tensors are new (absent from the
    checkpoint the model came from, or the task head) and snapshots the others, w0 (in each parameter's dtype, on the
    training device, outside the model), or loads them from `args.sp_reference`. In every training forward it adds the
    regularizer's Omega, once per optimizer step whatever the gradient accumulation and model class; evaluation losses
    never include it. It logs `sp/penalty` (Omega), `sp/head_penalty` (its beta part) and `sp/distance`
    (||w_S - w0_S||_2), averaged over each logging window (in `sp_mode` grad/decoupled and under ZeRO-3: their values
    at the logging step). `save_model()` leaves a folder that timm, transformers and
    the pipeline load, with drift files and a model card.

    Args:
        regularizer: a ready `Regularizer` to use instead of the one named by `args.regularizer`.
        reference: a ready `Reference` (anchors) instead of a snapshot / `args.sp_reference`.
        backbone_report: what `load_backbone` reported (the source model's revision goes on the model card).
        data_description: `ImageData.description` (dataset, splits, sizes), for the model card.

    Every other argument is the trainer's own.
    """

    def __init__(self, *trainer_args, backbone_report=None, data_description=None, **trainer_kwargs):
        self.backbone_report = backbone_report
        self.data_description = data_description
        self.sp_metrics: dict[str, float] = {}  # latest evaluation results, for the model card
        self._artefacts_written: tuple[str, int] | None = None  # (folder, global step) of the last write
        self._warned_transform = False
        super().__init__(*trainer_args, **trainer_kwargs)

    def evaluate(self, *args, **kwargs):
        metrics = super().evaluate(*args, **kwargs)
        self.sp_metrics.update(metrics)
        return metrics

    def _save(self, output_dir: str | None = None, state_dict=None):
        model = unwrap_model(self.model)
        self._record_eval_transform(model)
        prepare_config_for_save(model)
        super()._save(output_dir, state_dict)
        if self.args.should_save and is_timm_wrapper(model):
            finalize_timm_folder(output_dir if output_dir is not None else self.args.output_dir)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        result = super().save_model(output_dir, _internal_call)
        if not _internal_call:  # the final save (Trainer's own checkpoint and push saves are internal calls)
            self.write_artefacts(output_dir)
        return result

    def _save_checkpoint(self, model, trial):
        result = super()._save_checkpoint(model, trial)
        if self.args.sp_checkpoint_artefacts:
            self.write_artefacts(self.checkpoint_folder(trial))
        return result

    def push_to_hub(self, *args, **kwargs):
        self.write_artefacts(self.args.output_dir)  # nothing to do when save_model() just wrote them
        if self.is_world_process_zero():
            check_upload(self.args.output_dir, IGNORE_PATTERNS, tokens_in_use(self.args.hub_token,
                                                                               kwargs.get("token")))
        return super().push_to_hub(*args, **kwargs)

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        """Trainer's push at each save (push_to_hub=True): the folders it uploads are scanned for credentials first."""
        if self.is_world_process_zero() and self.args.hub_strategy != "end":
            tokens = tokens_in_use(self.args.hub_token)
            check_upload(self.args.output_dir, IGNORE_PATTERNS, tokens)
            if self.args.hub_strategy in ("checkpoint", "all_checkpoints"):
                check_upload(checkpoint_folder, None, tokens)
        return super()._push_from_checkpoint(checkpoint_folder)

    def write_artefacts(self, output_dir: str | None = None) -> None:
        """Drift, Fisher file, feature-penalty state, `sp_config.json` and the model card, into `output_dir`.

        Every process calls it: under FSDP2 the anchor and the weights are assembled from the shards (a collective);
        the main process writes. Written once per folder and optimizer step.
        """
        folder = Path(output_dir if output_dir is not None else self.args.output_dir)
        key = (str(folder.resolve()), self.state.global_step)
        if self._artefacts_written == key:
            return
        anchors = self.sp_reference.full_tensors()
        values = (gathered_values(self.model) if self.sp.zero3
                  else full_values(self.model) if self.sp_parameters().sharded else None)
        if self.args.should_save:
            folder.mkdir(parents=True, exist_ok=True)
            drift = compute_drift(self.model, anchors, set(self.sp_parameters().anchored_names), values=values)
            if self.sp_parameters().lora:  # PEFT: each adapted layer's distance s ||B A|| to its frozen base
                drift["adapters"] = adapter_drift(self.sp_parameters().lora)
            save_drift(drift, folder, title=f"{folder.name}: {self.regularizer.name}")  # sets drift["plot"] if drawn
            if getattr(self.regularizer, "fisher", None) is not None:
                save_fisher(self.regularizer.fisher, folder / FISHER_FILENAME)
            self.save_feature_state(folder)
            write_text_atomically(folder / SP_CONFIG_FILE, json.dumps(self._sp_provenance(), indent=2))
            self._render_card(drift, self._write_retention(folder), folder).save(folder / "README.md")
        self._artefacts_written = key

    def save_merged_model(self, output_dir: str) -> None:
        """PEFT: the adapters merged into the base weights (`merge_and_unload` on a copy; the trained model keeps
        its adapters), saved as a plain transformers checkpoint with the run's card, drift and `sp_config.json`.
        The copy costs one more model in memory while it is written."""
        model = unwrap_model(self.model)
        if not is_peft_model(model):
            raise ConfigError(f"save_merged_model is for PEFT models; {type(model).__name__} has no adapters to "
                              "merge. Use save_model().")
        if self.args.should_save:
            merged = copy.deepcopy(model).merge_and_unload()
            merged.save_pretrained(output_dir)
            del merged
        self.write_artefacts(output_dir)

    def create_model_card(self, *args, **kwargs) -> None:
        """Trainer.push_to_hub calls this: write our card (formula, alpha, beta, drift, results) as README.md."""
        if not self.is_world_process_zero():
            return
        folder = Path(self.args.output_dir)
        drift_file = folder / DRIFT_JSON
        drift = json.loads(drift_file.read_text()) if drift_file.is_file() else None
        self._render_card(drift, self._write_retention(folder), folder).save(folder / "README.md")

    def _write_retention(self, folder: Path) -> dict | None:
        """retention.json and forgetting.png from the logs, when the run measures retention sets."""
        plan = self.retention
        if plan is None:
            return None
        folder.mkdir(parents=True, exist_ok=True)
        return save_retention(self.state.log_history, plan.measures, folder, plan.kl_set,
                              self.args.metric_for_best_model, title=f"{folder.name}: {self.regularizer_spec.label}")

    def _sp_provenance(self) -> dict:
        return {
            "hf_l2sp_version": __version__,
            "regularizer": self.regularizer.config_dict(),
            "sp_include": self.args.sp_include,
            "anchor": {"source": self._anchor_description(), "fingerprint": self.sp_reference.fingerprint(),
                       "tensors": len(self.sp_reference.tensors),
                       "parameters": self.sp_reference.num_parameters(),
                       # of those, the ones the penalty acts on (the card's "anchored tensors"); the rest are free
                       "anchored_tensors": self.sp_parameters().summary()["anchored_tensors"]},
        }

    def _render_card(self, drift: dict | None, retention: dict | None = None, folder: Path | None = None):
        model = unwrap_model(self.model)
        report = self.backbone_report
        own = folder is None or Path(folder).resolve() == Path(self.args.output_dir).resolve()
        name = Path(self.args.output_dir if folder is None else folder).name
        repo_id = (self.args.hub_model_id if own else None) or name  # another folder (merged weights): its own name
        return render_model_card(card_facts(
            model_name=name, repo_id=repo_id, regularizer=self.regularizer,
            sp_summary=self.sp_parameters().summary(), include=self.args.sp_include,
            anchor_source=self._anchor_description(),
            base_model=self.base_model(),
            base_revision=report.revision if report is not None else None, is_timm=is_timm_wrapper(model),
            data=self.data_description or self._described_data() or self._dataset_sizes(),
            metrics=self.sp_metrics, drift=drift,
            hyperparameters=non_default_hyperparameters(self.args),
            fisher_source=self.args.sp_fisher, features=self.feature_regularizers,
            label=self.regularizer_spec.label, task=model_task(model),
            new_tensors=self.sp_reference.new_description, stored_tensors=len(self.sp_reference.tensors),
            retention=retention, weights_missing=None if folder is None else _weights_missing(folder),
        ))

    def _datasets(self) -> list:
        out = []
        for data in (self.eval_dataset, self.train_dataset):
            out += list(data.values()) if isinstance(data, dict) else [data] if data is not None else []
        return out

    def _record_eval_transform(self, model) -> None:
        """Put the evaluation transform the datasets were built with (`build_transforms` + `with_transforms`) into
        the model's config, so that processors, pipelines and `hf-l2sp evaluate` preprocess as training evaluated.
        A transform that does not say its config cannot be recorded: then the checkpoint keeps the source model's
        preprocessing, and a warning says so."""
        if model_task(model) != "image-classification":
            return
        facts = [transform_facts(data) for data in self._datasets()]
        config = next((eval_config for eval_config, _ in facts if eval_config), None)
        if config is not None:
            set_eval_data_config(model, config)
        elif any(getattr(data, "format", {}).get("type") == "custom" for data in self._datasets()) \
                and not self._warned_transform:
            self._warned_transform = True
            logger.warning("hf_l2sp: the datasets' transform does not say its preprocessing (build it with "
                           "build_transforms + with_transforms to record it); the checkpoint keeps the source "
                           "model's, which processors and pipelines will use.")

    def _described_data(self) -> dict | None:
        """The description `with_transforms` attached (dataset, config, splits, sizes), when the datasets carry one."""
        return next((description for data in self._datasets() if (description := transform_facts(data)[1])), None)

    def _dataset_sizes(self) -> dict:
        """Without a data description (a script's own datasets): the number of examples in each split given."""
        sizes = {}
        for split, data in (("train", self.train_dataset), ("validation", self.eval_dataset)):
            if isinstance(data, dict):
                sizes.update({f"{split} {k}": len(v) for k, v in data.items() if hasattr(v, "__len__")})
            elif data is not None and hasattr(data, "__len__"):
                sizes[split] = len(data)
        return {"num_examples": sizes} if sizes else {}


def _weights_missing(folder: Path) -> str | None:
    """None when `folder` holds weights (a model's, or a PEFT model's adapters); 'deepspeed' when it holds DeepSpeed
    ZeRO-3 partitions instead (saved without zero3_save_16bit_model); 'none' otherwise."""
    if weight_files(folder) or any((folder / name).is_file() for name in ADAPTER_FILES):
        return None
    return "deepspeed" if any(folder.glob("global_step*")) else "none"


class SPTrainer(SPMixin, Trainer):
    """A drop-in `transformers.Trainer` whose training loss is `task loss + Omega(w)` (Li et al., ICML 2018): use it
    exactly like `Trainer`, with an `SPConfig` instead of `TrainingArguments`. See `SPMixin`."""


__all__ = ["SPMixin", "SPTrainer"]
