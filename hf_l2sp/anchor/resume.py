"""What a checkpoint needs so that resuming never re-anchors: the anchor itself and a completion marker.

Each checkpoint folder gets `sp_anchor.safetensors` (w0, fp32, canonical names, with its fingerprint in the
metadata) and, written last, `sp_checkpoint_complete.json`. A folder without the marker was interrupted while
being written (e.g. SIGKILL) and is never resumed from.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from ..utils.files import replacing, write_text_atomically
from .reference import Reference

ANCHOR_FILE = "sp_anchor.safetensors"
COMPLETE_MARKER = "sp_checkpoint_complete.json"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def save_anchor(reference: Reference, folder: str | os.PathLike, tensors: dict[str, Tensor] | None = None) -> None:
    """Write w0 to `folder`; `tensors` are the full anchors when the reference holds FSDP2 shards."""
    tensors = reference.tensors if tensors is None else tensors
    with replacing(Path(folder) / ANCHOR_FILE) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp),
                  metadata={"fingerprint": reference.fingerprint(), "source": reference.source})


def mark_complete(folder: str | os.PathLike, step: int) -> None:
    write_text_atomically(Path(folder) / COMPLETE_MARKER, json.dumps({"global_step": step}))


def is_complete(folder: str | os.PathLike) -> bool:
    return (Path(folder) / COMPLETE_MARKER).is_file()


def last_complete_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The highest-step `checkpoint-N` folder whose writing finished (interrupted ones are skipped)."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return None
    steps = [(int(m.group(1)), p) for p in folder.iterdir() if p.is_dir() and (m := _CHECKPOINT.match(p.name))]
    for _, path in sorted(steps, reverse=True):
        if is_complete(path):
            return str(path)
    return None


def load_anchor(folder: str | os.PathLike, device=None) -> Reference:
    path = Path(folder) / ANCHOR_FILE
    with safe_open(str(path), framework="pt", device="cpu") as handle:
        metadata = handle.metadata() or {}
        tensors = {k: handle.get_tensor(k).to(device) for k in handle.keys()}
    reference = Reference(tensors, metadata.get("source", f"anchor stored in {Path(folder).name}"))
    if metadata.get("fingerprint") and reference.fingerprint() != metadata["fingerprint"]:
        raise ValueError(f"The anchor stored in {str(folder)!r} is corrupt (its fingerprint does not match its "
                         "content); resume from an earlier checkpoint.")
    return reference


def compare_anchors(stored: Reference, current: Reference) -> list[str]:
    """Human-readable differences between two anchors (names, shapes, values), at most a few of each."""
    problems = []
    missing = sorted(set(stored.tensors) - set(current.tensors))
    extra = sorted(set(current.tensors) - set(stored.tensors))
    if missing:
        problems.append(f"in the checkpoint but not the model: {', '.join(missing[:5])}")
    if extra:
        problems.append(f"in the model but not the checkpoint: {', '.join(extra[:5])}")
    shapes = [f"{k}: checkpoint {tuple(stored.tensors[k].shape)} vs model {tuple(current.tensors[k].shape)}"
              for k in sorted(set(stored.tensors) & set(current.tensors))
              if stored.tensors[k].shape != current.tensors[k].shape]
    if shapes:
        problems.append(f"shape mismatches: {', '.join(shapes[:5])}")
    return problems
