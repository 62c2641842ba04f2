"""Load a pretrained backbone with a fresh head for the target labels, and say exactly what was pretrained."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn
from transformers import (
    AutoModelForImageClassification,
    PreTrainedModel,
    TimmWrapperConfig,
    TimmWrapperForImageClassification,
)

from . import assets
from ..utils.files import jsonable
from .model_parts import find_head_modules, head_parameter_names
from ..utils.hub import download_snapshot, is_hub_id
from ..utils.text import first_few
from .weights import read_weights_folder
from ..utils.errors import ConfigError, MissingFileError

logger = logging.getLogger(__name__)


@dataclass
class BackboneReport:
    """What `load_backbone` loaded: S (pretrained) vs S-bar (new) tensors and parameters, and the head."""

    source: str
    revision: str | None
    kind: str  # "timm" or "transformers"
    architecture: str
    pretrained_tensors: int
    pretrained_parameters: int
    new_tensors: int
    new_parameters: int
    head_modules: list[str] = field(default_factory=list)
    new_tensor_names: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return (f"{self.source} ({self.kind}: {self.architecture}): {self.pretrained_tensors} pretrained tensors "
                f"({self.pretrained_parameters:,} parameters), {self.new_tensors} new "
                f"({self.new_parameters:,} parameters) in head {', '.join(self.head_modules) or '-'}")


def is_timm_wrapper(model: nn.Module) -> bool:
    return hasattr(model, "timm_model") and getattr(getattr(model, "config", None), "model_type", "") == "timm_wrapper"


_DATA_KEYS = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
EVAL_DATA_CONFIG = "hf_l2sp_eval_data_config"  # config.json key of a native transformers model's eval transform


def set_eval_data_config(model: nn.Module, data_config: dict) -> None:
    """Record the evaluation preprocessing (size, crop, mean/std) in the model's config.

    TimmWrapper: in `pretrained_cfg`, which timm, `AutoImageProcessor` and the pipeline read. A native transformers
    model: under `hf_l2sp_eval_data_config`, which `data_config_of` (so `hf-l2sp evaluate` and any later
    run) reads back; its own image processor class may not express a timm transform exactly.
    """
    if not is_timm_wrapper(model):
        setattr(model.config, EVAL_DATA_CONFIG, jsonable({k: data_config[k] for k in _DATA_KEYS if k in data_config}))
        return
    cfg = dict(getattr(model.config, "pretrained_cfg", None) or getattr(model.timm_model, "pretrained_cfg", {}) or {})
    cfg.update({k: data_config[k] for k in _DATA_KEYS if k in data_config})
    cfg["test_input_size"] = cfg["input_size"]  # the processor must not switch to a larger test size
    model.config.pretrained_cfg = jsonable(cfg)
    model.timm_model.pretrained_cfg = {**model.timm_model.pretrained_cfg, **cfg}



def load_backbone(name_or_path: str, id2label: dict[int, str], revision: str | None = None,
                  cache_dir: str | None = None) -> tuple[PreTrainedModel, BackboneReport]:
    """A trainable image classifier for `id2label` from pretrained weights, never silently random.

    `name_or_path`: a timm Hub id (`timm/resnet50.a1_in1k`, `hf-hub:...`), a timm model name with a pretrained tag
    (`resnet50.a1_in1k`), a local timm-format folder (`save_for_hf`), or a transformers checkpoint (folder or Hub
    id). timm models come back as `TimmWrapperForImageClassification`. The head is new when its shape differs from
    the checkpoint's; every other tensor must load from the checkpoint, else this raises naming the missing keys.
    """
    if not id2label:
        raise ConfigError("load_backbone needs the target labels (id2label), got none.")
    folder, source = _resolve_folder(name_or_path, revision, cache_dir)
    config = _read_config(folder, source)
    if "architecture" in config and config.get("model_type") in (None, "timm_wrapper"):
        model, new = _load_timm(folder, config, id2label, source)
        kind, arch = "timm", config["architecture"]
    elif "model_type" in config:
        _check_image_classifier(config["model_type"], source)
        model, new = _load_transformers(folder, id2label, source)
        kind, arch = "transformers", type(model).__name__
    else:
        raise ConfigError(f"{source!r} has a config.json that neither timm (no 'architecture') nor transformers "
                          "(no 'model_type') can read.")
    model.config._name_or_path = source  # provenance for logs and model cards (never a local cache path)
    return model, _report(model, new, source, revision, kind, arch)


def check_image_backbone(name_or_path: str, revision: str | None = None, cache_dir: str | None = None) -> None:
    """Refuse, before any data is read, a model that is not an image classifier (only its config is read)."""
    folder, source = _resolve_folder(name_or_path, revision, cache_dir)
    config = _read_config(folder, source)
    if "model_type" in config and not ("architecture" in config and config["model_type"] in (None, "timm_wrapper")):
        _check_image_classifier(config["model_type"], source)


def _check_image_classifier(model_type: str, source: str) -> None:
    """The image paths (`hf-l2sp train`, `load_backbone`) take image classifiers only: say so for anything else."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES

    if model_type not in MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES:
        raise ConfigError(
            f"{source!r} is a {model_type!r} model, not an image classifier: `hf-l2sp train` and load_backbone "
            "fine-tune image classifiers (timm or transformers). Train text and language models with SPTrainer, "
            "or SPMixin over TRL's trainers, in your own script (see the Quickstart).")


