"""Writing a TimmWrapper folder that loads everywhere: timm (`local-dir:` / `hf-hub:`), transformers, the pipeline.

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

from ..loading.models import is_timm_wrapper
from ..utils.files import jsonable, replacing

PREFIX = "timm_model."


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
    config.pretrained_cfg = jsonable(cfg)


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
        with replacing(path) as tmp:
            save_file(tensors, str(tmp), metadata=metadata)
        renamed_any = True
    if index.is_file() and renamed_any:
        data = json.loads(index.read_text())
        data["weight_map"] = {k.removeprefix(PREFIX): v for k, v in data["weight_map"].items()}
        index.write_text(json.dumps(data, indent=2))
