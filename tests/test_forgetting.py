"""Retention sets: forgetting measured against the starting model at every evaluation.

Each value is checked against an independent computation with plain transformers / timm on the saved model and the
starting checkpoint; the set-ups (accumulation, 2 gloo processes, LoRA) against one process; the card against the
logs; bad input against one-line refusals before training.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from transformers import GPT2LMHeadModel, Trainer, TrainingArguments

from hf_l2sp import SPTrainer
from hf_l2sp.forgetting.measures import linear_cka
from hf_l2sp.loading.models import load_backbone
from hf_l2sp.utils.errors import ConfigError

from . import retention_runs
from .helpers import save_timm_folder, sp_config, tensor_dataset, timm_classifier
from .text_models import SENTENCES, gpt2_config, padded_lm_batch, save_gpt2_lm, sft_sp_classes

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    return save_gpt2_lm(tmp_path_factory.mktemp("gpt2"))


def lm_sets():
    return {"target": padded_lm_batch(seed=3), "general": padded_lm_batch(seed=2)}


def lm_trainer(folder, out, **overrides):
    values = dict(max_steps=4, eval_strategy="steps", eval_steps=2, learning_rate=0.2, sp_alpha=0.05,
                  sp_retention="general", sp_retention_kl="target")
    values.update(overrides)
    args = sp_config(out, **values)
    train = padded_lm_batch(lengths=(8,) * 8, seed=1)
    return SPTrainer(model=GPT2LMHeadModel.from_pretrained(folder), args=args, train_dataset=train,
                     eval_dataset=lm_sets())


def plain_loss(model, data, tmp_path) -> float:
    args = TrainingArguments(output_dir=str(tmp_path / "plain"), use_cpu=True, report_to="none")
    return Trainer(model=model, args=args).evaluate(data)["eval_loss"]


def direct_kl(start_model, model, data) -> float:
    """KL(p_start || p) per predicted token, from two separately loaded models."""
    total, count = 0.0, 0
    with torch.no_grad():
        for row in data:
            ids, mask, labels = (row[k].unsqueeze(0) for k in ("input_ids", "attention_mask", "labels"))
            p0 = torch.log_softmax(start_model(input_ids=ids, attention_mask=mask).logits[0, :-1].double(), -1)
            p1 = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits[0, :-1].double(), -1)
            keep = labels[0, 1:] != -100
            total += (p0.exp() * (p0 - p1)).sum(-1)[keep].sum().item()
            count += int(keep.sum())
    return total / count


def test_lm_forgetting_and_kl_start_at_zero_and_end_at_the_saved_models(gpt2, tmp_path):
    trainer = lm_trainer(gpt2, tmp_path)
    trainer.train()
    trainer.save_model()
    logs = trainer.state.log_history
    general = [log for log in logs if "eval_general_forgetting" in log]
    kls = [log for log in logs if "eval_target_kl" in log]
    assert [log["step"] for log in general] == [0, 2, 4] and general[0]["eval_general_forgetting"] == 0.0
    assert kls[0]["eval_target_kl"] == 0.0 and kls[0]["step"] == 0
    saved = GPT2LMHeadModel.from_pretrained(tmp_path / "out").eval()
    start = GPT2LMHeadModel.from_pretrained(gpt2).eval()
    data = lm_sets()
    independent = plain_loss(saved, data["general"], tmp_path) - plain_loss(start, data["general"], tmp_path)
    assert general[-1]["eval_general_forgetting"] == pytest.approx(independent, abs=1e-6)
    assert abs(independent) > 1e-3  # the run did move the model
    assert kls[-1]["eval_target_kl"] == pytest.approx(direct_kl(start, saved, data["target"]), abs=1e-6)
    assert kls[-1]["eval_target_kl"] > 1e-4
    # nothing was copied: the model's parameters are its own again after each KL pass
    assert all(p.data_ptr() != a.data_ptr() for n, p in trainer.model.named_parameters()
               for a in [trainer.sp_reference.tensors[n]])

    # the card: a figure beside the weights, and a table that is the logs' first and last values
    folder = tmp_path / "out"
    assert (folder / "forgetting.png").stat().st_size > 1000
    card = (folder / "README.md").read_text()
    assert "![Target metric and forgetting against the step](forgetting.png)" in card
    summary = json.loads((folder / "retention.json").read_text())
    row = next(line for line in card.splitlines() if line.startswith("| general |"))
    assert row == (f"| general | loss | {general[0]['eval_general_loss']:.4f} | {general[-1]['eval_general_loss']:.4f}"
                   f" | forgetting {general[-1]['eval_general_forgetting']:+.4f} |")
    target = [log["eval_target_loss"] for log in logs if "eval_target_loss" in log]
    assert summary["target"]["metric"] == "eval_target_loss"
    assert summary["target"]["gain"] == pytest.approx(target[0] - target[-1])
    assert f"| target (`eval_target_loss`) | lower is better | {target[0]:.4f} | {target[-1]:.4f} |" in card
    assert summary["kl"]["end"] == kls[-1]["eval_target_kl"]


def test_a_plain_run_measures_its_own_forgetting_and_nothing_runs_per_step(gpt2, tmp_path, monkeypatch):
    from hf_l2sp.forgetting.trainer import RetentionMixin

    calls = []
    real = RetentionMixin._kl_to_start
    monkeypatch.setattr(RetentionMixin, "_kl_to_start", lambda self, loader: calls.append(1) or real(self, loader))
    trainer = lm_trainer(gpt2, tmp_path, regularizer="none", eval_steps=4)
    trainer.train()
    assert len(calls) == 2  # the start and step 4: evaluations only, never a training step
    forgetting = [log["eval_general_forgetting"] for log in trainer.state.log_history
                  if "eval_general_forgetting" in log]
    assert forgetting[0] == 0.0 and forgetting[-1] > 0


def test_accumulation_two_processes_and_lora_measure_what_one_process_does(tmp_path):
    loras = retention_runs.lora_cases()  # LoRA where peft is installed
    single = {lora: retention_runs.run("single", lora, str(tmp_path / f"a{lora}")) for lora in loras}
    ga2 = {lora: retention_runs.run("ga2", lora, str(tmp_path / f"b{lora}")) for lora in loras}
    out = tmp_path / "ddp.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "tests.retention_runs", "ddp", str(out)], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    ddp = torch.load(out, weights_only=False)
    assert set(ddp) == set(loras)
    for lora in loras:
        reference = single[lora]
        assert [log["step"] for log in reference] == [0, 0, 2, 2]
        assert reference[1]["eval_general_forgetting"] == 0.0 and reference[0]["eval_target_kl"] == 0.0
        assert reference[3]["eval_general_forgetting"] > 1e-5 and reference[2]["eval_target_kl"] > 1e-8
        for other in (ga2[lora], ddp[lora]):
            for mine, theirs in zip(other, reference, strict=True):
                assert mine.keys() == theirs.keys()
                for key in mine:
                    assert mine[key] == pytest.approx(theirs[key], rel=1e-3, abs=1e-6), (lora, key)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A timm checkpoint with a 5-class source head; the target has 3 classes (a new head)."""
    folder = tmp_path_factory.mktemp("source")
    save_timm_folder(folder, num_classes=5)
    return folder


