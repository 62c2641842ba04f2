"""What L2-SP costs at LLM scale: peak memory beyond the anchor, and the step overhead measured interleaved.

    python benchmarks/lm_cost.py                 # GPT-2-small shape (124 M), about 25 minutes on 2 CPU cores
    python benchmarks/lm_cost.py --quick         # a small GPT-2, a couple of minutes
    python benchmarks/lm_cost.py --only memory   # or --only speed, --only share

a. Memory: one fresh process per case (plain Trainer; SPTrainer with 'none'; l2_sp in 'loss', 'grad' and
   'decoupled' modes), fp32 and bf16 weights, a few AdamW steps with clipping at 1.0. Peak resident memory
   (ru_maxrss) above plain Trainer's, split into the anchor's bytes and the transient rest, which the penalty must
   keep under 0.1 x the bytes of S. Every step logs, so the distance measured for the logs counts too. Run with
   MALLOC_MMAP_THRESHOLD_=131072 (set here for the children), so that freed large blocks return to the system and
   the peak follows the live tensors.
b. Step time: each trainer in its own process, as a user runs it; they step in turn (a callback waits for the turn
   at each step's start, so only one runs at a time and the machine's drift hits all alike; the order rotates every
   round; the rounds are split over a few sets of fresh processes), and each round's step time is divided by plain
   Trainer's in the same round: the paired median ratio and a 95 % interval (order statistics).
c. The penalty's share of a step: its passes timed where they run, inside the steps of a trainer run as a user runs
   it (one process), against the same step's time. Steps on a shared machine vary by +-10 % from one to the next,
   which (b)'s intervals carry; this ratio, taken within each step, does not.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

CASES = [("plain", None), ("none", "loss"), ("l2_sp", "loss"), ("l2_sp", "grad"), ("l2_sp", "decoupled")]


def model_and_data(quick: bool, dtype: str):
    import torch
    from datasets import Dataset
    from transformers import GPT2Config, GPT2LMHeadModel

    size = dict(n_embd=128, n_layer=2, n_head=4) if quick else dict(n_embd=768, n_layer=12, n_head=12)
    config = GPT2Config(vocab_size=50257, n_positions=256, **size)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config).to(getattr(torch, dtype))
    ids = torch.randint(0, config.vocab_size, (64, 256), generator=torch.Generator().manual_seed(0))
    return model, Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()}).with_format("torch")


def trainer_for(name, mode, model, data, steps, out, callbacks=(), logging_steps=1000):
    from transformers import Trainer, TrainingArguments

    from hf_l2sp import SPConfig, SPTrainer

    common = dict(output_dir=out, use_cpu=True, report_to="none", save_strategy="no", max_steps=steps,
                  per_device_train_batch_size=4, max_grad_norm=1.0, logging_steps=logging_steps, disable_tqdm=True,
                  learning_rate=1e-5, dataloader_num_workers=0)
    if name == "plain":
        return Trainer(model=model, args=TrainingArguments(**common), train_dataset=data, callbacks=list(callbacks))
    args = SPConfig(**common, regularizer=name, sp_mode=mode, sp_alpha=0.01, sp_beta=0.0)
    return SPTrainer(model=model, args=args, train_dataset=data, callbacks=list(callbacks))


def memory_case(name, mode, dtype, quick, steps) -> dict:
    """One case in this (fresh) process: peak RSS after `steps` steps, and the anchor's bytes."""
    model, data = model_and_data(quick, dtype)
    # every step logs: the distance to w0 that 'none' measures for the log counts too
    trainer = trainer_for(name, mode, model, data, steps, tempfile.mkdtemp(), logging_steps=1)
    trainer.train()
    anchor = trainer.sp_reference.local_bytes() if name != "plain" else 0
    s_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.ndim >= 2)
    return {"peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "anchor": anchor, "s": s_bytes}


def table_memory(quick: bool, steps: int) -> None:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    print(f"\n(a) Peak memory over plain Trainer, {'small GPT-2' if quick else 'GPT-2-small (124 M)'}, batch 4 x "
          f"256, AdamW, clipping 1.0, {steps} steps, one process per case")
    print(f"{'dtype':6s} {'case':20s} {'extra GiB':>10s} {'anchor GiB':>11s} {'transient GiB':>14s} {'x S':>6s}")
    for dtype in ("float32", "bfloat16"):
        rows = {}
        for name, mode in CASES:
            done = subprocess.run([sys.executable, __file__, "--child", json.dumps([name, mode, dtype, quick, steps])],
                                  env=env, capture_output=True, text=True, check=True)
            rows[(name, mode)] = json.loads(done.stdout.strip().splitlines()[-1])
        plain = rows[("plain", None)]["peak"]
        for (name, mode), row in rows.items():
            if name == "plain":
                continue
            extra = row["peak"] - plain
            transient = extra - row["anchor"]
            print(f"{dtype[:6]:6s} {name + ' ' + mode:20s} {extra / 2**30:10.3f} {row['anchor'] / 2**30:11.3f} "
                  f"{transient / 2**30:14.3f} {transient / row['s']:6.2f}")


def speed_child(name, mode, quick, steps, channel) -> None:
    """One trainer in its own process (as a user runs it): each step waits for the parent's turn and reports its
    time once the work that follows the step is done. It says it is ready once training has started, and after its
    last step waits for the parent's word, so that neither its start nor its end overlaps another's measured step."""
    from transformers import TrainerCallback

    class Turns(TrainerCallback):
        elapsed = None

        def on_train_begin(self, args, train_state, control, **kwargs):
            channel.send("ready")

        def on_step_begin(self, args, train_state, control, **kwargs):
            if self.elapsed is not None:  # the last step's time, sent once its follow-up work is done too
                channel.send(self.elapsed)
            channel.recv()  # the turn
            self.start = time.perf_counter()

        def on_step_end(self, args, train_state, control, **kwargs):
            self.elapsed = time.perf_counter() - self.start
            if train_state.global_step == steps:
                channel.send(self.elapsed)
                channel.recv()  # the end

    model, data = model_and_data(quick, "float32")
    trainer_for(name, mode, model, data, steps, tempfile.mkdtemp(), [Turns()]).train()


def speed_session(names, quick: bool, rounds: int) -> dict[int, list[float]]:
    """Fresh processes, one per trainer, stepping in turn for `rounds` rounds after 2 warm-up rounds (dropped)."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    channels, children = [], []
    for name, mode in names:
        mine, theirs = context.Pipe()
        child = context.Process(target=speed_child, args=(name, mode, quick, rounds + 2, theirs))
        child.start()
        channels.append(mine)
        children.append(child)
    for channel in channels:
        assert channel.recv() == "ready"
    times = {i: [] for i in range(len(names))}
    for round_ in range(rounds + 2):
        for k in range(len(names)):
            index = (round_ + k) % len(names)
            channels[index].send("go")
            times[index].append(channels[index].recv())
    for channel in channels:
        channel.send("end")
    for child in children:
        child.join()
    return {i: t[2:] for i, t in times.items()}


def table_speed(quick: bool, rounds: int, sessions: int) -> None:
    """Each trainer runs in its own process, as a user runs it, and they step in turn, the order rotating every
    round. Threads in one process would not do: each thread that runs torch gets its own OpenMP team, and with more
    threads than cores OpenMP stops spinning between parallel regions, which slows code made of many small
    operations 2-3x. A process also has its own luck (where its memory landed), so the rounds are split over
    `sessions` sets of fresh processes."""
    import torch

    names = [("plain", None), ("none", "loss"), ("l2_sp", "loss"), ("l2_sp", "grad")]
    times = {i: [] for i in range(len(names))}
    per_session = [rounds // sessions + (k < rounds % sessions) for k in range(sessions)]
    for session_rounds in per_session:
        for index, values in speed_session(names, quick, session_rounds).items():
            times[index].extend(values)
    plain = times[0]
    print(f"\n(b) Step time, one process per trainer stepping in turn (order rotating), {rounds} rounds in "
          f"{sessions} sessions of fresh processes (2 warm-up rounds each, dropped), fp32, AdamW, clipping 1.0, "
          f"{torch.get_num_threads()} threads; plain Trainer median {statistics.median(plain):.3f} s")
    print(f"{'case':20s} {'median ratio':>13s} {'95 % interval':>18s}")
    lower, upper = _median_interval_ranks(len(plain))
    for index, (name, mode) in enumerate(names[1:], start=1):
        ratios = sorted(t / p for t, p in zip(times[index], plain))
        print(f"{name + ' ' + mode:20s} {statistics.median(ratios) - 1:+13.1%} "
              f"[{ratios[lower] - 1:+.1%}, {ratios[upper] - 1:+.1%}]")
    print("raw step times (s):", json.dumps({f"{n} {m}": [round(t, 4) for t in times[i]]
                                             for i, (n, m) in enumerate(names)}))


def share_case(name, mode, quick, steps) -> dict:
    """In this (fresh) process, as a user runs a trainer: the penalty's own time inside each step (its passes timed
    where they run), and the step's time, same clock, same step."""
    from transformers import TrainerCallback

    from hf_l2sp.penalties import kernels
    from hf_l2sp.training import optimizer_side

    spent = [0.0]

    def timed(function):
        def run(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                spent[0] += time.perf_counter() - start
        return run

    kernels.StreamedPenalty.forward = staticmethod(timed(kernels.StreamedPenalty.forward))
    write_gradients = kernels.run_backward
    kernels.run_backward = lambda write, *args: write_gradients(timed(write), *args)
    optimizer_side.OptimizerSidePenalty._run = timed(optimizer_side.OptimizerSidePenalty._run)
    rows = []

    class Steps(TrainerCallback):
        def on_step_begin(self, args, train_state, control, **kwargs):
            spent[0], self.start = 0.0, time.perf_counter()

        def on_step_end(self, args, train_state, control, **kwargs):
            rows.append((time.perf_counter() - self.start, spent[0]))

    model, data = model_and_data(quick, "float32")
    trainer_for(name, mode, model, data, steps, tempfile.mkdtemp(), [Steps()]).train()
    rows = rows[1:]  # the first step warms up
    return {"step": statistics.median(r[0] for r in rows), "penalty": statistics.median(r[1] for r in rows),
            "share": statistics.median(r[1] / r[0] for r in rows)}


def table_share(quick: bool, steps: int) -> None:
    print(f"\n(c) The penalty's own time inside the step, one fresh process per mode, {steps} steps (the first "
          "dropped), fp32, AdamW, clipping 1.0; medians")
    print(f"{'case':20s} {'step s':>8s} {'penalty ms':>11s} {'share':>7s}")
    for name, mode in (("l2_sp", "loss"), ("l2_sp", "grad")):
        done = subprocess.run([sys.executable, __file__, "--child", json.dumps(["share", name, mode, quick, steps])],
                              capture_output=True, text=True, check=True)
        row = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"{name + ' ' + mode:20s} {row['step']:8.3f} {1000 * row['penalty']:11.1f} {row['share']:7.2%}")


def _median_interval_ranks(n: int) -> tuple[int, int]:
    """0-based order statistics bracketing the median with at least 95 % coverage (binomial, p = 1/2)."""
    from math import comb

    best = (0, n - 1)
    for k in range(n // 2):
        coverage = sum(comb(n, i) for i in range(k + 1, n - k)) / 2 ** n
        if coverage >= 0.95:
            best = (k, n - 1 - k)
    return best


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", choices=("memory", "speed", "share"))
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--sessions", type=int, default=3, help="sets of fresh processes the rounds are split over")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--share-steps", type=int, default=8)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        case = json.loads(args.child)
        print(json.dumps(share_case(*case[1:]) if case[0] == "share" else memory_case(*case)))
        return
    if args.only in (None, "memory"):
        table_memory(args.quick, args.steps)
    if args.only in (None, "speed"):
        table_speed(args.quick, args.rounds, args.sessions)
    if args.only in (None, "share"):
        table_share(args.quick, args.share_steps)


if __name__ == "__main__":
    main()
