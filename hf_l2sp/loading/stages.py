"""The modules whose outputs are a backbone's stages: for DELTA's feature maps and the drift report.

timm models (bare or inside TimmWrapper) list them in `feature_info`. transformers CNN classifiers (ResNet, ConvNeXt,
ConvNeXtV2, RegNet, BiT, ...) keep them as the ModuleList `<base_model>.encoder.stages`. Anything else has no known
stages and gets an empty list: callers decide whether that is an error.
"""

from __future__ import annotations

from torch import nn

from .model_parts import canonical_name, unwrap_model


def stage_modules(model: nn.Module) -> list[str]:
    """Canonical module names of the backbone's stages, in order ([] when the model does not say)."""
    inner = unwrap_model(model)
    timm_model = getattr(inner, "timm_model", None)
    info = getattr(timm_model if timm_model is not None else inner, "feature_info", None)
    if isinstance(info, list):
        prefix = "timm_model." if timm_model is not None else ""
        return [prefix + f["module"] for f in info if f.get("module")]
    base = getattr(inner, "base_model_prefix", "") or ""
    base_model = getattr(inner, base, None) if base else None
    stages = getattr(getattr(base_model, "encoder", None), "stages", None)
    if isinstance(stages, nn.ModuleList) and len(stages):
        return [f"{base}.encoder.stages.{i}" for i in range(len(stages))]
    return []


def block_modules(model: nn.Module) -> list[str]:
    """The repeated blocks of a model without stages (a transformer's layers: BERT's `encoder.layer`, GPT-2's
    `transformer.h`, Llama's `model.layers`): the elements of the list of same-class modules holding the most
    parameters, by canonical name (a PEFT model's too). For the drift report, where they play the part of stages
    ([] when there is no such list)."""
    inner = unwrap_model(model)
    best, best_size = [], 0
    for name, module in inner.named_modules():
        children = list(module.children()) if isinstance(module, nn.ModuleList) else []
        if not children or len({type(c) for c in children}) != 1:
            continue
        size = sum(getattr(p, "ds_numel", None) or p.numel() for p in module.parameters())  # ZeRO-3: whole size
        if size > best_size:
            best, best_size = [canonical_name(f"{name}.{i}") for i in range(len(children))], size
    return best