def image_trainer(source, out, measure="auto", retention=None, **overrides):
    model, _ = load_backbone(str(source), {0: "a", 1: "b", 2: "c"})
    args = sp_config(out, max_steps=3, eval_strategy="steps", eval_steps=3, sp_retention_measure=measure,
                     **overrides)
    retention = retention if retention is not None else tensor_dataset(12, 5, seed=2)  # labels: source classes
    return SPTrainer(model=model, args=args, train_dataset=tensor_dataset(16, 3, seed=1),
                     eval_dataset=tensor_dataset(6, 3, seed=3), retention_datasets={"source": retention})


def source_model_outputs(model_folder, source, data):
    """Pooled features (timm's pre-logits) of a saved fine-tuned model, and predictions of the source head on them,
    computed with timm alone."""
    import timm
    from safetensors.torch import load_file

    state = load_file(str(Path(model_folder) / "model.safetensors"))
    state = {k.removeprefix("timm_model."): v for k, v in state.items()}
    model = timm.create_model("test_resnet", num_classes=state["fc.weight"].shape[0]).eval()
    model.load_state_dict(state)
    head = load_file(str(Path(source) / "model.safetensors"))
    with torch.no_grad():
        pixels = torch.stack([row["pixel_values"] for row in data])
        features = model.forward_head(model.forward_features(pixels), pre_logits=True)
        predictions = (features @ head["fc.weight"].T + head["fc.bias"]).argmax(-1)
    return features, predictions


