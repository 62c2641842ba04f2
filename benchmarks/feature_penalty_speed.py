"""Training step time with the DELTA and BSS feature penalties against no penalty, same model, data and seed.

    python benchmarks/feature_penalty_speed.py           # resnet18 at 64 px, batch 32, 8 timed steps per run
    python benchmarks/feature_penalty_speed.py --quick   # 4 timed steps

Targets (issue 6): DELTA <= 1.45x (one extra forward of the frozen source network), BSS <= 1.05x.
Steps of the three runs are interleaved round by round so that the machine's drift hits them alike.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402


def make_trainer(regularizer: str, arch: str, size: int, batch: int, steps: int):
    from transformers import TimmWrapperConfig, TimmWrapperForImageClassification

    from hf_l2sp import SPConfig, SPTrainer
    from tests.helpers import tensor_dataset

    torch.manual_seed(0)
    model = TimmWrapperForImageClassification(TimmWrapperConfig(architecture=arch, num_labels=10))
    args = SPConfig(output_dir=tempfile.mkdtemp(), use_cpu=True, report_to="none", save_strategy="no",
                    max_steps=steps, per_device_train_batch_size=batch, optim="sgd", learning_rate=1e-3,
                    disable_tqdm=True, regularizer=regularizer, sp_delta_attention="uniform", logging_steps=10_000)
    return SPTrainer(model=model, args=args, train_dataset=tensor_dataset(batch * steps, size=size))


def step_times(trainer) -> list[float]:
    model, optimizer = trainer.model, None
    loader = trainer.get_train_dataloader()
    trainer.create_optimizer_and_scheduler(num_training_steps=len(loader))
    optimizer = trainer.optimizer
    model.train()
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer's own loop, which this drives by hand
    times = []
    for batch in loader:
        start = time.perf_counter()
        loss = trainer.training_step(model, batch)
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - start)
        del loss
    return times[2:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()
    steps = (4 if args.quick else 8) + 2
    names = ("none", "bss", "delta")
    rounds = 1 if args.quick else 3
    times = {n: [] for n in names}
    for _ in range(rounds):
        for name in names:
            times[name] += step_times(make_trainer(name, args.arch, args.size, args.batch, steps))
    base = statistics.median(times["none"])
    print(f"{args.arch} {args.size} px, batch {args.batch}, {torch.get_num_threads()} threads, "
          f"median of {len(times['none'])} steps")
    print(f"{'regularizer':12s} {'ms/step':>9s} {'x none':>7s}")
    for name in names:
        t = statistics.median(times[name])
        print(f"{name:12s} {t * 1e3:9.1f} {t / base:7.3f}")


if __name__ == "__main__":
    main()
