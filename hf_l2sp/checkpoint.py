"""Make a saved TimmWrapper folder load everywhere: timm (`local-dir:` / `hf-hub:`), transformers, the pipeline.

transformers writes TimmWrapper weights with a `timm_model.` prefix and `"model_args": null`, which timm cannot
read; timm's own `save_for_hf` writes `model_args.num_classes`, which transformers rejects. The folder we leave
has timm-native keys (transformers adds the prefix back on load), `model_args: {}`, and a `pretrained_cfg` that
describes the evaluation preprocessing the model was trained with, so `AutoImageProcessor` and the pipeline
resize and normalise exactly as training evaluated.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

PREFIX = "timm_model."
_DATA_KEYS = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")


def is_timm_wrapper(model: nn.Module) -> bool:
    return hasattr(model, "timm_model") and getattr(getattr(model, "config", None), "model_type", "") == "timm_wrapper"


def prepare_config_for_save(model: nn.Module) -> None:
    """Before `save_pretrained`: timm-readable `model_args` and a full `pretrained_cfg` in the config."""
    if not is_timm_wrapper(model):
        return
    config = model.config
    model_args = dict(getattr(config, "model_args", None) or {})
    model_args.pop("num_classes", None)
    config.model_args = model_args
    cfg = dict(getattr(model.timm_model, "pretrained_cfg", None) or {})
    cfg.update(getattr(config, "pretrained_cfg", None) or {})
    cfg.pop("num_classes", None)
    config.pretrained_cfg = _jsonable(cfg)


EVAL_DATA_CONFIG = "hf_l2sp_eval_data_config"  # config.json key of a native transformers model's eval transform


def set_eval_data_config(model: nn.Module, data_config: dict) -> None:
    """Record the evaluation preprocessing (size, crop, mean/std) in the model's config.

    TimmWrapper: in `pretrained_cfg`, which timm, `AutoImageProcessor` and the pipeline read. A native transformers
    model: under `hf_l2sp_eval_data_config`, which `modeling.data_config_of` (so `hf-l2sp evaluate` and any later
    run) reads back; its own image processor class may not express a timm transform exactly.
    """
    if not is_timm_wrapper(model):
        setattr(model.config, EVAL_DATA_CONFIG, _jsonable({k: data_config[k] for k in _DATA_KEYS if k in data_config}))
        return
    cfg = dict(getattr(model.config, "pretrained_cfg", None) or getattr(model.timm_model, "pretrained_cfg", {}) or {})
    cfg.update({k: data_config[k] for k in _DATA_KEYS if k in data_config})
    cfg["test_input_size"] = cfg["input_size"]  # the processor must not switch to a larger test size
    model.config.pretrained_cfg = _jsonable(cfg)
    model.timm_model.pretrained_cfg = {**model.timm_model.pretrained_cfg, **cfg}


def finalize_timm_folder(folder: str | os.PathLike) -> None:
    """Rewrite the weights of a transformers-saved TimmWrapper folder with timm-native keys (atomically)."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    shards = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else [
        "model.safetensors"]
    renamed_any = False
    for shard in shards:
        path = folder / shard
        with safe_open(str(path), framework="pt") as handle:
            keys = list(handle.keys())
            if not any(k.startswith(PREFIX) for k in keys):
                continue
            metadata = handle.metadata() or {"format": "pt"}
            tensors = {k.removeprefix(PREFIX): handle.get_tensor(k) for k in keys}
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, str(tmp), metadata=metadata)
        os.replace(tmp, path)
        renamed_any = True
    if index.is_file() and renamed_any:
        data = json.loads(index.read_text())
        data["weight_map"] = {k.removeprefix(PREFIX): v for k, v in data["weight_map"].items()}
        index.write_text(json.dumps(data, indent=2))


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)