@pytest.mark.parametrize("measure", ["agreement", "source_accuracy", "cka"])
def test_classifier_measures_equal_a_computation_with_timm_alone(source, tmp_path, measure):
    data = tensor_dataset(12, 5, seed=2)
    trainer = image_trainer(source, tmp_path, measure="auto" if measure == "agreement" else measure,
                            learning_rate=0.5)
    assert trainer.retention.measures == {"source": measure}
    trainer.train()
    trainer.save_model()
    logs = [log for log in trainer.state.log_history if "eval_source_forgetting" in log]
    assert [log["step"] for log in logs] == [0, 3] and logs[0]["eval_source_forgetting"] == 0.0
    start_features, start_predictions = source_model_outputs(source, source, data)
    features, predictions = source_model_outputs(tmp_path / "out", source, data)
    cka = linear_cka(start_features, features)
    assert logs[-1]["eval_source_cka"] == pytest.approx(cka, abs=1e-6) and cka < 0.9999
    if measure == "cka":
        assert logs[-1]["eval_source_forgetting"] == pytest.approx(1 - cka, abs=1e-6)
        return
    agreement = (predictions == start_predictions).double().mean().item()
    assert logs[-1]["eval_source_agreement"] == pytest.approx(agreement)
    if measure == "agreement":
        assert logs[-1]["eval_source_forgetting"] == pytest.approx(1 - agreement)
    else:
        labels = torch.tensor([row["labels"] for row in data])
        accuracy = (predictions == labels).double().mean().item()
        start_accuracy = (start_predictions == labels).double().mean().item()
        assert logs[-1]["eval_source_source_accuracy"] == pytest.approx(accuracy)
        assert logs[-1]["eval_source_forgetting"] == pytest.approx(start_accuracy - accuracy)


def test_linear_cka_is_one_for_rotated_features_and_drops_as_they_move():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(40, 6, generator=gen)
    rotation, _ = torch.linalg.qr(torch.randn(6, 6, generator=gen))
    assert linear_cka(x, x) == 1.0
    assert linear_cka(x, 3 * x @ rotation) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(x, x + torch.randn(40, 6, generator=gen)) < 0.9
    wide = torch.randn(5, 30, generator=gen)  # fewer examples than features: the Gram form, same value
    assert linear_cka(wide, wide + 0.1) == pytest.approx(1.0, abs=1e-12)


def test_resume_keeps_the_start_values_and_refuses_a_checkpoint_without_them(gpt2, tmp_path):
    straight = lm_trainer(gpt2, tmp_path / "a")
    straight.train()
    kwargs = dict(save_strategy="steps", save_steps=2)
    first = lm_trainer(gpt2, tmp_path / "b", max_steps=2, **kwargs)
    first.train()
    assert (tmp_path / "b" / "out" / "checkpoint-2" / "retention_start.safetensors").is_file()
    resumed = lm_trainer(gpt2, tmp_path / "b", **kwargs)
    resumed.train(resume_from_checkpoint=True)
    ends = [[log["eval_general_forgetting"] for log in t.state.log_history if "eval_general_forgetting" in log][-1]
            for t in (straight, resumed)]
    assert ends[1] == pytest.approx(ends[0], abs=1e-6)

    plain = lm_trainer(gpt2, tmp_path / "c", max_steps=2, sp_retention=None, sp_retention_kl=None, **kwargs)
    plain.train()
    with pytest.raises(ConfigError, match="holds no start values for retention set"):
        lm_trainer(gpt2, tmp_path / "c", **kwargs).train(resume_from_checkpoint=True)


