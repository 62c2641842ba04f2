"""The structure of a loaded model: parameter names under wrappers (DDP, torch.compile, FSDP, PEFT), checkpoint keys,
the task head that fine-tuning re-initialises, and the weight matrices the paper penalises."""

from __future__ import annotations

from torch import nn
from transformers.pytorch_utils import Conv1D  # GPT-2's linear layer; imported by name so a rename fails loudly

from ..utils.errors import ConfigError

#: Path components that wrappers insert into parameter names (DDP, torch.compile, FSDP, activation checkpointing).
WRAPPER_COMPONENTS = ("module", "_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module")

_FEATURE_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
                   nn.Linear, nn.Embedding, Conv1D)


def _is_feature_layer(module: nn.Module) -> bool:
    """A layer whose `weight` maps features: Linear, Conv*, Embedding (a linear map of one-hot tokens), and
    transformers' `Conv1D` (GPT-2's linear layer, its weight stored transposed; no subclass of nn.Linear)."""
    return isinstance(module, _FEATURE_LAYERS)


def canonical_name(name: str) -> str:
    """Parameter name with wrapper components removed: 'module._orig_mod.fc.weight' -> 'fc.weight'.

    PEFT's too: the 'base_model.model.' prefix, LoRA's 'base_layer' (the wrapped original) and
    'modules_to_save.<adapter>' (a trained copy), so that a frozen base weight keeps its checkpoint name and a copy
    takes the name of the module it replaces; a copy's frozen 'original_module' keeps its own name.
    """
    parts = [part for part in name.split(".") if part not in WRAPPER_COMPONENTS]
    if parts[:2] == ["base_model", "model"]:
        parts = parts[2:]
    out, skip = [], False
    for i, part in enumerate(parts):
        if skip:
            skip = False
        elif part == "modules_to_save" and i + 1 < len(parts):
            skip = True  # and the adapter name after it
        elif part != "base_layer":
            out.append(part)
    return ".".join(out)


def unwrap_model(model: nn.Module) -> nn.Module:
    """Peel DDP/DataParallel (`.module`) and torch.compile (`._orig_mod`) wrappers."""
    while True:
        inner = getattr(model, "_orig_mod", None) or (
            model.module if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)) else None
        )
        if inner is None:
            return model
        model = inner


def is_peft_model(model: nn.Module) -> bool:
    """A PEFT model (`PeftModel` and its task subclasses), under any wrapper."""
    inner = unwrap_model(model)
    return hasattr(inner, "peft_config") and hasattr(inner, "get_base_model")


def peft_base_model(model: nn.Module) -> nn.Module:
    """The transformers model inside a PEFT model (LoRA layers injected), or the unwrapped model itself."""
    inner = unwrap_model(model)
    return inner.get_base_model() if is_peft_model(inner) else inner


def base_prefix(model: nn.Module) -> str:
    """The transformers base-model prefix ('timm_model', 'vit', ...) or '' for a plain module."""
    return getattr(peft_base_model(model), "base_model_prefix", "") or ""


def checkpoint_key(name: str, prefix: str) -> str:
    """The name a checkpoint uses for a parameter: canonical, without the base-model prefix.

    timm-format files have no 'timm_model.' prefix, transformers base-model files no 'vit.' prefix; matching on
    this key lets a reference or Fisher file saved either way line up with the model.
    """
    name = canonical_name(name)
    if prefix and name.startswith(prefix + "."):
        return name[len(prefix) + 1 :]
    return name


def feature_weight_names(model: nn.Module) -> set[str]:
    """Canonical names of the weight matrix of every feature-mapping layer (`_is_feature_layer`): the set the paper
    penalises (norm layers' scales and every bias are left free).

    Names are those `named_parameters()` reports, so a weight tied between two modules (GPT-2's token embedding and
    its LM head) is found whichever module holds it first.
    """
    by_id = {id(p): canonical_name(n) for n, p in model.named_parameters()}
    names = set()
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if _is_feature_layer(module) and isinstance(weight, nn.Parameter) and id(weight) in by_id:
            names.add(by_id[id(weight)])
    return names


def _timm_head_modules(timm_model: nn.Module) -> list[str]:
    cfg = getattr(timm_model, "pretrained_cfg", None) or {}
    classifier = cfg.get("classifier")
    if classifier:
        return [classifier] if isinstance(classifier, str) else list(classifier)
    if hasattr(timm_model, "get_classifier"):
        head = timm_model.get_classifier()
        for name, module in timm_model.named_modules():
            if module is head and name:
                return [name]
    return []


#: Module names transformers gives the task head of its classifiers (sequence/token classification, images).
_CLASSIFIER_MODULES = ("classifier", "score")


def is_classifier(model: nn.Module) -> bool:
    """False only for a transformers model that is not a `*For*Classification` (a causal or masked LM, a bare
    encoder): it has no task head to re-initialise. timm models and unknown modules count as classifiers."""
    inner = unwrap_model(model)
    is_transformers = bool(getattr(getattr(inner, "config", None), "model_type", None))
    return hasattr(inner, "timm_model") or not is_transformers or "Classification" in type(inner).__name__


