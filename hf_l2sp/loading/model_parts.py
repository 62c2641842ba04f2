"""The structure of a loaded model: parameter names under wrappers (DDP, torch.compile, FSDP, PEFT), checkpoint keys,
the task head that fine-tuning re-initialises, and the weight matrices the paper penalises."""

from __future__ import annotations

from torch import nn

from ..utils.errors import ConfigError

#: Path components that wrappers insert into parameter names (DDP, torch.compile, FSDP, activation checkpointing).
WRAPPER_COMPONENTS = ("module", "_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module")

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
    """Canonical names of the tensors `sp_include='weights'` penalises: every parameter that maps features.

    The rule is a property of the tensor, not a list of layer classes, so that no layer type falls silently free: a
    tensor with two or more dimensions is a weight (a linear or convolution kernel, an embedding table, transformers'
    transposed `Conv1D` weight, a mixture of experts' fused 3-D expert weights, a router, a positional table); one
    with fewer is a per-channel scale or shift (biases, norm layers' affine parameters, layer scales), which the
    paper's code leaves free. A parametrized weight (`torch.nn.utils.parametrize`, e.g. wav2vec2's weight-normed
    positional convolution) is penalised through its originals (`parametrizations.weight.original0/1`, its g and
    v), which are the tensors the checkpoint stores and the optimizer steps.
    """
    names = set()
    for name, param in model.named_parameters():
        if param.ndim >= 2 or _is_parametrization_original(name, model):
            names.add(canonical_name(name))
    return names


def _is_parametrization_original(name: str, model: nn.Module) -> bool:
    """An original of a parametrized `weight` whose composed value is a weight (two or more dimensions)."""
    parts = name.split(".")
    if len(parts) < 3 or parts[-3:-1] != ["parametrizations", "weight"]:
        return False
    owner = model.get_submodule(".".join(parts[:-3]))
    weight = getattr(owner, "weight", None)
    return weight is not None and weight.ndim >= 2


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
