"""Metrics through the shipped `evaluate` modules, and `hf-l2sp evaluate` reproducing a run's own test accuracy."""

import json

import numpy as np
import pytest

from hf_l2sp.cli import main
from hf_l2sp.loading.metrics import bootstrap_interval, classification_metrics, load_metric, metric_module_path

from .test_cli import tiny_flags


def test_metric_modules_load_by_path_offline_and_compute_the_formulas():
    logits = np.array([[0.1, 0.9, 0.0, 0.0, 0.0, 0.3], [0.8, 0.1, 0.1, 0.0, 0.0, 0.0], [0.0, 0.2, 0.1, 0.9, 0.5, 0.0],
                       [0.3, 0.3, 0.2, 0.1, 0.0, 0.1]])
    labels = np.array([1, 2, 4, 1])
    metrics = classification_metrics(logits, labels)
    assert metrics["accuracy"] == 0.25  # row 0 only; row 3 ties 0/1 and the lower index wins
    assert metrics["top5_accuracy"] == 1.0
    assert metrics["mean_per_class_accuracy"] == pytest.approx((1 / 2 + 0 + 0) / 3)  # classes 1, 2, 4 present
    assert [r["count"] for r in metrics["per_class"]] == [0, 2, 1, 0, 1, 0]
    assert type(load_metric("top_k_accuracy")).__name__ == "TopKAccuracy"
    assert metric_module_path("per_class_accuracy").joinpath("per_class_accuracy.py").is_file()
    low, high = bootstrap_interval(np.array([True] * 30 + [False] * 10), np.zeros(40, dtype=int), 1)["accuracy"]
    assert low < 0.75 < high


def test_evaluate_reproduces_the_runs_test_accuracy_exactly(tmp_path, capsys):
    assert main(["train", *tiny_flags(tmp_path, max_steps=6, learning_rate=0.05, per_device_train_batch_size=3)]) == 0
    logged = json.loads((tmp_path / "out" / "all_results.json").read_text())
    capsys.readouterr()
    out_file = tmp_path / "eval.json"
    assert main(["evaluate", "--model_name_or_path", str(tmp_path / "out"), "--dataset_name", str(tmp_path / "data"),
                 "--split", "test", "--bootstrap", "200", "--output", str(out_file)]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["accuracy"] == logged["test_accuracy"]  # same preprocessing, same metric module: exactly
    assert result["mean_per_class_accuracy"] == logged["test_mean_per_class_accuracy"]
    assert result["num_examples"] == 12 and len(result["per_class"]) == 3
    assert {r["label"] for r in result["per_class"]} == {"c0", "c1", "c2"}
    low, high = result["ci95"]["accuracy"]
    assert low <= result["accuracy"] <= high
    assert json.loads(out_file.read_text()) == result


def test_evaluate_refuses_a_dataset_with_other_labels(tmp_path, capsys):
    from .helpers import write_parquet_repo

    assert main(["train", *tiny_flags(tmp_path, max_steps=1)]) == 0
    write_parquet_repo(tmp_path / "other", splits={"train": 6, "test": 6}, names=["x", "y", "z"])
    assert main(["evaluate", "--model_name_or_path", str(tmp_path / "out"), "--dataset_name",
                 str(tmp_path / "other")]) == 2
    assert "are not the model's" in capsys.readouterr().err


def test_evaluate_reproduces_a_native_transformers_run_with_its_training_preprocessing(tmp_path, capsys):
    """A native ResNet whose own processor says 64 px and other mean/std, trained at 32 px: the run folder records
    the evaluation transform training used, and `hf-l2sp evaluate` uses it (not the processor's 64 px)."""
    import torch
    from transformers import ConvNextImageProcessor, ResNetConfig, ResNetForImageClassification

    from hf_l2sp.loading.models import data_config_of, load_source_classifier

    from .helpers import write_parquet_repo

    torch.manual_seed(0)
    ResNetForImageClassification(ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                              num_labels=5)).save_pretrained(tmp_path / "model")
    ConvNextImageProcessor(size={"shortest_edge": 64}, crop_pct=1.0, image_mean=[0.2, 0.3, 0.4],
                           image_std=[0.5, 0.5, 0.5]).save_pretrained(tmp_path / "model")
    write_parquet_repo(tmp_path / "data", splits={"train": 24, "test": 12})
    flags = tiny_flags(tmp_path, max_steps=6, per_device_train_batch_size=3, learning_rate=0.05)
    assert main(["train", *flags]) == 0
    logged = json.loads((tmp_path / "out" / "all_results.json").read_text())
    config = data_config_of(load_source_classifier(str(tmp_path / "out"))[0])
    assert config["input_size"] == (3, 32, 32) and config["mean"] == (0.2, 0.3, 0.4)
    capsys.readouterr()
    assert main(["evaluate", "--model_name_or_path", str(tmp_path / "out"), "--dataset_name", str(tmp_path / "data"),
                 "--bootstrap", "0"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["accuracy"] == logged["test_accuracy"]


def test_bootstrap_gives_top5_an_interval_too():
    """Issue 22k: `hf-l2sp evaluate` printed no interval for top-5."""
    import numpy as np

    from hf_l2sp.loading.metrics import bootstrap_interval

    labels = np.arange(40) % 8
    correct = np.arange(40) % 2 == 0
    top5 = np.arange(40) % 4 != 0  # 75 % of the labels are among the 5 largest logits
    interval = bootstrap_interval(correct, labels, 8, samples=300, correct_top5=top5)
    assert set(interval) == {"accuracy", "top5_accuracy", "mean_per_class_accuracy"}
    low, high = interval["top5_accuracy"]
    assert low < 0.75 < high and high - low < 0.4
    assert "top5_accuracy" not in bootstrap_interval(correct, labels, 8, samples=50)
