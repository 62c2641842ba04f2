"""L2-SP on a language model: step time against plain Trainer, and the anchor's bytes against S's.

    python benchmarks/lm_penalty_speed.py            # GPT-2-small shape (124 M parameters), several minutes on 2 CPUs
    python benchmarks/lm_penalty_speed.py --quick    # a 4-layer GPT-2 of width 256, about a minute

a. Median training-step time (SGD, causal-LM loss on random tokens) of plain `Trainer`, `SPTrainer` with
   `regularizer="none"`, and `SPTrainer` with `l2_sp` (`sp_mode="loss"` and `"grad"`): same random-init model,
   data and seed; the trainers run one after another and each step is timed by a callback.
b. The penalty alone (value and gradient, `sp_mode="loss"` and `"grad"`) on the same model, against plain
   Trainer's median step from (a): the share of a step the penalty costs, free of the steps' noise.
c. Memory: bytes of the anchor w0 against the bytes of the anchored parameters, in fp32 and in bf16.
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
from datasets import Dataset  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from hf_l2sp import SPConfig, SPTrainer  # noqa: E402
from timing import median_seconds  # noqa: E402  (benchmarks/timing.py, beside this script)

SMALL = dict(n_embd=768, n_layer=12, n_head=12, vocab_size=50257, n_positions=1024)  # GPT-2 small: 124 M
QUICK = dict(n_embd=256, n_layer=4, n_head=4, vocab_size=8192, n_positions=256)


def build(shape: dict, dtype=torch.float32) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(**shape)).to(dtype)


def tokens(n: int, length: int, vocab: int) -> Dataset:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (n, length), generator=gen)
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()}).with_format("torch")


class StepTimer(TrainerCallback):
    def __init__(self):
        self.stamps = []

    def on_step_begin(self, *args, **kwargs):
        self.stamps.append(time.perf_counter())

    def on_step_end(self, *args, **kwargs):
        self.stamps.append(time.perf_counter())

    def step_times(self, warmup: int) -> list[float]:
        pairs = list(zip(self.stamps[::2], self.stamps[1::2]))
        return [end - start for start, end in pairs][warmup:]


def table_a(shape: dict, batch: int, length: int, steps: int, warmup: int = 2) -> None:
    data = tokens(batch * (steps + warmup), length, shape["vocab_size"])
    common = dict(use_cpu=True, report_to="none", save_strategy="no", max_steps=steps + warmup,
                  per_device_train_batch_size=batch, optim="sgd", learning_rate=1e-4, disable_tqdm=True,
                  logging_steps=10_000, max_grad_norm=1.0, dataloader_num_workers=0)
    runs = {
        "Trainer (plain)": lambda d: (Trainer, TrainingArguments(output_dir=d, **common)),
        "SPTrainer none": lambda d: (SPTrainer, SPConfig(output_dir=d, regularizer="none", **common)),
        "SPTrainer l2_sp loss": lambda d: (SPTrainer, SPConfig(output_dir=d, regularizer="l2_sp", **common)),
        "SPTrainer l2_sp grad": lambda d: (SPTrainer, SPConfig(output_dir=d, regularizer="l2_sp", sp_mode="grad",
                                                               **common)),
    }
    params = sum(p.numel() for p in build(shape).parameters())
    print(f"\n(a) step time, GPT-2 {shape['n_layer']} layers x {shape['n_embd']} ({params / 1e6:.1f} M parameters), "
          f"batch {batch} x {length} tokens, SGD, max_grad_norm 1, median of {steps} steps after {warmup}")
    print(f"{'trainer':24s} {'ms/step':>9s} {'vs plain':>9s}")
    medians = {}
    for name, make in runs.items():
        trainer_class, args = make(tempfile.mkdtemp())
        timer = StepTimer()
        trainer = trainer_class(model=build(shape), args=args, train_dataset=data, callbacks=[timer])
        trainer.train()
        medians[name] = statistics.median(timer.step_times(warmup))
        base = medians["Trainer (plain)"]
        print(f"{name:24s} {medians[name] * 1e3:9.1f} {100 * (medians[name] / base - 1):8.1f}%", flush=True)
    return medians["Trainer (plain)"]


def table_b(shape: dict, step_seconds: float, repeats: int = 7) -> None:
    from hf_l2sp.training.optimizer_side import OptimizerSidePenalty

    args = SPConfig(output_dir=tempfile.mkdtemp(), use_cpu=True, report_to="none", regularizer="l2_sp")
    model = build(shape)
    trainer = SPTrainer(model=model, args=args, train_dataset=tokens(1, 8, shape["vocab_size"]))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1e-3)
            p.grad = torch.zeros_like(p)
    sets = trainer.sp_parameters()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    side = OptimizerSidePenalty("grad", trainer.regularizer.quadratic_form(), sets, on_terms=lambda terms: None)
    paths = {"loss (value + backward)": lambda: trainer.regularizer(sets).penalty.backward(),
             "grad (closed form into .grad)": lambda: side._run(optimizer, 1.0)}
    print(f"\n(b) the penalty alone over {sum(p.numel() for p in sets.anchored) / 1e6:.1f} M anchored values, "
          f"median of {repeats}, against plain Trainer's step ({step_seconds * 1e3:.0f} ms)")
    print(f"{'path':30s} {'ms':>8s} {'share of a step':>16s}")
    for name, run in paths.items():
        ms = median_seconds(run, repeats)
        print(f"{name:30s} {ms * 1e3:8.1f} {100 * ms / step_seconds:15.1f}%")


def table_c(shape: dict) -> None:
    print("\n(c) anchor bytes against the anchored parameters' bytes")
    print(f"{'dtype':8s} {'anchored MiB':>13s} {'anchor MiB':>11s} {'ratio':>6s}")
    for dtype in (torch.float32, torch.bfloat16):
        args = SPConfig(output_dir=tempfile.mkdtemp(), use_cpu=True, report_to="none", regularizer="l2_sp")
        trainer = SPTrainer(model=build(shape, dtype), args=args, train_dataset=tokens(1, 8, shape["vocab_size"]))
        sets = trainer.sp_parameters()
        held = sum(a.numel() * a.element_size() for a in sets.anchors)
        anchored = sum(p.numel() * p.element_size() for p in sets.anchored)
        print(f"{str(dtype).removeprefix('torch.'):8s} {anchored / 2**20:13.1f} {held / 2**20:11.1f} "
              f"{held / anchored:6.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--steps", type=int, default=None)
    args = parser.parse_args()
    shape = QUICK if args.quick else SMALL
    batch, length = (4, 128) if args.quick else (4, 256)
    step = table_a(shape, batch, length, steps=args.steps or (6 if args.quick else 8))
    table_b(shape, step)
    table_c(shape)


if __name__ == "__main__":
    main()
