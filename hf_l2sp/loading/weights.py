"""Reading a state dict from a weights file, a checkpoint folder (sharded or not) or a Hub repo."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from ..utils.hub import download_snapshot, is_hub_id
from ..utils.errors import ConfigError, MissingFileError

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_model.safetensors")
INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def read_state_dict(path_or_repo: str, revision: str | None = None, what: str = "weights") -> dict[str, Tensor]:
    """A weights file, a folder holding one, or a Hub repo id ('owner/name'); `what` names it in errors."""
    path = Path(path_or_repo)
    if path.is_file():
        return read_weights_file(path)
    if path.is_dir():
        return read_weights_folder(path)
    if not is_hub_id(path_or_repo):
        raise MissingFileError(f"{what} {path_or_repo!r} is neither a file, a folder nor a Hub repo id.")
    return read_weights_folder(download_snapshot(path_or_repo, f"{what} {path_or_repo!r}", revision))


def read_weights_file(path: Path) -> dict[str, Tensor]:
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except SafetensorError as err:
            raise ConfigError(f"Weights file {str(path)!r} is not a readable safetensors file ({err}).") from err
    if path.suffix in (".bin", ".pt", ".pth"):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except (RuntimeError, EOFError, pickle.UnpicklingError) as err:
            raise ConfigError(f"Weights file {str(path)!r} is not a readable torch checkpoint ({err}).") from err
        return state.get("state_dict", state) if isinstance(state, dict) else state
    raise ConfigError(f"Unsupported weights file {path.name!r}; expected .safetensors, .bin, .pt or .pth.")


def weight_files(folder: Path) -> list[Path]:
    """The weights files of a checkpoint folder: its shards (through the index) or its single weights file; []
    when it holds none."""
    for index_name in INDEX_FILES:
        index = folder / index_name
        if index.is_file():
            return [folder / shard for shard in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    return next(([folder / name] for name in WEIGHT_FILES if (folder / name).is_file()), [])


def read_weights_folder(folder: Path) -> dict[str, Tensor]:
    """Every tensor of a checkpoint folder: its shards (through the index) or its single weights file."""
    files = weight_files(folder)
    if not files:
        raise MissingFileError(f"No weights file ({', '.join(WEIGHT_FILES)}) in {str(folder)!r}.")
    state = {}
    for path in files:
        state.update(read_weights_file(path))
    return state
