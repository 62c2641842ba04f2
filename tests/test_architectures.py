"""S is what the source checkpoint holds, for every architecture transformers' auto mappings list.

Each pair (task, model type) gets a tiny random source checkpoint saved with `save_pretrained`, and the task model is
loaded from it with `from_pretrained`, as a user would. `architectures.check_pair` then compares SPTrainer's S with
transformers' own load report, every anchor bit for bit with the checkpoint read back through transformers'
conversions, and L2-SP's value and gradient with their closed form. The default run covers a fixed sample with
every family (mixtures of experts, tied aliases, seq2seq, audio, vision, text) and trains each one step; the full
sweep is slow (`-m slow`).
"""

import re
from pathlib import Path

import pytest
import torch
from datasets import Dataset

from hf_l2sp import SPTrainer

from .architectures import build_pair, check_pair, pairs, training_rows
from .helpers import sp_config

SAMPLE = [
    ("causal-lm", "mixtral"),  # fused 3-D experts, router
    ("causal-lm", "qwen2_moe"),  # fused experts and a shared expert
    ("causal-lm", "gpt2"),  # transformers Conv1D, tied head
    ("causal-lm", "llama"),
    ("masked-lm", "xlm-roberta"),  # tied lm_head.decoder under its own name
    ("masked-lm", "camembert"),
    ("seq2seq-lm", "bart"),  # shared / encoder.embed_tokens / decoder.embed_tokens aliases
    ("seq2seq-lm", "t5"),
    ("sequence-classification", "bert"),  # base checkpoint: pooler kept, classifier new
    ("token-classification", "roberta"),  # base checkpoint: pooler dropped by the task model
    ("image-classification", "vit"),
    ("audio-classification", "wav2vec2"),  # weight-normed positional convolution
]


@pytest.mark.parametrize(("task", "model_type"), SAMPLE, ids=[f"{t}-{m}" for t, m in SAMPLE])
def test_s_is_what_the_checkpoint_holds_and_one_step_trains(task, model_type, tmp_path):
    pair = build_pair(task, model_type, tmp_path / "source")
    assert pair is not None, f"transformers could not build a tiny {model_type} {task} model"
    assert check_pair(pair) == []
    fresh = build_pair(task, model_type, tmp_path / "source2").model  # check_pair moved the weights
    before = {n: p.detach().clone() for n, p in fresh.named_parameters()}
    trainer = SPTrainer(model=fresh, args=sp_config(tmp_path, max_steps=1, per_device_train_batch_size=2,
                                                    learning_rate=0.01),
                        train_dataset=Dataset.from_list(training_rows(pair)).with_format("torch"))
    trainer.train()
    log = trainer.state.log_history[0]
    assert torch.isfinite(torch.tensor(log["loss"])) and log["sp/penalty"] >= 0
    assert any(not torch.equal(before[n], p) for n, p in fresh.named_parameters())


@pytest.mark.slow
def test_every_buildable_pair_of_the_auto_mappings_is_exact(tmp_path):
    """The coverage figure the docs state: pairs exact out of pairs plain transformers can build here."""
    built, failures = 0, {}
    for index, (task, model_type) in enumerate(pairs()):
        pair = build_pair(task, model_type, tmp_path / str(index))
        if pair is None:
            continue
        built += 1
        problems = check_pair(pair)
        if problems:
            failures[f"{task}/{model_type}"] = problems
    print(f"exact {built - len(failures)} / buildable {built}")
    assert failures == {}
    page = (Path(__file__).resolve().parents[1] / "docs" / "concepts" / "parameters.md").read_text()
    stated = re.search(r"\*\*(\d+) of (\d+) pairs that transformers builds", page)
    assert stated and (int(stated.group(1)), int(stated.group(2))) == (built - len(failures), built)


