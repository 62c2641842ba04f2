"""Which accelerate topologies keep the anchor right, and a clear refusal for the others.

Supported: one process, DDP (one node or many; parameters are replicated, every rank computes the same Omega and
DDP averages identical gradients), FSDP2 (parameters are DTensor shards; each rank keeps its shard of w0 and the
penalty runs on local shards), DeepSpeed ZeRO-1/2 (replicated parameters) and ZeRO-3 (the penalty on each rank's
partitions, `training/zero3.py`). Refused: FSDP1 (flattened parameters).
"""

from __future__ import annotations

import logging
import os

from accelerate.utils import DistributedType

from ..utils.errors import UserError


logger = logging.getLogger(__name__)


class UnsupportedTopologyError(UserError, NotImplementedError):
    pass


def check_supported(accelerator) -> None:
    state = accelerator.state
    kind = state.distributed_type
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and state.num_processes == 1:
        raise UnsupportedTopologyError(
            f"{launched} processes were launched but accelerate runs each of them alone (distributed type "
            f"{kind.value}), so each would train on its own and write the same files. On a machine without a GPU "
            "pass use_cpu=True (--use_cpu true).")
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and kind != DistributedType.FSDP:
        logger.warning("hf_l2sp: the accelerate config asks for FSDP, but accelerate runs %s (it shards only on "
                       "GPU-class devices): the parameters and w0 are replicated on every process.", kind.value)
    if kind == DistributedType.FSDP:
        version = getattr(getattr(state, "fsdp_plugin", None), "fsdp_version", 1)
        if version != 2:
            raise UnsupportedTopologyError(
                "FSDP1 flattens parameters, which breaks the name-by-name anchor. Use FSDP2 "
                "(fsdp_version: 2, accelerate config 'fsdp2') or DDP ('multi_gpu').")
