"""Which tensors of a model are new: the paper's S-bar.

S are the tensors with a pretrained counterpart (same name, same shape) in the checkpoint the model came from; the
rest are new and get beta, never an anchor (anchoring a freshly initialised layer to its random init is wrong).
The checkpoint is found through `config._name_or_path` (a local folder, an embedded `hf_l2sp:` asset or a Hub repo
already in the local cache) and only its key list and shapes are read. The task head that fine-tuning
re-initialises (a classifier's `classifier` / `score` module, timm's `pretrained_cfg['classifier']`, or `sp_head`)
is new as well, even when its shape happens to match. Without a readable checkpoint, the head alone is new.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from ..utils.hub import public_name
from . import assets
from .model_parts import base_prefix, canonical_name, checkpoint_key, head_parameter_names, in_modules, saved_keys
from .model_parts import unwrap_model
from .weights import INDEX_FILES, WEIGHT_FILES, weight_files

logger = logging.getLogger(__name__)

#: Above this share of "new" trainable tensors the checkpoint does not line up with the model (renamed keys, or
#: another architecture): its key list is not trusted and only the head is new.
MAX_NEW_SHARE = 0.5


@dataclass
class NewTensors:
    """The new tensors of a model (canonical names) and how they were decided.

    head_modules: the task head's modules (detected or `sp_head`); from_checkpoint: tensors the source checkpoint
    lacks or holds with another shape; checkpoint: the checkpoint that was read (None: none was readable).
    """

    names: list[str]
    head_modules: list[str]
    from_checkpoint: list[str] = field(default_factory=list)
    checkpoint: str | None = None
    note: str | None = None  # set instead of the checkpoint rule (PEFT adapters)

    def describe(self) -> str:
        head = ", ".join(self.head_modules) or "none"
        if self.note:
            return f"task head: {head}; {self.note}"
        if self.checkpoint is None:
            return f"task head: {head} (no source checkpoint readable: its key list was not checked)"
        extra = sorted(set(self.from_checkpoint) - set(self.names_in_head))
        return (f"task head: {head}; absent from or reshaped against {public_name(self.checkpoint)}: "
                f"{', '.join(extra) if extra else 'nothing else'}")

    @property
    def names_in_head(self) -> list[str]:
        return [n for n in self.names if in_modules(n, self.head_modules)]


def find_new_tensors(model: nn.Module, head_modules: list[str]) -> NewTensors:
    """The paper's S-bar for `model`: the task head plus whatever its source checkpoint does not hold."""
    inner = unwrap_model(model)
    head = head_parameter_names(model, head_modules)
    source = getattr(getattr(inner, "config", None), "_name_or_path", None) or None
    shapes = checkpoint_shapes(source) if source else None
    if shapes is None:
        return NewTensors(sorted(head), head_modules)
    prefix = base_prefix(inner)
    shapes = {checkpoint_key(key, prefix): shape for key, shape in shapes.items()}
    keys = saved_keys(inner)  # the names the checkpoint uses (transformers may rename modules on load)
    params = {canonical_name(n): p for n, p in inner.named_parameters() if p.requires_grad}
    absent = sorted(name for name, p in params.items() if shapes.get(keys[name]) != tuple(p.shape))
    if params and len(absent) > MAX_NEW_SHARE * len(params):
        logger.warning("hf_l2sp: %d of %d trainable tensors of %s have no counterpart in %s: its keys do not line "
                       "up with the model (renamed keys or another architecture), so only the task head (%s) is "
                       "treated as new. Set sp_head (or sp_reference) if that is wrong.", len(absent), len(params),
                       type(inner).__name__, source, ", ".join(head_modules) or "none")
        return NewTensors(sorted(head), head_modules)
    return NewTensors(sorted(head | set(absent)), head_modules, absent, source)


def checkpoint_shapes(name_or_path: str) -> dict[str, tuple[int, ...]] | None:
    """Key -> shape of every tensor in the checkpoint `name_or_path` names, without reading the values; None when
    no checkpoint can be read without a download (in-memory model, Hub repo not cached)."""
    folder = _local_folder(name_or_path)
    if folder is None:
        return None
    try:
        return _folder_shapes(folder)
    except (OSError, ValueError, RuntimeError) as err:
        logger.info("hf_l2sp: could not read the key list of %s (%s)", name_or_path, err)
        return None


def _local_folder(name_or_path: str) -> Path | None:
    name = name_or_path.removeprefix("hf-hub:").removeprefix("local-dir:")
    if name.startswith(assets.SCHEME):
        return Path(assets.resolve(name))
    if Path(name).is_dir():
        return Path(name)
    return _cached_hub_folder(name)


def _cached_hub_folder(repo_id: str) -> Path | None:
    """The cached snapshot folder of a Hub repo holding weights, never downloading."""
    from huggingface_hub import try_to_load_from_cache

    for filename in (*INDEX_FILES, *WEIGHT_FILES):
        try:
            found = try_to_load_from_cache(repo_id, filename)
        except ValueError:  # not a valid repo id
            return None
        if isinstance(found, str):
            return Path(found).parent
    return None


def _folder_shapes(folder: Path) -> dict[str, tuple[int, ...]] | None:
    files = weight_files(folder)
    if not files:
        return None
    shapes = {}
    for path in files:
        shapes.update(_file_shapes(path))
    return shapes


def _file_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    if path.suffix == ".safetensors":
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    state = state.get("state_dict", state)
    return {key: tuple(value.shape) for key, value in state.items() if hasattr(value, "shape")}