@pytest.mark.parametrize("model_type", ["mixtral", "qwen2_moe"])
def test_moe_expert_tensors_are_anchored_to_their_pretrained_values(model_type, tmp_path):
    """transformers fuses per-expert checkpoint tensors into 3-D `experts.*` on load: each is in S (the default
    sp_include='weights'), anchored to the checkpoint's values read back through the conversion, nothing is new."""
    from hf_l2sp import Reference

    pair = build_pair("causal-lm", model_type, tmp_path / "source")
    trainer = SPTrainer(model=pair.model, args=sp_config(tmp_path), train_dataset=Dataset.from_list(
        training_rows(pair)).with_format("torch"))
    sets = trainer.sp_parameters()
    experts = {n for n, _ in pair.model.named_parameters() if ".experts." in n}
    assert experts and experts <= set(sets.anchored_names)
    assert sets.head_names == [] and trainer.sp.new_tensors.names == []
    read = Reference.from_checkpoint(pair.source, pair.model, [])
    anchors = dict(zip(sets.anchored_names, sets.anchors))
    for name in experts:
        assert anchors[name].shape == dict(pair.model.named_parameters())[name].shape
        assert torch.equal(anchors[name], read.tensors[name])
    assert sets.coverage()["anchored_share"] >= 0.9


def test_a_tied_alias_is_anchored_whichever_name_the_checkpoint_uses(tmp_path):
    """XLM-R's masked-LM head is its word embedding under another name: anchored, not new."""
    pair = build_pair("masked-lm", "xlm-roberta", tmp_path / "source")
    trainer = SPTrainer(model=pair.model, args=sp_config(tmp_path, sp_include="all"))
    tied = [n for n, p in pair.model.named_parameters() if p is pair.model.get_input_embeddings().weight]
    assert tied and tied[0] in trainer.sp_parameters().anchored_names
    assert "lm_head.decoder.weight" not in trainer.sp.new_tensors.names


def _resized_llama(tmp_path, added=8):
    from transformers import AutoModelForCausalLM

    pair = build_pair("causal-lm", "llama", tmp_path / "source")
    model = AutoModelForCausalLM.from_pretrained(pair.source, tie_word_embeddings=False)
    vocab = model.get_input_embeddings().weight.shape[0]
    model.resize_token_embeddings(vocab + added, mean_resizing=False)
    return pair, model, vocab


def test_a_resized_vocabulary_anchors_its_pretrained_rows_and_treats_the_added_rows_as_new(tmp_path):
    """The logged penalty equals alpha/2 ||w[:V] - w0||^2 + beta/2 ||w[V:]||^2 on the embedding and the untied
    head (plus alpha/2 ||w - w0||^2 elsewhere), to 1e-6."""
    pair, model, vocab = _resized_llama(tmp_path)
    rows = training_rows(pair)
    trainer = SPTrainer(model=model, args=sp_config(tmp_path, max_steps=1, learning_rate=0.0, sp_alpha=0.3,
                                                    sp_beta=0.7, per_device_train_batch_size=2),
                        train_dataset=Dataset.from_list(rows).with_format("torch"))
    resized = {"model.embed_tokens.weight", "lm_head.weight"}
    assert trainer.sp.new_tensors.resized == {name: vocab for name in resized}
    start = {n: p.detach().double().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    trainer.train()
    weights = {n: p.detach().double() for n, p in model.named_parameters() if p.ndim >= 2}
    expected = 0.0
    for name, w in weights.items():
        if name in resized:
            expected += 0.15 * (w[:vocab] - start[name][:vocab]).square().sum() + 0.35 * w[vocab:].square().sum()
        else:
            expected += 0.15 * (w - start[name]).square().sum()
    assert trainer.state.log_history[0]["sp/penalty"] == pytest.approx(float(expected), rel=1e-6)


def test_lora_modules_to_save_of_a_resized_vocabulary_anchor_the_same_rows(tmp_path):
    from peft import LoraConfig, get_peft_model

    pair, model, vocab = _resized_llama(tmp_path)
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"],
                                                  modules_to_save=["embed_tokens", "lm_head"]))
    trainer = SPTrainer(model=peft_model, args=sp_config(tmp_path))
    sets = trainer.sp_parameters()
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert sets.anchored_rows[sets.anchored_names.index(name)] == vocab
        assert sets.head_from[sets.head_names.index(name)] == vocab


def test_weight_normed_convolutions_are_penalised_through_their_originals(tmp_path):
    """wav2vec2's positional convolution is weight-normed: its g and v (the stored, trained tensors) are in S
    under sp_include='weights'."""
    pair = build_pair("audio-classification", "wav2vec2", tmp_path / "source")
    trainer = SPTrainer(model=pair.model, args=sp_config(tmp_path))
    anchored = trainer.sp_parameters().anchored_names
    for original in ("original0", "original1"):
        assert f"wav2vec2.encoder.pos_conv_embed.conv.parametrizations.weight.{original}" in anchored


