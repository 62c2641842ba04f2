"""How much the figures `hf-l2sp demo` prints move, and whether its L2-SP vs L2 gap is outside that movement.

The demo's runs are short (15 epochs on 10 images per class), so the last bit of float round-off, which differs
between CPUs, moves a single run's test accuracy by points. Running the same configuration under 1 and 2 torch
threads changes the reduction order inside the kernels much as another CPU does; seeds change the images drawn and
the new head. For each seed and thread count both regularizers run; the script prints every run, the per-seed
paired gap (l2_sp - l2), the mean over seeds with a 95 % t-interval, and how far each mean moved between thread
counts.

    python benchmarks/demo_spread.py --seeds 0 1 2 3 4 --threads 2 1
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from hf_l2sp.commands.demo import backbone_drift, demo_runs, quiet_libraries
from hf_l2sp.pipeline.finetune import finetune
from hf_l2sp.utils.intervals import interval


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--threads", type=int, nargs="+", default=[2, 1])
    parser.add_argument("--samples_per_class", type=int, default=10)
    parser.add_argument("--epochs", type=float, default=None)
    parser.add_argument("--image_size", type=int, default=None)
    parser.add_argument("--alpha", type=float, default=None, help="sp_alpha for both (default: the demo's)")
    options = parser.parse_args()
    accuracy: dict[tuple[str, int, int], float] = {}
    seconds: list[float] = []
    with tempfile.TemporaryDirectory() as root, quiet_libraries():
        for threads in options.threads:
            torch.set_num_threads(threads)
            for seed in options.seeds:
                for regularizer, parsed in demo_runs(Path(root) / f"t{threads}_s{seed}", options.samples_per_class,
                                                     seed, options.epochs, options.image_size,
                                                     options.alpha):
                    start = time.perf_counter()
                    metrics = finetune(*parsed, quiet=True)
                    seconds.append(time.perf_counter() - start)
                    accuracy[regularizer, seed, threads] = metrics["test_accuracy"]
                    drift = backbone_drift(Path(root) / f"t{threads}_s{seed}" / regularizer)
                    print(f"threads {threads} seed {seed} {regularizer:6s} test {metrics['test_accuracy']:.4f} "
                          f"drift {drift:.4f} ({seconds[-1]:.0f} s)", flush=True)
    print(f"\nper run: median {statistics.median(seconds):.0f} s, range {min(seconds):.0f}-{max(seconds):.0f} s")
    print(f"{'threads':>7s} {'l2_sp mean':>10s} {'l2 mean':>8s} {'gap':>7s} {'95% interval':>18s}")
    means = {}
    for threads in options.threads:
        sp = [accuracy["l2_sp", s, threads] for s in options.seeds]
        l2 = [accuracy["l2", s, threads] for s in options.seeds]
        gaps = [a - b for a, b in zip(sp, l2)]
        _, low, high = interval(gaps)
        means[threads] = (statistics.mean(sp), statistics.mean(l2), statistics.mean(gaps))
        print(f"{threads:7d} {means[threads][0]:10.4f} {means[threads][1]:8.4f} {means[threads][2]:+7.4f} "
              f"[{low:+.4f}, {high:+.4f}]")
    if len(options.threads) > 1:
        moved = [max(m[i] for m in means.values()) - min(m[i] for m in means.values()) for i in range(3)]
        print(f"moved between thread counts: l2_sp {moved[0]:.4f}, l2 {moved[1]:.4f}, gap {moved[2]:.4f}")


if __name__ == "__main__":
    main()
