"""The construction line: what the penalty covers, where the anchor comes from, and why tensors are new."""

from __future__ import annotations

import logging

from torch import nn

from ..anchor.parameters import SPParameters
from ..loading.model_parts import unwrap_model
from ..utils.logs import announce

logger = logging.getLogger("hf_l2sp")


def anchor_text(state) -> str:
    """Where w0 comes from, as the construction line says it: a LoRA model's adapters are anchored to the frozen base
    itself (no copy); only the trainable tensors outside the adapters (modules_to_save, biases) are copied."""
    if state.adapters is None or not state.adapters.lora:
        return state.reference.source
    copied = len(state.reference.tensors)
    extra = f"; {copied} other trainable tensor(s) copied when SPTrainer was built" if copied else ""
    return f"the frozen base weights (LoRA adapters: no copy of w0){extra}"


def log_coverage(model: nn.Module, sets: SPParameters, state, include: str) -> None:
    """One line: the anchored, new and free shares of the trainable values, the anchor's source and the new tensors.

    A WARNING when a weight penalty leaves more than half the values free, or treats tensors that hold pretrained
    values as new; otherwise INFO, or stderr in a script that set up no logging (`announce`): visible either way.
    `state` is the trainer's `PenaltyState`.
    """
    new = state.new_tensors
    line = (f"hf_l2sp: {state.regularizer} on {type(unwrap_model(model)).__name__}, {sets.coverage_text()} "
            f"(sp_include={include!r}); anchor: {anchor_text(state)}; new: {new.describe() if new else '-'}")
    acting = state.spec.weight_named and bool(getattr(state.regularizer, "alpha", 0.0))
    problems = []
    if acting and sets.coverage()["free_share"] > 0.5:
        problems.append("more than half the trainable values are free (neither anchored nor new): check "
                        "sp_include ('all' anchors every trainable tensor)")
    if acting and new is not None and new.pretrained_but_new:
        problems.append(f"{len(new.pretrained_but_new)} tensors hold pretrained values but are treated as new "
                        f"(task head {', '.join(new.head_modules)}); set sp_head='none' to anchor them instead")
    if problems:
        logger.warning("%s. Warning: %s.", line, "; ".join(problems))
    else:
        announce(logger, line)