def load_source_classifier(name_or_path: str, revision: str | None = None,
                           cache_dir: str | None = None) -> tuple[PreTrainedModel, BackboneReport]:
    """The pretrained classifier exactly as published, source head included (for Fisher estimation)."""
    folder, source = _resolve_folder(name_or_path, revision, cache_dir)
    config = _read_config(folder, source)
    names = config.get("label_names") or list((config.get("id2label") or {}).values())
    num_classes = config.get("num_classes") or len(names)
    if not num_classes:
        raise ConfigError(f"{source!r} has no classification head in its config (num_classes/label_names/id2label "
                          "missing); the Fisher needs the source model's own head.")
    id2label = {i: str(names[i]) if i < len(names) else f"LABEL_{i}" for i in range(num_classes)}
    model, report = load_backbone(name_or_path, id2label, revision, cache_dir)
    if report.new_tensors:
        raise ConfigError(f"The source head of {source!r} did not load ({', '.join(report.new_tensor_names)}); "
                          "the Fisher must be computed with the pretrained head.")
    return model, report


def _resolve_folder(name_or_path: str, revision: str | None, cache_dir: str | None) -> tuple[Path, str]:
    for prefix in ("hf-hub:", "local-dir:"):
        if name_or_path.startswith(prefix):
            name_or_path = name_or_path[len(prefix):]
    source = name_or_path
    path = Path(assets.resolve(name_or_path)).expanduser()  # embedded offline weights ('hf_l2sp:...')
    if path.is_dir():
        return path, source
    repo_id = name_or_path if is_hub_id(name_or_path) else _timm_hub_id(name_or_path)
    return download_snapshot(repo_id, f"model {name_or_path!r}", revision, cache_dir), name_or_path


def _timm_hub_id(name: str) -> str:
    """'resnet50.a1_in1k' -> 'timm/resnet50.a1_in1k' via timm's pretrained config."""
    import timm

    if not timm.is_model(name.split(".")[0]):
        raise ConfigError(f"Model {name!r} is not a local folder, a Hub id ('org/name') or a timm model name. "
                          "Examples: 'timm/resnet50.a1_in1k', 'resnet50.a1_in1k', './my_checkpoint'.")
    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None or not getattr(cfg, "hf_hub_id", None):
        raise ConfigError(f"timm has no Hub weights for {name!r}; name a tag with weights, e.g. "
                          f"{(timm.list_pretrained(name.split('.')[0] + '*') or ['resnet50.a1_in1k'])[0]!r}.")
    return cfg.hf_hub_id


def _read_config(folder: Path, source: str) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise MissingFileError(f"Model {source!r} has no config.json in {folder}; neither timm nor transformers "
                                "can load it.")
    return json.loads(path.read_text())


