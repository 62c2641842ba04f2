"""Bytes of the anchor w0 each process holds under FSDP2, against the full copy every DDP process holds.

    python -m torch.distributed.run --standalone --nproc_per_node 2 benchmarks/anchor_sharding.py [--model resnet50]

SPTrainer is built (and anchored) on the plain model; then `fully_shard` swaps the parameters of the same module
object for DTensor shards, as accelerate's FSDP2 `prepare` does (accelerate runs FSDP2 on GPUs only, so this CPU
script shards the model itself, with gloo); one training step resolves the penalty on the shards. Prints, per rank,
the anchor bytes before and after the step.
"""

from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from datasets import Dataset  # noqa: E402
from torch import nn  # noqa: E402
from torch.distributed.fsdp import fully_shard  # noqa: E402
from transformers import TimmWrapperConfig, TimmWrapperForImageClassification  # noqa: E402

from hf_l2sp import SPConfig, SPTrainer  # noqa: E402


class ShardInPlace(SPTrainer):
    """fully_shard every conv/linear and the root after SPTrainer anchored the model, before the optimizer."""

    def create_optimizer(self, *args, **kwargs):
        for module in list(self.model.modules())[1:]:
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                fully_shard(module)
        fully_shard(self.model)
        return super().create_optimizer(*args, **kwargs)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--image_size", type=int, default=64)
    cli = parser.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"):  # Trainer runs one process per rank
        os.environ.pop(var, None)
    torch.manual_seed(0)
    model = TimmWrapperForImageClassification(TimmWrapperConfig(architecture=cli.model, num_labels=10))
    rng = np.random.default_rng(rank)
    data = Dataset.from_dict({"pixel_values": rng.standard_normal((2, 3, cli.image_size, cli.image_size))
                              .astype("float32"), "labels": np.arange(2)}).with_format("torch")
    args = SPConfig(output_dir=f"/tmp/anchor_sharding_{rank}", use_cpu=True, report_to="none", save_strategy="no",
                    max_steps=1, per_device_train_batch_size=2, optim="sgd", disable_tqdm=True,
                    dataloader_num_workers=0, sp_include="all")
    trainer = ShardInPlace(model=model, args=args, train_dataset=data)
    before = trainer.sp_reference.local_bytes()
    trainer.train()
    after = trainer.sp_reference.local_bytes()
    sizes = [None] * world
    dist.all_gather_object(sizes, (rank, before, after))
    if rank == 0:
        mib = 2 ** 20
        print(f"{cli.model}, {world} processes, {trainer.sp_reference.num_parameters() / 1e6:.2f} M anchored values")
        print("| rank | w0 held before sharding (MiB) | w0 held under FSDP2 (MiB) | fraction of the full copy |")
        print("| --- | --- | --- | --- |")
        for r, b, a in sizes:
            print(f"| {r} | {b / mib:.1f} | {a / mib:.1f} | {a / b:.3f} |")
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)  # gloo's thread teardown after fully_shard can abort at interpreter exit


if __name__ == "__main__":
    main()