def test_bad_retention_input_is_refused_in_one_line_before_training(gpt2, source, tmp_path):
    def refused(match, build):
        with pytest.raises(ConfigError, match=match) as err:
            build()
        assert "\n" not in str(err.value)

    model = GPT2LMHeadModel.from_pretrained(gpt2)
    train = padded_lm_batch(seed=1)

    def lm(evals, **values):
        return SPTrainer(model=model, args=sp_config(tmp_path, **values), train_dataset=train, eval_dataset=evals)

    refused(r"sp_retention names 'wiki', but eval_dataset's keys are 'target', 'general'",
            lambda: lm(lm_sets(), sp_retention="wiki"))
    refused("eval_dataset is not a dict of named sets", lambda: lm(padded_lm_batch(), sp_retention="general"))
    refused("Retention set 'general' is empty",
            lambda: lm({"general": padded_lm_batch().select([])}, sp_retention="general"))
    refused(r"Retention set 'general' has no 'input_ids' \(it gives text\)",
            lambda: lm({"general": Dataset.from_dict({"text": SENTENCES})}, sp_retention="general"))
    refused("sp_retention_kl names 'nope'", lambda: lm(lm_sets(), sp_retention_kl="nope"))
    refused("sp_retention_measure must be one of auto, loss, agreement, source_accuracy, cka; got 'ppl'",
            lambda: sp_config(tmp_path, sp_retention_measure="ppl"))
    refused("sp_retention must be comma-separated, distinct", lambda: sp_config(tmp_path, sp_retention="a,,b"))
    refused("sp_retention_measure='cka' compares the features that enter the task head",
            lambda: lm(lm_sets(), sp_retention="general", sp_retention_measure="cka"))
    # a classifier whose checkpoint is unknown (built from a config) has no source head to read
    random = SPTrainer
    refused("sp_retention_measure='source_accuracy' needs the source model's head",
            lambda: random(model=timm_classifier(), args=sp_config(tmp_path, sp_retention_measure="source_accuracy"),
                           train_dataset=tensor_dataset(), retention_datasets={"r": tensor_dataset()}))
    unlabelled = tensor_dataset(4, 5).remove_columns("labels")
    refused("retention set 'source' has no 'labels'",
            lambda: image_trainer(source, tmp_path, "source_accuracy", retention=unlabelled))
    refused("sp_retention_kl is the KL between the starting and the current next-token distributions",
            lambda: SPTrainer(model=timm_classifier(), args=sp_config(tmp_path, sp_retention_kl="t"),
                              train_dataset=tensor_dataset(), eval_dataset={"t": tensor_dataset()}))
    resized = GPT2LMHeadModel(gpt2_config())
    resized.resize_token_embeddings(resized.config.vocab_size + 8)  # rows the anchor has no start value for
    refused("sp_retention_kl rebuilds the starting model from the anchor",
            lambda: SPTrainer(model=resized, args=sp_config(tmp_path, sp_retention_kl="target",
                                                            sp_reference=gpt2),
                              train_dataset=train, eval_dataset=lm_sets()))


def test_auto_measure_and_construction_line(gpt2, source, tmp_path, caplog):
    caplog.set_level("INFO", logger="hf_l2sp")
    lm_trainer(gpt2, tmp_path)
    assert "hf_l2sp: retention sets general (loss); KL to the start on target" in caplog.text
    trainer = image_trainer(source, tmp_path)
    assert trainer.retention.measures == {"source": "agreement"}
    assert "retention sets source (agreement); source head: the source checkpoint's head (5 classes)" in caplog.text
    without_source = SPTrainer(model=timm_classifier(), args=sp_config(tmp_path), train_dataset=tensor_dataset(),
                               retention_datasets={"r": tensor_dataset()})
    assert without_source.retention.measures == {"r": "cka"}


