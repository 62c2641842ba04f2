"""Calling a model the way it expects, getting its logits whatever it returns, and what its loss normalises by."""

from __future__ import annotations

import inspect
import re

from torch import Tensor, nn


def call_image_model(model: nn.Module, pixel_values: Tensor):
    """transformers models take `pixel_values=`; plain modules (timm) take the tensor positionally."""
    if getattr(model, "main_input_name", None) == "pixel_values":
        return model(pixel_values=pixel_values)
    return model(pixel_values)


def logits_of(output) -> Tensor:
    """Logits from a ModelOutput, a dict with 'logits', a (logits, ...) tuple or a tensor."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, dict) or hasattr(output, "keys"):
        return output["logits"]
    if hasattr(output, "logits"):
        return output.logits
    return output[0]


_LOSS_CALL = re.compile(r"\b(?:loss_function|loss_fn|loss_fct)\s*\(")


def loss_uses_num_items_in_batch(model: nn.Module) -> bool | None:
    """Whether `model`'s own loss divides by `num_items_in_batch` (Trainer's count of label tokens over the whole
    accumulation window): True when its `forward` passes `**kwargs` or `num_items_in_batch` into a loss call;
    False when it computes a per-micro-batch mean (transformers' CNN and BERT-style classifiers take `**kwargs`
    and drop it); None when the source cannot be read.

    Read from the class's source, not inferred from the signature as Trainer does: a `**kwargs` in the signature
    says nothing about what reaches the loss.
    """
    forward = getattr(type(model), "forward", None)
    try:
        source = inspect.getsource(forward)
    except (OSError, TypeError):
        return None
    if "num_items_in_batch" in source:
        return True
    for match in _LOSS_CALL.finditer(source):
        if "**kwargs" in _call_arguments(source, match.end()):
            return True
    return False


def _call_arguments(source: str, start: int) -> str:
    """The text between the parenthesis opened just before `start` and the one that closes it."""
    depth = 1
    for i in range(start, len(source)):
        depth += {"(": 1, ")": -1}.get(source[i], 0)
        if depth == 0:
            return source[start:i]
    return source[start:]
