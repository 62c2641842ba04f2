"""Which tensors of a model are new: the paper's S-bar.

S are the tensors whose values came from the checkpoint the model was loaded from: under any of their names (tied
aliases), through transformers' own load-time conversions (fused experts), with the same shape
(`checkpoint_layout`). The rest are new and get beta, never an anchor (anchoring a freshly initialised layer to its
random init is wrong). A vocabulary grown with `resize_token_embeddings` is both: its first V rows (the
checkpoint's) are anchored and the rows added after them are new.
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
from .checkpoint_layout import parameter_layouts
from .model_parts import base_prefix, checkpoint_key, head_parameter_names, in_modules, unwrap_model
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
    #: Resized tensors: name -> V, the rows [0, V) the checkpoint holds (anchored); rows V onwards are new.
    resized: dict[str, int] = field(default_factory=dict)
    #: Tensors with pretrained values that are treated as new all the same (the task head, when it was saved).
    pretrained_but_new: list[str] = field(default_factory=list)
    #: Tensors transformers builds from other checkpoint tensors on load (fused experts, fused qkv).
    converted: list[str] = field(default_factory=list)

    def describe(self) -> str:
        head = ", ".join(self.head_modules) or "none"
        if self.note:
            return f"task head: {head}; {self.note}"
        if self.checkpoint is None:
            return f"task head: {head} (no source checkpoint readable: its key list was not checked)"
        extra = sorted(set(self.from_checkpoint) - set(self.names_in_head))
        text = (f"task head: {head}; absent from or reshaped against {public_name(self.checkpoint)}: "
                f"{', '.join(extra) if extra else 'nothing else'}")
        if self.resized:
            text += "; resized (first rows anchored, added rows new): " + ", ".join(
                f"{name} rows [0, {rows})" for name, rows in sorted(self.resized.items()))
        return text

    @property
    def names_in_head(self) -> list[str]:
        return [n for n in self.names if in_modules(n, self.head_modules)]


def find_new_tensors(model: nn.Module, head_modules: list[str]) -> NewTensors:
    """The paper's S-bar for `model`: the task head plus whatever its source checkpoint does not hold."""
    inner = unwrap_model(model)
    head = head_parameter_names(model, head_modules)
    source, shapes = _source_checkpoint(inner)
    if shapes is None:
        return NewTensors(sorted(head), head_modules)
    layouts = {name: layout for name, layout in parameter_layouts(inner).items() if layout.parameter.requires_grad}
    absent, resized = [], {}
    for name, layout in layouts.items():
        if layout.found_in(shapes) is not None:
            continue
        rows = layout.resized_rows(shapes)
        if rows is not None and name not in head:
            resized[name] = rows
        else:
            absent.append(name)
    absent.sort()
    if layouts and len(absent) > MAX_NEW_SHARE * len(layouts):
        logger.warning("hf_l2sp: %d of %d trainable tensors of %s have no counterpart in %s: its keys do not line "
                       "up with the model (renamed keys or another architecture), so only the task head (%s) is "
                       "treated as new. Set sp_head (or sp_reference) if that is wrong.", len(absent), len(layouts),
                       type(inner).__name__, source, ", ".join(head_modules) or "none")
        return NewTensors(sorted(head), head_modules)
    saved_head = sorted(name for name in head if name in layouts and name not in absent)
    return NewTensors(sorted(head | set(absent)), head_modules, absent, source, resized=resized,
                      pretrained_but_new=saved_head,
                      converted=sorted(name for name, layout in layouts.items() if layout.converted))


def resized_tensors(model: nn.Module, names) -> dict[str, int]:
    """name -> V for each of `names` whose source checkpoint holds its first V rows only (see `NewTensors`)."""
    inner = unwrap_model(model)
    _, shapes = _source_checkpoint(inner)
    if shapes is None:
        return {}
    layouts = parameter_layouts(inner)
    out = {}
    for name in names:
        layout = layouts.get(name)
        if layout is not None and layout.found_in(shapes) is None and (rows := layout.resized_rows(shapes)):
            out[name] = rows
    return out


def _source_checkpoint(inner: nn.Module) -> tuple[str | None, dict[str, tuple[int, ...]] | None]:
    """The model's source (`config._name_or_path`) and its checkpoint's key -> shape (keys in `checkpoint_key`
    form), or None when it cannot be read without a download."""
    source = getattr(getattr(inner, "config", None), "_name_or_path", None) or None
    shapes = checkpoint_shapes(source) if source else None
    if shapes is None:
        return source, None
    prefix = base_prefix(inner)
    return source, {checkpoint_key(key, prefix): shape for key, shape in shapes.items()}


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