def _load_timm(folder: Path, config: dict, id2label: dict[int, str], source: str):
    model_args = {k: v for k, v in (config.get("model_args") or {}).items() if k != "num_classes"}
    pretrained_cfg = dict(config.get("pretrained_cfg") or {})
    pretrained_cfg.pop("num_classes", None)
    wrapper_config = TimmWrapperConfig(
        architecture=config["architecture"], num_labels=len(id2label), id2label=dict(id2label),
        label2id={v: k for k, v in id2label.items()}, model_args=model_args, pretrained_cfg=pretrained_cfg,
    )
    model = TimmWrapperForImageClassification(wrapper_config)
    timm_model = model.timm_model
    if pretrained_cfg:  # the checkpoint's own data config (mean/std/size) and classifier name
        timm_model.pretrained_cfg = {**timm_model.pretrained_cfg, **pretrained_cfg}
    state = {k.removeprefix("timm_model."): v for k, v in read_weights_folder(folder).items()}
    target = timm_model.state_dict()
    head = {n.removeprefix("timm_model.") for n in head_parameter_names(model, find_head_modules(model))}
    load, new, problems = {}, set(), []
    for key, value in state.items():
        if key not in target:
            problems.append(f"unexpected {key}")
        elif tuple(value.shape) == tuple(target[key].shape):
            load[key] = value
        elif key in head:
            new.add(key)
        else:
            problems.append(f"{key}: checkpoint {tuple(value.shape)} vs model {tuple(target[key].shape)}")
    missing = [k for k in target if k not in load and k not in head and not k.endswith("num_batches_tracked")]
    new |= {k for k in head if k not in load}
    if missing or problems:
        raise ConfigError(f"Pretrained weights of {source!r} do not fit timm '{config['architecture']}': "
                          + "; ".join(filter(None, [_listed("missing", missing), _listed("mismatched", problems)]))
                          + ". Refusing to return a partly random backbone.")
    timm_model.load_state_dict(load, strict=False)
    return model, {f"timm_model.{k}" for k in new}


def _load_transformers(folder: Path, id2label: dict[int, str], source: str):
    model, info = AutoModelForImageClassification.from_pretrained(
        folder, num_labels=len(id2label), id2label=dict(id2label), label2id={v: k for k, v in id2label.items()},
        ignore_mismatched_sizes=True, output_loading_info=True,
    )
    head = head_parameter_names(model, find_head_modules(model))
    mismatched = {m[0] if isinstance(m, (tuple, list)) else m for m in info.get("mismatched_keys", [])}
    missing = [k for k in info.get("missing_keys", []) if k not in head and not k.endswith("num_batches_tracked")]
    bad_mismatch = sorted(k for k in mismatched if k not in head)
    if missing or bad_mismatch:
        raise ConfigError(f"Pretrained weights of {source!r} do not fit {type(model).__name__}: "
                          + "; ".join(filter(None, [_listed("missing", missing), _listed("mismatched", bad_mismatch)]))
                          + ". Refusing to return a partly random backbone.")
    new = {k for k in head if k in mismatched or k in info.get("missing_keys", [])}
    return model, new


def _listed(what: str, keys: list[str]) -> str:
    return f"{what}: {first_few(sorted(keys), limit=8)}" if keys else ""


def _report(model: nn.Module, new: set[str], source, revision, kind, architecture) -> BackboneReport:
    named = dict(model.named_parameters())
    new_params = [p for n, p in named.items() if n in new]
    old_params = [p for n, p in named.items() if n not in new]
    return BackboneReport(
        source=source, revision=revision, kind=kind, architecture=architecture,
        pretrained_tensors=len(old_params), pretrained_parameters=sum(p.numel() for p in old_params),
        new_tensors=len(new_params), new_parameters=sum(p.numel() for p in new_params),
        head_modules=find_head_modules(model), new_tensor_names=sorted(new),
    )


def data_config_of(model: nn.Module) -> dict:
    """timm data config (input_size, mean, std, interpolation, crop_pct) of a TimmWrapper or transformers model."""
    import timm.data

    timm_model = getattr(model, "timm_model", None)
    if timm_model is not None:
        return timm.data.resolve_model_data_config(timm_model)
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    from transformers import AutoImageProcessor


    config = model.config
    saved = getattr(config, EVAL_DATA_CONFIG, None)
    if saved:  # a checkpoint fine-tuned here: the exact evaluation transform it was trained with
        return {k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()}
    try:
        processor = AutoImageProcessor.from_pretrained(config._name_or_path)
    except (OSError, ValueError):
        side = getattr(config, "image_size", 224)
        logger.warning("No image processor saved with %r: using %d px and ImageNet mean/std.", config._name_or_path,
                       side)
        return {"input_size": (3, side, side), "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
                "interpolation": "bilinear", "crop_pct": 0.875}
    size = getattr(processor, "size", {}) or {}
    side = size.get("shortest_edge") or size.get("height") or 224
    return {"input_size": (3, side, side), "mean": tuple(processor.image_mean), "std": tuple(processor.image_std),
            "interpolation": "bilinear", "crop_pct": 0.875}


__all__ = ["BackboneReport", "data_config_of", "load_backbone"]