def test_sft_trainer_with_retention_sets(gpt2, tmp_path):
    from transformers import AutoTokenizer

    SFTSPConfig, SFTSPTrainer = sft_sp_classes()

    args = SFTSPConfig(output_dir=str(tmp_path / "sft"), use_cpu=True, report_to="none", save_strategy="no",
                       max_steps=2, learning_rate=0.5, optim="sgd", per_device_train_batch_size=2, logging_steps=1,
                       disable_tqdm=True, max_length=16, regularizer="l2_sp", sp_alpha=0.1, eval_strategy="steps",
                       eval_steps=2, sp_retention="general", sp_retention_kl="target")
    trainer = SFTSPTrainer(model=GPT2LMHeadModel.from_pretrained(gpt2), args=args,
                           train_dataset=Dataset.from_dict({"text": SENTENCES[:4]}),
                           eval_dataset={"target": Dataset.from_dict({"text": SENTENCES[4:6]}),
                                         "general": Dataset.from_dict({"text": SENTENCES[6:8]})},
                           processing_class=AutoTokenizer.from_pretrained(gpt2))
    trainer.train()
    logs = [log for log in trainer.state.log_history if "eval_general_forgetting" in log]
    kl = [log["eval_target_kl"] for log in trainer.state.log_history if "eval_target_kl" in log]
    assert logs[0]["eval_general_forgetting"] == 0.0 and logs[-1]["eval_general_forgetting"] != 0.0
    assert kl[0] == 0.0 and kl[-1] > 0


def test_train_command_measures_a_retention_image_set(tmp_path):
    from hf_l2sp.cli import main

    from .helpers import image_run_assets, write_image_folder

    root = image_run_assets(tmp_path, train=12)
    retention = write_image_folder(tmp_path / "retention", per_class=3)
    out = tmp_path / "run"
    assert main(["train", "--model_name_or_path", str(root / "model"), "--dataset_name", str(root / "data"),
                 "--retention_dataset", retention, "--retention_split", "test", "--output_dir", str(out),
                 "--image_size", "32", "--max_steps", "2", "--per_device_train_batch_size", "4", "--use_cpu", "true",
                 "--eval_strategy", "steps", "--eval_steps", "2", "--report_to", "none", "--augmentation", "none",
                 "--dataloader_num_workers", "0"]) == 0
    results = json.loads((out / "all_results.json").read_text())
    assert "eval_retention_forgetting" in results and "eval_retention_agreement" in results
    summary = json.loads((out / "retention.json").read_text())
    assert summary["sets"][0]["name"] == "retention" and summary["sets"][0]["measure"] == "agreement"
    assert summary["target"]["metric"] == "eval_accuracy"
    assert "| retention | agreement | 1.0000 |" in (out / "README.md").read_text()


def test_source_head_reads_bf16_features_under_mixed_precision(source, tmp_path):
    """bf16 autocast hands the head bf16 features while the source head kept the checkpoint's fp32 values."""
    trainer = image_trainer(source, tmp_path, bf16=True)
    assert trainer.retention.measures == {"source": "agreement"}
    trainer.train()
    logs = [log for log in trainer.state.log_history if "eval_source_agreement" in log]
    assert logs[0]["eval_source_agreement"] == 1.0 and 0.0 <= logs[-1]["eval_source_agreement"] <= 1.0


def test_a_native_transformers_classifier_keeps_its_source_head_aside(tmp_path):
    """Beside TimmWrapper: a transformers ViT checkpoint with 5 classes, fine-tuned for 3; its `classifier` is the
    source head, read back from the checkpoint and applied to the CLS features."""
    from .helpers import vit_classifier

    vit_classifier(num_labels=5).save_pretrained(tmp_path / "vit")
    model, _ = load_backbone(str(tmp_path / "vit"), {0: "a", 1: "b", 2: "c"})
    args = sp_config(tmp_path, max_steps=2, eval_strategy="steps", eval_steps=2, learning_rate=0.5)
    trainer = SPTrainer(model=model, args=args, train_dataset=tensor_dataset(8, 3, size=16, seed=1),
                        eval_dataset=tensor_dataset(4, 3, size=16, seed=3),
                        retention_datasets={"source": tensor_dataset(6, 5, size=16, seed=2)})
    assert trainer.retention.measures == {"source": "agreement"} and trainer.retention.head_name == "classifier"
    assert trainer.retention.source_head.weight.shape[0] == 5
    trainer.train()
    logs = [log for log in trainer.state.log_history if "eval_source_agreement" in log]
    assert logs[0]["eval_source_forgetting"] == 0.0 and logs[0]["eval_source_cka"] == 1.0
    assert logs[-1]["eval_source_cka"] < 1.0
