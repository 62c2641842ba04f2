"""What a resume keeps of the optimizer, the scheduler and DeepSpeed's partitions, said before training starts.

`Trainer` resumes the weights from any checkpoint it can read, and the optimizer and scheduler only where their files
are there: a DeepSpeed checkpoint resumed without DeepSpeed starts a fresh optimizer, silently, and DeepSpeed itself
refuses its partitions at another number of processes only once training starts. Both are said here, in one line.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from ..utils.errors import ConfigError

logger = logging.getLogger("hf_l2sp")
#: DeepSpeed's per-rank optimizer partitions inside a checkpoint's global_step folder.
_OPTIMIZER_PARTITION = re.compile(r"zero_pp_rank_(\d+)_mp_rank_\d+_optim_states\.pt$")


def deepspeed_step_folder(checkpoint: str | Path) -> Path | None:
    folders = sorted(Path(checkpoint).glob("global_step*"))
    return folders[-1] if folders else None


def deepspeed_world_size(checkpoint: str | Path) -> int | None:
    """How many data-parallel processes saved a DeepSpeed ZeRO checkpoint (its optimizer partitions), or None."""
    step = deepspeed_step_folder(checkpoint)
    if step is None:
        return None
    ranks = {m.group(1) for p in step.iterdir() if (m := _OPTIMIZER_PARTITION.search(p.name))}
    return len(ranks) or None


def check_deepspeed_world_size(checkpoint: str | Path, world: int) -> None:
    """Refuse, before training, a ZeRO checkpoint saved by another number of processes (DeepSpeed cannot load it)."""
    saved = deepspeed_world_size(checkpoint)
    if saved is not None and saved != world:
        step = deepspeed_step_folder(checkpoint)
        raise ConfigError(
            f"Cannot resume from {str(checkpoint)!r} on {world} process(es): DeepSpeed saved its ZeRO partitions from "
            f"{saved}, and it loads them only at the same number. Resume with {saved} processes, or convert the "
            f"checkpoint to DeepSpeed's universal format (python -m deepspeed.checkpoint.ds_to_universal "
            f"--input_folder {step} --output_folder {step}_universal), put that folder in place of {step.name} and "
            "set checkpoint.load_universal: true in the DeepSpeed config.")


def warn_dropped_state(checkpoint: str | Path, deepspeed: bool) -> None:
    """One WARNING when resuming from `checkpoint` leaves the optimizer's or the scheduler's state behind."""
    folder = Path(checkpoint)
    if deepspeed:
        return  # DeepSpeed loads its own states from global_step*, or stops
    names = [p.name for p in folder.iterdir()]
    missing = []
    if not any(name.startswith("optimizer") for name in names):
        where = (f" (its optimizer state is DeepSpeed's, in {deepspeed_step_folder(folder).name}/, which only "
                 "DeepSpeed reads)" if deepspeed_step_folder(folder) else "")
        missing.append(f"the optimizer's state{where}")
    if "scheduler.pt" not in names:
        missing.append("the scheduler's state")
    if missing:
        logger.warning("hf_l2sp: resuming from %s without %s: training goes on from its weights with a fresh "
                       "%s, so the result differs from the uninterrupted run's.", folder, " and ".join(missing),
                       "optimizer and scheduler" if len(missing) == 2 else
                       "optimizer" if "optimizer" in missing[0] else "scheduler")
