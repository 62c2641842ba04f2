"""Calling an image classifier the way it expects and getting its logits, whatever it returns."""

from __future__ import annotations

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
