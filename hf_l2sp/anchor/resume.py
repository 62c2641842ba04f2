"""What a checkpoint needs so that resuming never re-anchors: the anchor itself and a completion marker.

Each checkpoint folder gets `sp_anchor.safetensors` (w0 in its stored dtype, canonical names, with its fingerprint in
the metadata) and, written last, `sp_checkpoint_complete.json`. A folder without the marker was interrupted while
being written (e.g. SIGKILL) and is never resumed from.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..loading.checkpoint_layout import ParameterLayout
from ..loading.model_parts import checkpoint_key
from ..loading.weights import weight_files
from ..utils.errors import CheckpointNotFoundError, ConfigError
from ..utils.files import replacing, write_text_atomically
from .fisher_io import FisherDiagonal, load_fisher
from .parameters import anchored_rows, is_sharded
from .reference import Reference

logger = logging.getLogger(__name__)

ANCHOR_FILE = "sp_anchor.safetensors"
COMPLETE_MARKER = "sp_checkpoint_complete.json"
_CHECKPOINT = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")  # Trainer's own folder names


def save_anchor(reference: Reference, folder: str | os.PathLike, tensors: dict[str, Tensor] | None = None) -> None:
    """Write w0 to `folder`; `tensors` are the full anchors when the reference holds FSDP2 shards."""
    tensors = reference.tensors if tensors is None else tensors
    with replacing(Path(folder) / ANCHOR_FILE) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp),
                  metadata={"fingerprint": reference.fingerprint(), "source": reference.source,
                            **({"base_model": reference.base_model} if reference.base_model else {}),
                            **({"new_tensors": reference.new_description} if reference.new_description else {})})


def mark_complete(folder: str | os.PathLike, step: int) -> None:
    write_text_atomically(Path(folder) / COMPLETE_MARKER, json.dumps({"global_step": step}))


def is_complete(folder: str | os.PathLike) -> bool:
    return (Path(folder) / COMPLETE_MARKER).is_file()


def last_complete_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The highest-step `checkpoint-N` folder that can be resumed from: written completely by SPTrainer, or a plain
    Trainer's (`checkpoint_kind`); interrupted ones are skipped."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return None
    steps = [(int(m.group(1)), p) for p in folder.iterdir() if p.is_dir() and (m := _CHECKPOINT.match(p.name))]
    for _, path in sorted(steps, reverse=True):
        if checkpoint_kind(path) != "interrupted":
            return str(path)
    return None


def load_anchor(folder: str | os.PathLike, device=None) -> Reference:
    path = Path(folder) / ANCHOR_FILE
    with safe_open(str(path), framework="pt", device="cpu") as handle:
        metadata = handle.metadata() or {}
        tensors = {k: handle.get_tensor(k).to(device) for k in handle.keys()}
    reference = Reference(tensors, metadata.get("source", f"anchor stored in {Path(folder).name}"),
                          base_model=metadata.get("base_model"), new_description=metadata.get("new_tensors"))
    if metadata.get("fingerprint") and reference.fingerprint() != metadata["fingerprint"]:
        raise ConfigError(f"The anchor stored in {str(folder)!r} is corrupt (its fingerprint does not match its "
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
    shapes = [f"{k}: checkpoint {stored.shape_of(k)} vs model {current.shape_of(k)}"
              for k in sorted(set(stored.tensors) & set(current.tensors)) if stored.shape_of(k) != current.shape_of(k)]
    if shapes:
        problems.append(f"shape mismatches: {', '.join(shapes[:5])}")
    return problems


def checkpoint_kind(folder: str | os.PathLike) -> str:
    """'sp': completely written by SPTrainer (its marker is written last); 'trainer': Trainer's files without
    SPTrainer's (a plain Trainer's checkpoint, resumable); 'interrupted': neither (SPTrainer writes its anchor first,
    so an anchor without the marker is an interrupted save)."""
    folder = Path(folder)
    if is_complete(folder):
        return "sp"
    if not (folder / ANCHOR_FILE).is_file() and (folder / TRAINER_STATE_NAME).is_file():
        return "trainer"
    return "interrupted"


def anchor_to_resume(checkpoint: str, current: Reference, device, *, fixed: bool, description: str,
                     layouts: dict[str, ParameterLayout], prefix: str, active: bool,
                     recover: Callable[[str], Reference | None]) -> Reference:
    """The anchor a run resumed from `checkpoint` keeps, given the one built now (`current`, whose new-tensor names
    it keeps). Never re-anchors on the fine-tuned weights:

    - an SPTrainer checkpoint: its stored w0 (fingerprint verified), whatever the model given holds (Trainer loads
      the checkpoint's weights into any model of the same shape). `fixed` (sp_reference or a given Reference): a
      different stored anchor is an error.
    - a plain Trainer checkpoint (no anchor): `current`, unless the model holds the checkpoint's own weights; then
      w0 comes from the source the model names (`recover`), or the resume is refused in one line.
    Nothing is refused for the anchor's sake when no penalty acts (`active` False). `layouts` and `prefix` read the
    checkpoint's weights (`parameter_layouts`, the base-model prefix).
    """
    if not Path(checkpoint).is_dir():
        raise CheckpointNotFoundError(f"Can't find a valid checkpoint at {checkpoint}: no such folder.")
    kind = checkpoint_kind(checkpoint)
    if kind == "interrupted":
        last = last_complete_checkpoint(Path(checkpoint).parent)
        raise ConfigError(f"Checkpoint {checkpoint!r} was not completely written (interrupted while saving?); "
                          f"it cannot be resumed from. Last complete checkpoint: {last or 'none'}.")
    if kind == "trainer":
        return _anchor_without_stored_one(checkpoint, current, fixed, layouts, prefix, active, recover)
    stored = load_anchor(checkpoint, device)
    problems = compare_anchors(stored, current)
    if not active:  # the anchor only feeds the distance log
        return current if problems else _keeping_new_names(stored, current)
    if problems:
        raise ConfigError(f"Cannot resume from {checkpoint!r}: the model does not match the anchor stored there ("
                          + "; ".join(problems) + "). Resume with the model and regularizer the run started with.")
    if stored.fingerprint() != current.fingerprint():
        if fixed:
            raise ConfigError(f"Cannot resume from {checkpoint!r}: its anchor w0 differs from the one given now "
                              f"({description}). Resuming must keep the anchor the run started "
                              "with; remove sp_reference or point it at the original checkpoint.")
        if holds_checkpoint_weights(checkpoint, current, layouts, prefix):
            logger.info("hf_l2sp: the model holds %s's weights; the anchor is the stored w0 (resuming never "
                        "re-anchors).", checkpoint)
        elif not any(f.suffix == ".safetensors" for f in weight_files(Path(checkpoint))):  # nothing to compare
            logger.info("hf_l2sp: %s holds no safetensors weights to compare the model with; the anchor is the "
                        "stored w0.", checkpoint)
        else:
            logger.warning("hf_l2sp: the model given holds neither the run's w0 nor %s's weights; Trainer loads the "
                           "checkpoint's weights into it and the anchor is the w0 stored there.", checkpoint)
    return _keeping_new_names(stored, current)


def _keeping_new_names(stored: Reference, current: Reference) -> Reference:
    stored.head_names = current.head_names
    return stored


def _anchor_without_stored_one(checkpoint, current, fixed, layouts, prefix, active, recover) -> Reference:
    """A plain Trainer checkpoint: the anchor built now, unless that is the checkpoint's own (fine-tuned) weights."""
    if fixed or not holds_checkpoint_weights(checkpoint, current, layouts, prefix):
        logger.warning("hf_l2sp: %s holds no anchor (a plain Trainer checkpoint); the anchor is %s.", checkpoint,
                       current.source)
        return current
    source = current.base_model
    same = source is not None and Path(source).resolve() == Path(checkpoint).resolve()
    recovered = None if source is None or same else recover(source)
    if recovered is not None:
        logger.warning("hf_l2sp: %s holds no anchor (a plain Trainer checkpoint) and the model given holds its "
                       "fine-tuned weights; the anchor is read from %s, the source the model names.", checkpoint,
                       source)
        return _keeping_new_names(recovered, current)
    if not active:
        return current
    raise ConfigError(f"Cannot resume from {checkpoint!r}: it holds no anchor (a plain Trainer checkpoint), the model "
                      f"given holds its fine-tuned weights, and no pretrained source can be read "
                      f"({source or 'the model names none'}). Set sp_reference to the checkpoint the run started "
                      "from.")


def check_fisher_unchanged(checkpoint: str, fisher: FisherDiagonal | None, given: str | None) -> None:
    """Resuming must use the Fisher diagonal the run used (stored in the checkpoint)."""
    stored = Path(checkpoint) / "fisher.safetensors"
    if fisher is None or not stored.is_file():
        return
    saved = load_fisher(str(stored))
    if saved.tensors.keys() != fisher.tensors.keys() or any(
            not torch.equal(saved.tensors[k], fisher.tensors[k].cpu()) for k in saved.tensors):
        raise ConfigError(f"Cannot resume from {checkpoint!r}: the Fisher diagonal given now ({given})"
                          " differs from the one the run used (stored in the checkpoint).")


def restore_converted_weights(checkpoint: str, model, prefix: str) -> list[str]:
    """Load into `model` the tensors transformers renames or converts on load (a mixture of experts' fused experts
    and its renamed router) from a checkpoint's safetensors files, through the same conversion. transformers'
    Trainer resumes weights with a plain `load_state_dict` under the saved names, which leaves these tensors as they
    were (it warns "missing keys"). Returns the names restored; FSDP2 shards and other formats are left to Trainer."""
    from ..loading.checkpoint_layout import parameter_layouts

    layouts = {n: layout for n, layout in parameter_layouts(model).items()
               if layout.converted or any(checkpoint_key(n, prefix) not in form for form in layout.forms)}
    files = [f for f in weight_files(Path(checkpoint)) if f.suffix == ".safetensors"]
    if not layouts or not files or any(is_sharded(layout.parameter) for layout in layouts.values()):
        return []
    restored = []
    with contextlib.ExitStack() as stack:
        handles = [stack.enter_context(safe_open(str(path), framework="pt", device="cpu")) for path in files]
        where = {checkpoint_key(key, prefix): (handle, key) for handle in handles for key in handle.keys()}
        shapes = {key: tuple(handle.get_slice(raw).get_shape()) for key, (handle, raw) in where.items()}
        with torch.no_grad():
            for name, layout in layouts.items():
                form = layout.found_in(shapes)
                if form is None:
                    continue
                pieces = {key: where[key][0].get_tensor(where[key][1]) for key in form}
                layout.parameter.copy_(layout.assemble(form, pieces))
                restored.append(name)
    if restored:
        logger.warning("hf_l2sp: restored %d tensors that transformers renames or fuses on load (%s, ...) from %s; "
                       "Trainer's 'missing keys' message above is about these.", len(restored), restored[0],
                       checkpoint)
    return restored


def holds_checkpoint_weights(checkpoint: str, current: Reference, layouts: dict[str, ParameterLayout],
                             prefix: str) -> bool:
    """True when every tensor of `current` (the model's weights at construction) equals the checkpoint's saved
    weight: read through transformers' renaming and conversion (`layouts`, from `parameter_layouts`), tensor by
    tensor from the safetensors files (a fused tensor from its pieces); False when there are none."""
    files = [f for f in weight_files(Path(checkpoint)) if f.suffix == ".safetensors"]
    if not files:
        return False
    with contextlib.ExitStack() as stack:
        handles = [stack.enter_context(safe_open(str(path), framework="pt", device="cpu")) for path in files]
        where = {checkpoint_key(key, prefix): (handle, key) for handle in handles for key in handle.keys()}
        shapes = {key: tuple(handle.get_slice(raw).get_shape()) for key, (handle, raw) in where.items()}
        for name, ours in current.tensors.items():
            layout = layouts.get(name)
            form = layout.found_in(shapes) if layout is not None else None
            if form is None:
                return False
            pieces = {key: where[key][0].get_tensor(where[key][1]) for key in form}
            saved = layout.assemble(form, pieces)
            part = current.partitions.get(name)
            if part is not None:  # DeepSpeed ZeRO-3: this rank holds a flat part; compare it with the same part
                if tuple(saved.shape) != tuple(part.shape):
                    return False
                saved = saved.reshape(-1)[part.start: part.start + part.held]
            elif anchored_rows(ours, saved) not in (None, False):  # a resized tensor: its anchor is the first rows
                saved = saved[: ours.shape[0]]
            if saved.shape != ours.shape or not torch.equal(saved.to(ours.dtype), ours.detach().cpu()):
                return False
    return True