@pytest.mark.parametrize("kind", ["squares", "absolutes", "weighted", "constant"])
def test_penalty_sums_are_exact_at_a_hundred_million_values(kind):
    """Within 1e-6 of float64 at 1e8 values: random values, and equal values (w - w0 after a uniform step), where
    rounding errors cannot cancel."""
    from hf_l2sp.penalties.kernels import sum_of_absolutes, sum_of_squares, weighted_sum_of_squares

    x = torch.randn(100_000_003, generator=torch.Generator().manual_seed(0))
    if kind == "constant":
        x = torch.full_like(x, 1.2345e-3)
    if kind in ("squares", "constant"):
        value, exact = sum_of_squares([x]), x.double().square().sum()
    elif kind == "absolutes":
        value, exact = sum_of_absolutes([x]), x.double().abs().sum()
    else:
        c = torch.full_like(x, 0.25)
        value, exact = weighted_sum_of_squares([c], [x]), 0.25 * x.double().square().sum()
    assert abs(float(value) - float(exact)) <= 1e-6 * float(exact)


def test_coverage_is_logged_and_a_pretrained_head_treated_as_new_is_a_warning(tmp_path, caplog):
    from transformers import AutoModelForSequenceClassification

    pair = build_pair("sequence-classification", "bert", tmp_path / "source")
    pair.model.save_pretrained(tmp_path / "finetuned")  # a classifier checkpoint: it holds its head
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "finetuned")
    with caplog.at_level("INFO", logger="hf_l2sp"):
        SPTrainer(model=model, args=sp_config(tmp_path))
    (record,) = [r for r in caplog.records if "trainable values" in r.getMessage()]
    assert record.levelname == "WARNING" and "hold pretrained values but are treated as new" in record.getMessage()
    assert "% anchored" in record.getMessage() and "% new" in record.getMessage()


def test_mostly_free_values_are_a_warning_and_the_card_states_the_shares(tmp_path, caplog):
    class MostlyBiases(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(4, 2)
            self.offsets = torch.nn.Parameter(torch.zeros(64))

        def forward(self, x, labels=None):
            logits = self.linear(x) + self.offsets[:2]
            return {"loss": torch.nn.functional.cross_entropy(logits, labels), "logits": logits}

    data = Dataset.from_dict({"x": torch.randn(4, 4).tolist(), "labels": [0, 1, 0, 1]}).with_format("torch")
    with caplog.at_level("INFO", logger="hf_l2sp"):
        trainer = SPTrainer(model=MostlyBiases(), args=sp_config(tmp_path, sp_head="none", max_steps=1),
                            train_dataset=data)
    (record,) = [r for r in caplog.records if "trainable values" in r.getMessage()]
    assert record.levelname == "WARNING" and "more than half" in record.getMessage()
    assert "10.8% anchored, 0.0% new, 89.2% free" in record.getMessage()  # 8 of 74 values: the Linear's weight
    trainer.train()
    trainer.save_model()
    card = (tmp_path / "out" / "README.md").read_text()
    assert "| trainable values anchored / new / free | 10.8 % / 0.0 % / 89.2 % |" in card


@pytest.mark.parametrize("mode", ["grad", "decoupled"])
def test_a_resized_vocabulary_in_optimizer_side_modes_matches_the_loss_mode(tmp_path, mode):
    """The pretrained rows are anchored and the added rows new on the optimizer side too: one SGD step in 'grad'
    mode equals 'loss' mode's, and 'decoupled' (plain SGD, no clipping) as well."""
    results = {}
    for sp_mode in ("loss", mode):
        _, model, vocab = _resized_llama(tmp_path / sp_mode)
        pair = build_pair("causal-lm", "llama", tmp_path / sp_mode / "rows")
        trainer = SPTrainer(model=model, args=sp_config(tmp_path / sp_mode, max_steps=1, sp_mode=sp_mode,
                                                        sp_alpha=0.3, sp_beta=0.7, per_device_train_batch_size=2),
                            train_dataset=Dataset.from_list(training_rows(pair)).with_format("torch"))
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
        trainer.train()
        results[sp_mode] = {n: p.detach().clone() for n, p in model.named_parameters()}
    for name, value in results["loss"].items():
        torch.testing.assert_close(results[mode][name], value, rtol=1e-5, atol=1e-6, msg=name)
