"""Fisher-diagonal files: safetensors keyed by checkpoint parameter name, with provenance in the metadata."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from ..utils.files import replacing
from ..utils.hub import is_hub_id
from ..utils.text import first_few
from ..utils.errors import ConfigError, MissingFileError

FISHER_FILENAME = "fisher.safetensors"


#: Relative size of a negative entry that is float round-off rather than a wrong Fisher (fp32 sums of products).
ROUND_OFF = 1e-6


@dataclass
class FisherDiagonal:
    """F_j per parameter, keyed like checkpoints (no wrapper or base-model prefix), plus string metadata."""

    tensors: dict[str, Tensor]
    metadata: dict[str, str] = field(default_factory=dict)
    source: str = "in memory"

    def __post_init__(self):
        bad = [k for k, t in self.tensors.items() if not bool(torch.isfinite(t).all())]
        if bad:
            raise ConfigError(f"Fisher diagonal from {self.source} has NaN/inf entries in: {first_few(bad)}.")
        # A mean of squares cannot be negative. Entries below zero by no more than float round-off of the largest
        # entry (files written before the estimator clamped its expanded squares) are set to 0; others are refused.
        largest = max((float(t.abs().max()) for t in self.tensors.values() if t.numel()), default=0.0)
        tolerance = ROUND_OFF * largest
        negative = [k for k, t in self.tensors.items() if bool((t < -tolerance).any())]
        if negative:
            raise ConfigError(f"Fisher diagonal from {self.source} has negative entries in: {first_few(negative)}; "
                              "a Fisher diagonal is a mean of squares and cannot be negative.")
        self.tensors = {k: t.clamp(min=0) if bool((t < 0).any()) else t for k, t in self.tensors.items()}

    def aligned_to(self, keys: list[str], shapes: list[torch.Size], device=None) -> list[Tensor]:
        """The Fisher tensors in the order of `keys` (fp32, on `device`); raises on a missing key or wrong shape."""
        missing = [k for k in keys if k not in self.tensors]
        wrong = [f"{k}: Fisher {tuple(self.tensors[k].shape)} vs model {tuple(s)}"
                 for k, s in zip(keys, shapes) if k in self.tensors and tuple(self.tensors[k].shape) != tuple(s)]
        if missing or wrong:
            parts = []
            if missing:
                parts.append(f"no entry for {first_few(missing)}")
            if wrong:
                parts.append(f"shape mismatches {first_few(wrong)}")
            model_id = self.metadata.get("source_model", "an unknown model")
            raise ConfigError(f"Fisher file {self.source} (estimated for {model_id}) does not match the model: "
                              + "; ".join(parts) + ". Estimate the Fisher for this architecture.")
        return [self.tensors[k].to(device=device, dtype=torch.float32) for k in keys]


def save_fisher(fisher: FisherDiagonal, path: str | os.PathLike) -> Path:
    """Write `fisher` as safetensors (contiguous fp32) with its metadata; returns the path written."""
    path = Path(path)
    if path.suffix != ".safetensors":
        path = path / FISHER_FILENAME
    path.parent.mkdir(parents=True, exist_ok=True)
    with replacing(path) as tmp:  # never a half-written file under the final name
        save_file({k: v.detach().float().cpu().contiguous() for k, v in fisher.tensors.items()}, str(tmp),
                  metadata={k: str(v) for k, v in fisher.metadata.items()})
    return path


def load_fisher(path_or_repo: str | os.PathLike, revision: str | None = None) -> FisherDiagonal:
    """Read a Fisher file from a path, a folder holding `fisher.safetensors`, or a Hub repo holding it."""
    path = Path(path_or_repo)
    if path.is_dir():
        path = path / FISHER_FILENAME
    if not path.is_file():
        if not is_hub_id(path_or_repo):
            raise MissingFileError(f"Fisher file {str(path_or_repo)!r} does not exist.")
        path = _download(str(path_or_repo), revision)
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    except SafetensorError as err:
        raise ConfigError(f"Fisher file {str(path)!r} is not a readable safetensors file ({err}); write it with "
                          "`hf-l2sp fisher` or `save_fisher`.") from err
    if not tensors:
        raise ConfigError(f"Fisher file {str(path)!r} holds no tensors.")
    return FisherDiagonal(tensors, metadata, source=str(path_or_repo))


def _download(repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo_id, FISHER_FILENAME, revision=revision))
    except Exception as err:  # offline, missing repo, missing file: all end the same way for the user
        raise MissingFileError(
            f"sp_fisher {repo_id!r} is not a local file or folder, and {FISHER_FILENAME} could not be fetched from "
            f"the Hub repo of that name ({type(err).__name__}). With HF_HUB_OFFLINE=1 only cached repos work."
        ) from err
