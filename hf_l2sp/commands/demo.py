"""`hf-l2sp demo`: the main job on an embedded default that works offline.

Fine-tunes real ImageNet EfficientNet-Lite0 weights on real handwritten digits (scikit-learn) with a few images
per class, once with L2-SP and once with plain L2 (same alpha, beta, data and seed), prints both test accuracies and
leaves each fine-tuned checkpoint in the output folder.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..pipeline.finetune import finetune
from ..pipeline.options import load_recipe, parse_options

RUNS = (("l2_sp", "offline_lite0_digits_l2sp"), ("l2", "offline_lite0_digits_l2"))  # packaged recipes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hf-l2sp demo", description=__doc__.split("\n")[0])
    parser.add_argument("--output_dir", default="runs/demo", help="Parent folder of the two runs.")
    parser.add_argument("--samples_per_class", type=int, default=10, help="Training images per digit.")
    parser.add_argument("--epochs", type=float, default=None, help="Override the recipe's epochs.")
    parser.add_argument("--seed", type=int, default=0)
    options = parser.parse_args(argv)
    results = {}
    for regularizer, recipe in RUNS:
        run_options = {**load_recipe(recipe), "output_dir": str(Path(options.output_dir) / regularizer),
                       "overwrite_output_dir": True, "max_train_samples_per_class": options.samples_per_class,
                       "seed": options.seed, "disable_tqdm": True}
        if options.epochs is not None:
            run_options["num_train_epochs"] = options.epochs
        results[regularizer] = finetune(*parse_options(run_options))
    print(f"\nEfficientNet-Lite0 (ImageNet) -> digits, {options.samples_per_class} images per class, "
          f"seed {options.seed}")
    print(f"{'regularizer':12s} {'test accuracy':>14s} {'val accuracy':>13s}  checkpoint")
    for regularizer, metrics in results.items():
        print(f"{regularizer:12s} {metrics['test_accuracy']:14.4f} {metrics['eval_accuracy']:13.4f}  "
              f"{Path(options.output_dir) / regularizer}")
    return 0
