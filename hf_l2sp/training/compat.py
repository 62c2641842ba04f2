"""The parts of `transformers.Trainer` (several of them private) that SPTrainer's maths relies on, checked when a
trainer is built: a rename upstream must stop the run with a clear error, never change the result silently.
"""

from __future__ import annotations

import inspect

from transformers import Trainer

#: The oldest transformers release the whole test suite passed on (pyproject declares the same floor).
TRANSFORMERS_FLOOR = "5.19.0"  # 5.18 has no Trainer.loss_is_scaled_for_ga

#: Trainer members SPTrainer overrides or reads, and what would silently change without them.
TRAINER_HOOKS = {
    "compute_loss": "Omega is added to the loss there",
    "_clip_grad_norm": "sp_mode='grad' adds its gradient there, before clipping",
    "_get_grad_norm": "sp_mode='grad' adds its gradient there when gradients are not clipped",
    "_hp_search_setup": "a search trial's sp_* values rebuild the penalty there",
    "call_model_init": "each model_init model is anchored there",
    "_save_checkpoint": "the anchor and the completion marker are written there",
    "_save": "the weights timm loads are written there",
    "save_model": "the final artefacts (card, drift) are written there",
    "_remove_unused_columns": "datasets with a transform keep their columns there",
    "_get_output_dir": "names the checkpoint folder the anchor goes into",
    "loss_is_scaled_for_ga": "says whether Trainer divides the loss by the accumulation steps",
    "_load_from_checkpoint": "fused expert tensors, which Trainer does not map back on resume, are restored there",
    "evaluation_loop": "retention sets get their forgetting there",
    "_push_from_checkpoint": "the folders pushed at each save are scanned for credentials there",
    "_prepare_inputs": "retention measures move their batches to the device there",
    "compute_loss_context_manager": "retention measures run under the evaluation's precision there",
}
#: Parameters the overrides pass on.
TRAINER_PARAMETERS = {"compute_loss": "num_items_in_batch", "save_model": "_internal_call",
                      "_get_grad_norm": "grad_norm", "evaluation_loop": "metric_key_prefix"}


def check_trainer_hooks(trainer_class: type = Trainer) -> None:
    """Raise naming every member of `trainer_class` that SPTrainer relies on and that is missing."""
    problems = [f"{name} ({why})" for name, why in TRAINER_HOOKS.items() if not hasattr(trainer_class, name)]
    for name, parameter in TRAINER_PARAMETERS.items():
        method = getattr(trainer_class, name, None)
        if method is not None and parameter not in inspect.signature(method).parameters:
            problems.append(f"{name}(..., {parameter}=...)")
    if problems:
        import transformers

        raise RuntimeError(
            f"hf_l2sp's SPTrainer needs transformers >= {TRANSFORMERS_FLOOR}; the installed transformers "
            f"{transformers.__version__} lacks: {'; '.join(problems)}. Install a supported version: "
            f"pip install 'transformers>={TRANSFORMERS_FLOOR},<6'."
        )


def loss_comes_from_model(cls: type, mixin: type) -> bool:
    """True when nothing between `mixin` and `transformers.Trainer` in `cls`'s MRO overrides `compute_loss`: the
    training loss is then the model's own (a trainer like TRL's SFTTrainer computes its own)."""
    mro = cls.__mro__
    for klass in mro[mro.index(mixin) + 1:]:
        if "compute_loss" in vars(klass):
            return klass is Trainer
    return False


def check_mixin_order(cls: type, mixin: type) -> None:
    """The SP mixin must come before the Trainer it extends: in `class X(Trainer, SPMixin)` Trainer's __init__ runs
    first and never reaches the mixin's, so X would train without the penalty, silently."""
    mro = cls.__mro__
    before = [c for c in mro[1: mro.index(mixin)] if issubclass(c, Trainer) and not issubclass(c, mixin)]
    if before:
        raise TypeError(f"{cls.__name__} puts {before[0].__name__} before the SP mixin, so the penalty would never "
                        f"run: write class {cls.__name__}(SPMixin, {before[0].__name__}).")
