"""Checkpoints of an SP run: what each one stores beside Trainer's files, and how a run resumes from one.

A checkpoint gets the anchor w0, the feature penalties' state and, written last, a completion marker; resuming restores
the stored anchor (never re-anchoring on the fine-tuned weights) and the weights Trainer's own loading leaves out (the
tensors transformers renames or fuses on load). Mixed into `PenaltyMixin`, whose state (`self.sp`) it reads.
"""

from __future__ import annotations

import logging
from pathlib import Path

from safetensors.torch import save_file
from torch import nn
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..anchor.reference import Reference
from ..anchor.resume import COMPLETE_MARKER, anchor_to_resume, check_fisher_unchanged, last_complete_checkpoint
from ..anchor.resume import mark_complete, restore_converted_weights, save_anchor
from ..loading.checkpoint_layout import parameter_layouts
from ..loading.model_parts import base_prefix
from ..utils.errors import ConfigError, UserError
from ..utils.hub import public_name
from .resume_checks import check_deepspeed_world_size, warn_dropped_state
from .zero3 import is_partitioned, partition_anchor, whole_parameters

logger = logging.getLogger(__name__)


class CheckpointMixin:
    """The checkpoint side of `PenaltyMixin` (use `SPTrainer` / `SPMixin`)."""

    def _save_checkpoint(self, model, trial):
        """The anchor first, then Trainer's files (weights, optimizer, scheduler, RNG, state), then the marker: a
        folder with the anchor and no marker was interrupted; one with Trainer's files only is a plain Trainer's."""
        self._check_penalty_finite()
        anchors = self.sp.reference.full_tensors()  # FSDP2: assembled from the shards, on every process (collective)
        folder = self.checkpoint_folder(trial)
        if self.args.should_save:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / COMPLETE_MARKER).unlink(missing_ok=True)  # a folder saved over is incomplete until the end
            save_anchor(self.sp.reference, folder, anchors)
            self.save_feature_state(folder)
            self.save_resume_extras(folder)
        result = super()._save_checkpoint(model, trial)
        if self.args.should_save:
            mark_complete(folder, self.state.global_step)
        return result

    def checkpoint_folder(self, trial=None) -> Path:
        """The checkpoint-N folder Trainer is saving now."""
        return Path(self._get_output_dir(trial=trial)) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"

    def save_resume_extras(self, folder: Path) -> None:
        """What else a checkpoint must hold to resume (a mixin's state, e.g. the retention sets' start values),
        written with the anchor, before the completion marker. Nothing here."""

    def restore_resume_extras(self, checkpoint: str) -> None:
        """Read back what `save_resume_extras` wrote, before training resumes. Nothing here."""

    def train(self, resume_from_checkpoint: str | bool | None = None, *args, **kwargs):
        """`Trainer.train`, resuming only from completely written checkpoints and restoring their anchor."""
        if resume_from_checkpoint is True:
            resume_from_checkpoint = last_complete_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ConfigError(f"No valid checkpoint found in output directory ({self.args.output_dir}): "
                                  "resume_from_checkpoint=True needs a checkpoint-N folder that was completely "
                                  "written.")
        if resume_from_checkpoint:
            self._restore_anchor(str(resume_from_checkpoint))
            self.restore_resume_extras(str(resume_from_checkpoint))
            deepspeed = getattr(self, "is_deepspeed_enabled", False)
            if deepspeed:
                check_deepspeed_world_size(resume_from_checkpoint, self.accelerator.num_processes)
            if self.args.should_save:
                warn_dropped_state(resume_from_checkpoint, deepspeed)
        self.sp.side_penalty_total, self.sp.side_penalty_steps = 0.0, 0
        output = super().train(resume_from_checkpoint, *args, **kwargs)
        # sp_mode 'grad'/'decoupled': the final train_loss was logged with Omega added (log); return the same.
        return output._replace(training_loss=output.metrics.get("train_loss", output.training_loss))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        """Trainer's weight loading, then the fused tensors it leaves out (`restore_converted_weights`)."""
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        model = model if model is not None else self.model
        restore_converted_weights(resume_from_checkpoint, model, base_prefix(model))

    def _restore_anchor(self, checkpoint: str) -> None:
        fixed = bool(self.args.sp_reference) or self._given_reference is not None
        with whole_parameters(self.model):  # DeepSpeed ZeRO-3: read and sorted whole, once
            stored = anchor_to_resume(checkpoint, self.sp.reference, self.args.device, fixed=fixed,
                                      description=self._anchor_description(), layouts=parameter_layouts(self.model),
                                      prefix=base_prefix(self.model), active=self.sp.active, recover=self._read_anchor)
            check_fisher_unchanged(checkpoint, getattr(self.sp.regularizer, "fisher", None), self.args.sp_fisher)
            self.sp.reference = stored
            self.refresh_sp_parameters()
            if self.sp.zero3:  # resolved now, on whole parameters (DeepSpeed partitions them for training)
                self.sp_parameters()
        if is_partitioned(self.model):
            partition_anchor(self.sp_parameters(), self.sp.reference)
        for feature in self.sp.features:  # e.g. DELTA's channel attention: the run's, not a recomputed one
            feature.load_state(checkpoint)

    def _read_anchor(self, source: str) -> Reference | None:
        """w0 read from `source` (a folder or cached Hub repo) for this model, or None when it cannot be read."""
        try:
            return Reference.from_checkpoint(source, self.model, self.sp.head_modules, self.args.device,
                                             new_names=self.sp.new_tensors.names if self.sp.new_tensors else ())
        except (UserError, OSError) as err:
            logger.info("hf_l2sp: could not read an anchor from %s (%s)", source, err)
            return None

    def _anchor_description(self) -> str:
        """Where w0 comes from, as the card and sp_config.json say it (what the run really did)."""
        base = public_name(self.base_model())
        of = f" of {base}" if base else ""
        if not getattr(self.sp.regularizer, "pulls_to_source", True):
            return (f"not a target: {self.sp.spec.weight} pulls the weights towards 0 (the pretrained weights{of} "
                    "are kept to report the drift)")
        if self.sp.adapters is not None and self.sp.adapters.lora:
            return f"the frozen base weights{of} (LoRA: the frozen base is the anchor; no copy is kept)"
        if self.args.sp_reference:
            revision = f" @ {self.args.sp_reference_revision}" if self.args.sp_reference_revision else ""
            return f"loaded from {public_name(self.args.sp_reference)}{revision}"
        return f"the pretrained weights{of}, copied when training started"

    def save_feature_state(self, folder: str | Path) -> None:
        """What the feature penalties need to resume or to be reused (e.g. DELTA's channel attention)."""
        for feature in self.sp.features:
            for name, tensors in feature.state_files().items():
                save_file(tensors, str(Path(folder) / name))

