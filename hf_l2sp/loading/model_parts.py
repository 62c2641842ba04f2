"""The structure of a loaded model: parameter names under wrappers (DDP, torch.compile, FSDP), checkpoint keys, the
classification head that fine-tuning re-initialises, and the conv/linear weights the paper penalises."""

from __future__ import annotations

from torch import nn

#: Path components that wrappers insert into parameter names (DDP, torch.compile, FSDP, activation checkpointing).
WRAPPER_COMPONENTS = ("module", "_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module")

_CONV_OR_LINEAR = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
                   nn.Linear)


def canonical_name(name: str) -> str:
    """Parameter name with wrapper components removed: 'module._orig_mod.fc.weight' -> 'fc.weight'."""
    return ".".join(part for part in name.split(".") if part not in WRAPPER_COMPONENTS)


def unwrap_model(model: nn.Module) -> nn.Module:
    """Peel DDP/DataParallel (`.module`) and torch.compile (`._orig_mod`) wrappers."""
    while True:
        inner = getattr(model, "_orig_mod", None) or (
            model.module if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)) else None
        )
        if inner is None:
            return model
        model = inner


def base_prefix(model: nn.Module) -> str:
    """The transformers base-model prefix ('timm_model', 'vit', ...) or '' for a plain module."""
    return getattr(unwrap_model(model), "base_model_prefix", "") or ""


def checkpoint_key(name: str, prefix: str) -> str:
    """The name a checkpoint uses for a parameter: canonical, without the base-model prefix.

    timm-format files have no 'timm_model.' prefix, transformers base-model files no 'vit.' prefix; matching on
    this key lets a reference or Fisher file saved either way line up with the model.
    """
    name = canonical_name(name)
    if prefix and name.startswith(prefix + "."):
        return name[len(prefix) + 1 :]
    return name


def conv_or_linear_weight_names(model: nn.Module) -> set[str]:
    """Canonical names of the `weight` of every Conv*d/ConvTranspose*d/Linear module (the paper's penalised set)."""
    names = set()
    for module_name, module in model.named_modules():
        if isinstance(module, _CONV_OR_LINEAR) and isinstance(getattr(module, "weight", None), nn.Parameter):
            names.add(canonical_name(f"{module_name}.weight" if module_name else "weight"))
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


def find_head_modules(model: nn.Module) -> list[str]:
    """Module names (canonical) of the classification head that fine-tuning re-initialises.

    TimmWrapper / timm models: `pretrained_cfg['classifier']`; transformers image classifiers: their `classifier`
    module; otherwise the last Linear whose out_features equals `config.num_labels`. Raises if none is found.
    """
    inner = unwrap_model(model)
    timm_model = getattr(inner, "timm_model", None)
    if timm_model is not None:
        heads = [f"timm_model.{name}" for name in _timm_head_modules(timm_model)]
    elif hasattr(inner, "pretrained_cfg") and hasattr(inner, "get_classifier"):
        heads = _timm_head_modules(inner)
    elif isinstance(getattr(inner, "classifier", None), nn.Module):
        heads = ["classifier"]
    else:
        num_labels = getattr(getattr(inner, "config", None), "num_labels", None)
        linears = [n for n, m in inner.named_modules() if isinstance(m, nn.Linear) and m.out_features == num_labels]
        heads = linears[-1:] if num_labels else []
    if not heads:
        raise ValueError(
            f"Could not find the classification head of {type(inner).__name__}. Set sp_head to the head's module "
            "name(s), comma separated (e.g. sp_head='fc'), or sp_head='none' to anchor every parameter."
        )
    return [canonical_name(h) for h in heads]


def parse_head_option(value: str | None) -> list[str] | None:
    """`sp_head` option: None -> auto-detect; 'none' -> no head; 'fc,aux.fc' -> those modules."""
    if value is None:
        return None
    if value.strip().lower() == "none":
        return []
    return [canonical_name(v.strip()) for v in value.split(",") if v.strip()]


def head_parameter_names(model: nn.Module, head_modules: list[str]) -> set[str]:
    names = set()
    for name, _ in unwrap_model(model).named_parameters():
        cname = canonical_name(name)
        if any(cname == h or cname.startswith(h + ".") for h in head_modules):
            names.add(cname)
    return names


def validate_head_modules(model: nn.Module, head_modules: list[str]) -> None:
    known = {canonical_name(n) for n, _ in unwrap_model(model).named_modules()}
    unknown = [h for h in head_modules if h not in known]
    if unknown:
        top = sorted(n for n in known if n and "." not in n)
        raise ValueError(
            f"sp_head names module(s) {unknown} that {type(unwrap_model(model)).__name__} does not have. "
            f"Top-level modules: {top}."
        )
