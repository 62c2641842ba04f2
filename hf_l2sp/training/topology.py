"""Which accelerate topologies keep the anchor right, and a clear refusal for the others.

Supported: one process, DDP (one node or many; parameters are replicated, every rank computes the same Omega and
DDP averages identical gradients), FSDP2 (parameters are DTensor shards; each rank keeps its shard of w0 and the
penalty runs on local shards), DeepSpeed ZeRO-1/2 (replicated parameters). Refused: DeepSpeed ZeRO-3 (parameters
are partitioned and gathered only inside forward, so a penalty on them sees empty tensors) and FSDP1 (flattened
parameters).
"""

from __future__ import annotations

from accelerate.utils import DistributedType

from ..utils.errors import UserError


class UnsupportedTopologyError(UserError, NotImplementedError):
    pass


def check_supported(accelerator) -> None:
    state = accelerator.state
    kind = state.distributed_type
    if kind == DistributedType.DEEPSPEED:
        stage = getattr(getattr(state, "deepspeed_plugin", None), "zero_stage", None)
        if stage == 3:
            raise UnsupportedTopologyError(
                "DeepSpeed ZeRO-3 partitions the parameters outside forward, so the SP penalty cannot see them. "
                "Use ZeRO-1/2 (accelerate config 'zero2') or FSDP2 (accelerate config 'fsdp2') instead.")
    if kind == DistributedType.FSDP:
        version = getattr(getattr(state, "fsdp_plugin", None), "fsdp_version", 1)
        if version != 2:
            raise UnsupportedTopologyError(
                "FSDP1 flattens parameters, which breaks the name-by-name anchor. Use FSDP2 "
                "(fsdp_version: 2, accelerate config 'fsdp2') or DDP ('multi_gpu').")
