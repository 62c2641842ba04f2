"""`hf-l2sp evaluate`: evaluate a fine-tuned checkpoint (a run folder or a Hub id) on an image dataset split.

    hf-l2sp evaluate --model_name_or_path runs/lite0_digits_l2sp --dataset_name hf_l2sp:digits --split test

Uses the evaluation preprocessing saved with the checkpoint (the one training evaluated with) and the metric
modules shipped with the package (`hf_l2sp/loading/metric_modules`, loaded by path through `evaluate`): top-1, top-5,
mean per-class accuracy and the per-class table, with percentile-bootstrap confidence intervals. Prints a table,
then the results as JSON on the last line; `--output FILE` also writes that JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from ..loading.data import DataArguments, load_evaluation_split
from ..loading.transforms import build_transforms, collate_images, with_transforms
from ..loading.forward import call_image_model, logits_of
from ..loading.metrics import bootstrap_interval, classification_metrics
from ..loading.models import data_config_of, load_source_classifier
from ..utils.errors import ConfigError


def parse_args(argv: list[str] | None):
    parser = argparse.ArgumentParser(prog="hf-l2sp evaluate", description=__doc__.split("\n")[0])
    parser.add_argument("--model_name_or_path", required=True, help="Run folder or Hub id of a fine-tuned model.")
    parser.add_argument("--model_revision", default=None)
    parser.add_argument("--dataset_name", required=True, help="Hub dataset id or local folder (as for train).")
    parser.add_argument("--dataset_config_name", default=None)
    parser.add_argument("--dataset_revision", default=None)
    parser.add_argument("--split", default="test")
    parser.add_argument("--image_column", default=None)
    parser.add_argument("--label_column", default=None)
    parser.add_argument("--max_eval_samples", type=int, default=None)
    parser.add_argument("--skip_bad_images", action="store_true")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--bootstrap", type=int, default=1000, help="Bootstrap resamples for the intervals (0: none).")
    parser.add_argument("--confidence", type=float, default=0.95)
    parser.add_argument("--seed", type=int, default=0, help="Seed of the bootstrap (and of max_eval_samples).")
    parser.add_argument("--output", default=None, help="Also write the JSON results to this file.")
    options = parser.parse_args(argv)
    if options.batch_size < 1 or options.bootstrap < 0 or not 0 < options.confidence < 1:
        parser.error("--batch_size must be >= 1, --bootstrap >= 0 and --confidence in (0, 1).")
    return options


@torch.no_grad()
def predict(model: torch.nn.Module, dataset, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).eval()
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=collate_images)
    logits, labels = [], []
    for batch in loader:
        logits.append(logits_of(call_image_model(model, batch["pixel_values"].to(device))).float().cpu())
        labels.append(batch["labels"])
    return torch.cat(logits).numpy(), torch.cat(labels).numpy()


def evaluate_checkpoint(options) -> dict:
    model, _ = load_source_classifier(options.model_name_or_path, options.model_revision)
    model_labels = [model.config.id2label[i] for i in range(len(model.config.id2label))]
    data = load_evaluation_split(DataArguments(
        dataset_name=options.dataset_name, dataset_config_name=options.dataset_config_name,
        dataset_revision=options.dataset_revision, image_column=options.image_column,
        label_column=options.label_column, max_eval_samples=options.max_eval_samples,
        skip_bad_images=options.skip_bad_images), options.split, seed=options.seed)
    if data.label_names != model_labels:
        raise ConfigError(f"The labels of {options.dataset_name!r} ({data.label_names[:10]}) are not the model's "
                          f"({model_labels[:10]}), in the same order; evaluate on the dataset the model was trained "
                          "for.")
    transforms = build_transforms(data_config_of(model), "none")  # the saved evaluation preprocessing
    dataset = with_transforms(data, transforms.eval, transforms.eval)["eval"]
    logits, labels = predict(model, dataset, options.batch_size)
    metrics = classification_metrics(logits, labels, len(model_labels))
    for row in metrics["per_class"]:
        row["label"] = model_labels[row["class"]]
    result = {"model": options.model_name_or_path, "dataset": options.dataset_name, "split": options.split,
              "num_examples": int(len(labels)), **{k: v for k, v in metrics.items() if k != "per_class"}}
    if options.bootstrap:
        top5 = None
        if "top5_accuracy" in metrics:  # the same top-5 rule as the metric: the label among the 5 largest logits
            top5 = (np.argsort(-logits, axis=1)[:, :5] == labels[:, None]).any(1)
        interval = bootstrap_interval(logits.argmax(1) == labels, labels, len(model_labels), options.bootstrap,
                                      options.confidence, options.seed, correct_top5=top5)
        result[f"ci{round(100 * options.confidence)}"] = {k: list(v) for k, v in interval.items()}
    result["per_class"] = metrics["per_class"]
    return result


def main(argv: list[str] | None = None) -> int:
    options = parse_args(argv)
    result = evaluate_checkpoint(options)
    print(f"{result['model']} on {result['dataset']} [{result['split']}], {result['num_examples']} images")
    for key in ("accuracy", "top5_accuracy", "mean_per_class_accuracy"):
        if key in result:
            interval = next((v[key] for k, v in result.items() if k.startswith("ci") and key in v), None)
            shown = f"  [{interval[0]:.4f}, {interval[1]:.4f}]" if interval else ""
            print(f"  {key:24s} {result[key]:.4f}{shown}")
    line = json.dumps(result)
    if options.output:
        Path(options.output).parent.mkdir(parents=True, exist_ok=True)
        Path(options.output).write_text(line + "\n")
    print(line)
    return 0