def find_head_modules(model: nn.Module) -> list[str]:
    """Module names (canonical) of the task head that fine-tuning re-initialises.

    TimmWrapper / timm models: `pretrained_cfg['classifier']`; transformers classifiers: their `classifier` or
    `score` module, else the last Linear whose out_features equals `config.num_labels`. A model that is not a
    classifier (a causal or masked LM, a bare encoder) has no such head: []. Raises for a classifier whose head
    cannot be found.
    """
    inner = peft_base_model(model)
    timm_model = getattr(inner, "timm_model", None)
    if timm_model is not None:
        heads = [f"timm_model.{name}" for name in _timm_head_modules(timm_model)]
    elif hasattr(inner, "pretrained_cfg") and hasattr(inner, "get_classifier"):
        heads = _timm_head_modules(inner)
    elif named := [n for n in _CLASSIFIER_MODULES if isinstance(getattr(inner, n, None), nn.Module)]:
        heads = named[:1]
    elif not is_classifier(inner):
        return []
    else:
        num_labels = getattr(getattr(inner, "config", None), "num_labels", None)
        linears = [n for n, m in inner.named_modules() if isinstance(m, nn.Linear) and m.out_features == num_labels]
        heads = linears[-1:] if num_labels else []
    if not heads:
        raise ConfigError(
            f"Could not find the classification head of {type(inner).__name__}. Set sp_head to the head's module "
            "name(s), comma separated (e.g. sp_head='fc'), or sp_head='none' if it has no new head."
        )
    return [canonical_name(h) for h in heads]


def parse_head_option(value: str | None) -> list[str] | None:
    """`sp_head` option: None -> auto-detect; 'none' -> no head; 'fc,aux.fc' -> those modules."""
    if value is None:
        return None
    if value.strip().lower() == "none":
        return []
    return [canonical_name(v.strip()) for v in value.split(",") if v.strip()]


def in_modules(name: str, modules: list[str]) -> bool:
    """Whether the parameter or module `name` is one of `modules` or lies inside one of them."""
    return any(name == m or name.startswith(m + ".") for m in modules)


def head_parameter_names(model: nn.Module, head_modules: list[str]) -> set[str]:
    return {cname for name, _ in unwrap_model(model).named_parameters()
            if in_modules(cname := canonical_name(name), head_modules)}


def validate_head_modules(model: nn.Module, head_modules: list[str]) -> None:
    known = {canonical_name(n) for n, _ in unwrap_model(model).named_modules()}
    unknown = [h for h in head_modules if h not in known]
    if unknown:
        top = sorted(n for n in known if n and "." not in n)
        raise ConfigError(
            f"sp_head names module(s) {unknown} that {type(unwrap_model(model)).__name__} does not have. "
            f"Top-level modules: {top}."
        )


def model_task(model: nn.Module) -> str | None:
    """The Hub pipeline task of a model ('image-classification', 'text-classification', 'text-generation', ...),
    from transformers' own auto-class tables (a rename there fails at import, loudly); None when unknown."""
    from transformers.models.auto import modeling_auto as auto

    inner = peft_base_model(model)
    if hasattr(inner, "timm_model"):
        return "image-classification"
    tables = (("image-classification", auto.MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES),
              ("text-classification", auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES),
              ("text-generation", auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES),
              ("token-classification", auto.MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES),
              ("fill-mask", auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES),
              ("question-answering", auto.MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES),
              ("text2text-generation", auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES))
    name = type(inner).__name__
    for task, table in tables:
        for value in table.values():
            if name == value or (isinstance(value, (tuple, list)) and name in value):
                return task
    return None


def saved_keys(model: nn.Module) -> dict[str, str]:
    """Canonical parameter name -> the checkpoint key (`checkpoint_key` form) `save_pretrained` writes for it.

    transformers 5 renames some modules between checkpoint and model (ViT's `encoder.layer` is `layers` in the
    model) and renames back on save, through `revert_weight_conversion`: asking that same function keeps every
    comparison with a checkpoint's key list in step with transformers. It is imported by name, so a rename there
    fails loudly. Tensors it merges or splits (fused experts) keep their model name here.
    """
    import torch
    from transformers import PreTrainedModel
    from transformers.core_model_loading import revert_weight_conversion

    inner = peft_base_model(model)
    prefix = base_prefix(inner)
    names = {canonical_name(n): torch.empty(p.shape, device="meta") for n, p in inner.named_parameters()}
    keys = {name: checkpoint_key(name, prefix) for name in names}
    if isinstance(inner, PreTrainedModel):
        by_tensor = {id(t): name for name, t in names.items()}
        for key, tensor in revert_weight_conversion(inner, dict(names)).items():
            if id(tensor) in by_tensor:
                keys[by_tensor[id(tensor)]] = checkpoint_key(key, prefix)
    return keys
