"""What L2-SP costs under DeepSpeed ZeRO-3: the anchor bytes each rank holds, and the step time against 'none'.

    DS_ACCELERATOR=cpu python benchmarks/zero3_cost.py [--processes 2] [--rounds 8] [--steps 4] [--hidden 256]

Launches itself under `accelerate launch` with a ZeRO-3 config (fp32, on the CPU without a GPU). The model is a
Llama-shaped causal LM saved as a checkpoint and loaded as a user loads it (partitioned as it loads). Rounds
alternate a `none` and an `l2_sp` trainer on the same data; each round's ratio is the l2_sp trainer's median step
time over the none trainer's (first step of each dropped), reported as the median over rounds with a 95 % interval.
The penalty's own time per step (`PartitionedPenalty.apply`) is measured inside the same steps.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def launch(cli) -> None:
    work = Path(tempfile.mkdtemp(prefix="zero3_cost_"))
    config = work / "zero3.yaml"
    config.write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: DEEPSPEED\nmixed_precision: 'no'\n"
                      f"num_machines: 1\nnum_processes: {cli.processes}\ndeepspeed_config:\n  zero_stage: 3\n"
                      "  zero3_init_flag: false\n  zero3_save_16bit_model: false\n  offload_optimizer_device: none\n"
                      "  offload_param_device: none\nuse_cpu: false\n")
    env = {**os.environ, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu"), "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", "--config_file", str(config),
           __file__, "--worker", str(work), "--rounds", str(cli.rounds), "--steps", str(cli.steps),
           "--hidden", str(cli.hidden)]
    subprocess.run(cmd, env=env, check=True)


def worker(cli) -> None:
    import torch
    import torch.distributed as dist
    from datasets import Dataset
    from transformers import LlamaConfig, LlamaForCausalLM, TrainerCallback

    from hf_l2sp import SPConfig, SPTrainer

    work = Path(cli.worker)
    rank = int(os.environ.get("RANK", "0"))
    source = work / f"source-r{rank}"
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=8192, hidden_size=cli.hidden, intermediate_size=4 * cli.hidden,
                                 num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=8,
                                 tie_word_embeddings=False)).save_pretrained(source)
    ids = torch.randint(0, 8192, (64, 128), generator=torch.Generator().manual_seed(1))
    data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})

    class StepTimes(TrainerCallback):
        def __init__(self):
            self.times, self.start = [], 0.0

        def on_step_begin(self, *args, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, *args, **kwargs):
            self.times.append(time.perf_counter() - self.start)

    def run(regularizer: str) -> dict:
        model = LlamaForCausalLM.from_pretrained(source)
        timer = StepTimes()
        args = SPConfig(output_dir=str(work / "out"), regularizer=regularizer, per_device_train_batch_size=4,
                        max_steps=cli.steps, use_cpu=True, report_to="none", save_strategy="no",
                        logging_steps=10_000, disable_tqdm=True, dataloader_num_workers=0, max_grad_norm=1.0)
        trainer = SPTrainer(model=model, args=args, train_dataset=data, callbacks=[timer])
        full = trainer.sp_reference.num_parameters() * 4
        penalty_times = []
        trainer.train() if regularizer == "none" else train_timing_penalty(trainer, penalty_times)
        return {"step": statistics.median(timer.times[1:]), "penalty": statistics.median(penalty_times or [0.0]),
                "anchor_bytes": trainer.sp_reference.local_bytes(), "full_bytes": full,
                "values": sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())}

    rounds = []
    for _ in range(cli.rounds):
        rounds.append({name: run(name) for name in ("none", "l2_sp")})
    dist.barrier()
    if rank == 0:
        report(rounds, dist.get_world_size())
    (work / f"rounds-r{rank}.json").write_text(json.dumps(rounds))


def train_timing_penalty(trainer, penalty_times: list) -> None:
    """Train, timing each application of the penalty on this rank's partitions."""
    from hf_l2sp.training.zero3 import PartitionedPenalty

    original = PartitionedPenalty.apply

    def timed(self, update):
        start = time.perf_counter()
        result = original(self, update)
        penalty_times.append(time.perf_counter() - start)
        return result

    PartitionedPenalty.apply = timed
    try:
        trainer.train()
    finally:
        PartitionedPenalty.apply = original


def report(rounds: list[dict], world: int) -> None:
    from lm_cost import _median_interval_ranks

    first = rounds[0]["l2_sp"]
    print(f"\n(a) Anchor under ZeRO-3, {world} processes, {first['values'] / 1e6:.1f} M values, fp32:")
    print(f"    full copy {first['full_bytes'] / 2**20:.1f} MiB; rank 0 holds {first['anchor_bytes'] / 2**20:.1f} MiB "
          f"= {first['anchor_bytes'] / first['full_bytes']:.3f} of it (1/{world} = {1 / world:.3f})")
    ratios = sorted(r["l2_sp"]["step"] / r["none"]["step"] for r in rounds)
    lower, upper = _median_interval_ranks(len(ratios))
    none_step = statistics.median(r["none"]["step"] for r in rounds)
    penalty = statistics.median(r["l2_sp"]["penalty"] for r in rounds)
    print(f"\n(b) Step time, l2_sp against none, {len(rounds)} alternating rounds (median step of each, first step "
          f"dropped), AdamW, clipping 1.0, 4 x 128 tokens per rank:")
    print(f"    none median step {none_step:.3f} s; l2_sp {statistics.median(ratios) - 1:+.1%} "
          f"[{ratios[lower] - 1:+.1%}, {ratios[upper] - 1:+.1%}]; the penalty itself {penalty * 1e3:.1f} ms per step "
          f"= {penalty / none_step:.1%} of a step")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    cli = parser.parse_args()
    worker(cli) if cli.worker else launch(cli)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    main()
