"""`hf-l2sp demo`: the main job on an embedded default that works offline.

Fine-tunes real ImageNet EfficientNet-Lite0 weights on real handwritten digits (scikit-learn) with a few images
per class, with L2-SP and with plain L2 at the same strength (alpha = 0.1 on the backbone, the paper's value for
Stanford Dogs; beta = 0.01 on the new head; same data, head and schedule) on several seeds. The two differ only in
the point the backbone is pulled to: w0 or 0. It prints one line per run, then each method's mean over the seeds
and the paired difference l2_sp - l2 with its 95 % t-interval, for two figures: test accuracy, and how far the
backbone moved from the pretrained weights (||w - w0|| / ||w0||, from each run's drift.json). Every fine-tuned
checkpoint stays in the output folder.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import statistics
import sys
import time
from pathlib import Path

from ..pipeline.finetune import finetune
from ..pipeline.options import load_recipe, parse_options
from ..utils.intervals import interval
from ..utils.logs import FORMAT

RUNS = (("l2_sp", "offline_lite0_digits_l2sp"), ("l2", "offline_lite0_digits_l2"))  # packaged recipes
#: The demo's backbone coefficient for both (the recipes' own is 0.01, where the two penalties barely act in 15
#: epochs and their difference is within the run-to-run noise of these short runs).
DEMO_ALPHA = 0.1


def demo_runs(output_dir: Path, samples_per_class: int, seed: int, epochs: float | None = None,
              image_size: int | None = None, alpha: float | None = None):
    """(regularizer, parsed options) of the two paired runs of one seed, each in `output_dir / regularizer`."""
    for regularizer, recipe in RUNS:
        options = {**load_recipe(recipe), "output_dir": str(Path(output_dir) / regularizer),
                   "overwrite_output_dir": True, "max_train_samples_per_class": samples_per_class, "seed": seed,
                   "disable_tqdm": True, "log_level": "warning"}
        if epochs is not None:
            options["num_train_epochs"] = epochs
        if image_size is not None:
            options["image_size"] = image_size
        if alpha is not None:
            options["sp_alpha"] = alpha
        yield regularizer, parse_options(options)


@contextlib.contextmanager
def quiet_libraries():
    """Within: only warnings and errors from transformers, datasets and hf_l2sp, no progress bars and no DeepSpeed
    notice that the machine has no GPU (the demo prints its own lines); hf_l2sp's warnings still reach stderr.
    Everything is restored on exit."""
    import datasets
    import transformers

    package = logging.getLogger("hf_l2sp")
    saved = (transformers.logging.get_verbosity(), transformers.logging.is_progress_bar_enabled(),
             datasets.logging.get_verbosity(), datasets.is_progress_bar_enabled(), package.level)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()  # "Writing model shards" at every save
    datasets.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    package.setLevel(logging.WARNING)
    deepspeed_log = logging.getLogger("DeepSpeed")  # the same object once deepspeed creates it
    deepspeed_log.addFilter(_no_cpu_accelerator_notice)
    handler = None
    if not package.handlers:  # `announce` logs (at INFO, dropped here) instead of printing once a handler exists
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(FORMAT))
        package.addHandler(handler)
    try:
        yield
    finally:
        transformers.logging.set_verbosity(saved[0])
        if saved[1]:
            transformers.logging.enable_progress_bar()
        datasets.logging.set_verbosity(saved[2])
        if saved[3]:
            datasets.enable_progress_bars()
        package.setLevel(saved[4])
        deepspeed_log.removeFilter(_no_cpu_accelerator_notice)
        if handler is not None:
            package.removeHandler(handler)


def _no_cpu_accelerator_notice(record: logging.LogRecord) -> bool:
    """DeepSpeed (where installed) warns on stdout that it found no GPU when Trainer first asks; the demo runs on
    the CPU by design."""
    return not record.getMessage().startswith("Setting accelerator to CPU")


def backbone_drift(output_dir: Path) -> float:
    """||w - w0|| / ||w0|| over the whole backbone, as the run's drift.json records it."""
    return json.loads((Path(output_dir) / "drift.json").read_text())["total"]["relative_distance"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hf-l2sp demo", description=__doc__.split("\n")[0])
    parser.add_argument("--output_dir", default="runs/demo", help="Parent folder of the runs (seed*/l2_sp, ...).")
    parser.add_argument("--samples_per_class", type=int, default=10, help="Training images per digit.")
    parser.add_argument("--epochs", type=float, default=None, help="Override the recipes' 15 epochs.")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                        help="One pair of runs per seed (images drawn, head and order); default 0 1 2.")
    parser.add_argument("--alpha", type=float, default=DEMO_ALPHA, help="Backbone coefficient of both penalties.")
    options = parser.parse_args(argv)
    with quiet_libraries():
        results = run_pairs(options)
    print(report(results))
    return 0


def run_pairs(options) -> dict[str, dict[str, list[float]]]:
    """Both runs of every seed, one line printed per run; their test accuracies and backbone drifts."""
    print(f"EfficientNet-Lite0 (ImageNet) -> digits, {options.samples_per_class} images per class, L2-SP and L2 "
          f"with alpha {options.alpha:g}, seeds {' '.join(map(str, options.seeds))}", flush=True)
    results: dict[str, dict[str, list[float]]] = {name: {"test accuracy": [], "backbone drift": []}
                                                    for name, _ in RUNS}
    for seed in options.seeds:
        folder = Path(options.output_dir) / f"seed{seed}"
        for regularizer, parsed in demo_runs(folder, options.samples_per_class, seed, options.epochs,
                                             alpha=options.alpha):
            start = time.perf_counter()
            metrics = finetune(*parsed, quiet=True)
            results[regularizer]["test accuracy"].append(metrics["test_accuracy"])
            results[regularizer]["backbone drift"].append(backbone_drift(folder / regularizer))
            print(f"seed {seed}  {regularizer:6s} test accuracy {metrics['test_accuracy']:.4f}  backbone drift "
                  f"{results[regularizer]['backbone drift'][-1]:.4f}  ({time.perf_counter() - start:.0f} s)  "
                  f"{folder / regularizer}", flush=True)
    return results


def report(results: dict[str, dict[str, list[float]]]) -> str:
    """A table: per figure, each method's mean over the seeds and the paired difference l2_sp - l2 with its 95 %
    t-interval (none for one seed)."""
    lines = [f"{'mean of ' + str(len(results['l2_sp']['test accuracy'])) + ' seed(s)':22s} {'l2_sp':>7s} "
             f"{'l2':>7s}  {'l2_sp - l2 (95 % interval)'}"]
    for figure in ("test accuracy", "backbone drift"):
        sp, l2 = results["l2_sp"][figure], results["l2"][figure]
        mean, low, high = interval([a - b for a, b in zip(sp, l2)])
        spread = f" ({low:+.4f} to {high:+.4f})" if len(sp) > 1 else ""
        lines.append(f"{figure:22s} {statistics.fmean(sp):7.4f} {statistics.fmean(l2):7.4f}  {mean:+.4f}{spread}")
    return "\n".join(lines)
