"""SPTrainer on text models: which tensors are S and which are new, the penalty's closed form on GPT-2's Conv1D
layers, loss normalisation that keeps Trainer's where Trainer is right (token-level causal-LM losses), text datasets
with their raw columns, and the refusal to anchor nothing."""

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    Trainer,
    TrainingArguments,
)

from hf_l2sp import Reference, SPTrainer
from hf_l2sp.loading.model_parts import find_head_modules

from .helpers import sp_config
from .text_models import padded_lm_batch, save_distilbert_base, save_gpt2_lm, sentiment_dataset

GPT2_WEIGHTS = {"transformer.wte.weight", "transformer.wpe.weight", "transformer.h.0.attn.c_attn.weight",
                "transformer.h.0.attn.c_proj.weight", "transformer.h.0.mlp.c_fc.weight",
                "transformer.h.0.mlp.c_proj.weight"}


@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory):
    return save_gpt2_lm(tmp_path_factory.mktemp("gpt2"))


@pytest.fixture(scope="module")
def distilbert_folder(tmp_path_factory):
    return save_distilbert_base(tmp_path_factory.mktemp("distilbert"))


def test_gpt2_conv1d_and_embedding_weights_are_anchored(tmp_path, gpt2_folder):
    """Finding 1: GPT-2's transformers Conv1D layers (no nn.Linear) and its tied embedding are weights of S."""
    model = AutoModelForCausalLM.from_pretrained(gpt2_folder)
    trainer = SPTrainer(model=model, args=sp_config(tmp_path), train_dataset=padded_lm_batch())
    sets = trainer.sp_parameters()
    assert set(sets.anchored_names) == GPT2_WEIGHTS
    assert sets.head_names == []  # a causal LM from its own checkpoint has nothing new: no head, no error


def test_gpt2_penalty_value_and_gradient_are_the_closed_form(tmp_path, gpt2_folder):
    model = AutoModelForCausalLM.from_pretrained(gpt2_folder)
    reference = Reference.snapshot(model, [])
    gen = torch.Generator().manual_seed(3)
    for tensor in reference.tensors.values():
        tensor.add_(0.1 * torch.randn(tensor.shape, generator=gen))
    trainer = SPTrainer(model=model, args=sp_config(tmp_path, sp_alpha=0.3), reference=reference,
                        train_dataset=padded_lm_batch())
    sets = trainer.sp_parameters()
    terms = trainer.regularizer(sets)
    params = dict(model.named_parameters())
    expected = sum(0.5 * 0.3 * (params[n] - reference.tensors[n]).square().sum() for n in GPT2_WEIGHTS)
    torch.testing.assert_close(terms.penalty, expected.detach())
    terms.penalty.backward()
    for name in GPT2_WEIGHTS:
        torch.testing.assert_close(params[name].grad, 0.3 * (params[name] - reference.tensors[name]).detach())


def test_distilbert_new_layers_come_from_the_checkpoint(tmp_path, distilbert_folder):
    """Finding 2: `pre_classifier` is absent from the encoder checkpoint, so it is new (beta), not anchored."""
    model = AutoModelForSequenceClassification.from_pretrained(distilbert_folder, num_labels=2)
    assert find_head_modules(model) == ["classifier"]  # the module-name fallback alone misses pre_classifier
    trainer = SPTrainer(model=model, args=sp_config(tmp_path, sp_include="all"),
                        train_dataset=sentiment_dataset(distilbert_folder, keep_text=False))
    new = set(trainer.sp_parameters().head_names)
    assert new == {"pre_classifier.weight", "pre_classifier.bias", "classifier.weight", "classifier.bias"}
    assert not new & set(trainer.sp_reference.tensors)
    assert trainer.sp.new_tensors.checkpoint == distilbert_folder
    # At the start only beta acts, on exactly those tensors.
    terms = trainer.regularizer(trainer.sp_parameters())
    params = dict(model.named_parameters())
    torch.testing.assert_close(terms.penalty, 0.5 * 0.01 * sum(params[n].square().sum() for n in new).detach())


def test_without_a_readable_checkpoint_only_the_head_is_new(tmp_path):
    from .text_models import gpt2_config
    from transformers import GPT2ForSequenceClassification

    model = GPT2ForSequenceClassification(gpt2_config(num_labels=2))  # built in memory: no source checkpoint
    trainer = SPTrainer(model=model, args=sp_config(tmp_path), train_dataset=padded_lm_batch())
    assert trainer.sp_parameters().head_names == ["score.weight"]
    assert trainer.sp.new_tensors.checkpoint is None


def test_a_weight_penalty_that_anchors_nothing_is_refused(tmp_path, gpt2_folder):
    model = AutoModelForCausalLM.from_pretrained(gpt2_folder)
    for name, param in model.named_parameters():
        param.requires_grad_(name.endswith("bias"))  # BitFit: only biases train, and "weights" excludes them
    with pytest.raises(ValueError, match=r"anchors no tensor of GPT2LMHeadModel.*sp_include='all'"):
        SPTrainer(model=model, args=sp_config(tmp_path), train_dataset=padded_lm_batch())


def _train_lm(folder, tmp_path, trainer_class, args_class, accumulation, regularizer=None):
    model = AutoModelForCausalLM.from_pretrained(folder)
    common = dict(output_dir=str(tmp_path / f"{trainer_class.__name__}{accumulation}{regularizer}"), use_cpu=True,
                  report_to="none", save_strategy="no", max_steps=2, learning_rate=0.5, optim="sgd",
                  lr_scheduler_type="constant", per_device_train_batch_size=4 // accumulation,
                  gradient_accumulation_steps=accumulation, logging_steps=1, disable_tqdm=True, seed=0,
                  max_grad_norm=0.0)
    if regularizer is not None:
        common.update(regularizer=regularizer, sp_alpha=0.5)
    trainer = trainer_class(model=model, args=args_class(**common), train_dataset=padded_lm_batch())
    trainer.train()
    return {n: p.detach().clone() for n, p in model.named_parameters()}, trainer


@pytest.mark.parametrize("regularizer", ["none", "l2_sp"])
def test_causal_lm_accumulation_keeps_trainers_token_normalisation(tmp_path, gpt2_folder, regularizer):
    """Finding 3: padded sequences of 8, 2, 3 and 8 tokens; accumulation 2 x 2 equals 1 x 4 (token-level loss over
    the whole window), as plain Trainer has it."""
    from hf_l2sp import SPConfig

    one, trainer = _train_lm(gpt2_folder, tmp_path, SPTrainer, SPConfig, 1, regularizer)
    two, _ = _train_lm(gpt2_folder, tmp_path, SPTrainer, SPConfig, 2, regularizer)
    assert trainer.model_accepts_loss_kwargs and not trainer.sp.corrects_loss_normalisation
    start = AutoModelForCausalLM.from_pretrained(gpt2_folder).state_dict()
    assert max((one[n] - start[n]).abs().max() for n in one) > 1e-3  # the weights moved
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-5, atol=1e-6)
    if regularizer == "none":  # and exactly what plain Trainer does
        plain, _ = _train_lm(gpt2_folder, tmp_path, Trainer, TrainingArguments, 2)
        for name in one:
            torch.testing.assert_close(plain[name], two[name], rtol=1e-5, atol=1e-6)


def test_models_that_drop_num_items_in_batch_are_corrected(tmp_path, distilbert_folder):
    """A BERT-style classifier takes **kwargs but computes a per-micro-batch mean: that is where SPTrainer
    overrides Trainer (accumulation then divides by the steps)."""
    model = AutoModelForSequenceClassification.from_pretrained(distilbert_folder, num_labels=2)
    trainer = SPTrainer(model=model, args=sp_config(tmp_path),
                        train_dataset=sentiment_dataset(distilbert_folder, keep_text=False))
    assert trainer.sp.corrects_loss_normalisation and not trainer.model_accepts_loss_kwargs


def test_a_tokenized_dataset_with_its_text_column_trains_as_under_trainer(tmp_path, distilbert_folder):
    """Finding 4: the raw `text` column stays in the dataset and DataCollatorWithPadding pads the rest."""
    model = AutoModelForSequenceClassification.from_pretrained(distilbert_folder, num_labels=2)
    tokenizer = AutoTokenizer.from_pretrained(distilbert_folder)
    data = sentiment_dataset(distilbert_folder, keep_text=True)
    assert "text" in data.column_names
    trainer = SPTrainer(model=model, args=sp_config(tmp_path), train_dataset=data,
                        data_collator=DataCollatorWithPadding(tokenizer))
    trainer.train()
    assert trainer.state.log_history[0]["sp/penalty"] > 0


@pytest.mark.parametrize("kind", ["text-classification", "text-generation"])
def test_card_describes_the_task_the_model_was_trained_for(tmp_path, distilbert_folder, gpt2_folder, kind):
    """Finding 5: the card's pipeline tag, data description and how-to-load snippet follow the model's task."""
    from huggingface_hub import ModelCard

    if kind == "text-classification":
        model = AutoModelForSequenceClassification.from_pretrained(distilbert_folder, num_labels=2)
        data, loader = sentiment_dataset(distilbert_folder, keep_text=False), "AutoModelForSequenceClassification"
        collator = DataCollatorWithPadding(AutoTokenizer.from_pretrained(distilbert_folder))
    else:
        model, data = AutoModelForCausalLM.from_pretrained(gpt2_folder), padded_lm_batch()
        loader = "AutoModelForCausalLM"
        collator = None
    trainer = SPTrainer(model=model, args=sp_config(tmp_path, max_steps=1), train_dataset=data,
                        data_collator=collator)
    trainer.train()
    trainer.save_model()
    text = (tmp_path / "out" / "README.md").read_text()
    card = ModelCard.load(tmp_path / "out" / "README.md")
    assert card.data.pipeline_tag == kind and kind in card.data.tags and card.data.library_name == "transformers"
    assert f'pipeline("{kind}", model="out")' in text and f"{loader}.from_pretrained" in text
    assert "AutoTokenizer" in text
    assert f"fine-tuned for {kind.replace('-', ' ')}" in text
    for image_word in ("image", "images per class", "AutoImageProcessor"):
        assert image_word not in text.lower().replace("hf_l2sp", ""), image_word
    assert f"| examples | train {len(data)} |" in text


def test_anchor_keeps_a_bf16_models_dtype_and_the_penalty_is_computed_in_fp32(tmp_path, gpt2_folder):
    """w0 of a bf16 model is an exact bf16 copy (its parameters' bytes, not twice as many); Omega is fp32."""
    model = AutoModelForCausalLM.from_pretrained(gpt2_folder, dtype=torch.bfloat16)
    trainer = SPTrainer(model=model, args=sp_config(tmp_path, sp_alpha=0.3), train_dataset=padded_lm_batch())
    sets = trainer.sp_parameters()
    assert all(a.dtype == torch.bfloat16 for a in sets.anchors)
    assert all(torch.equal(a, p.detach()) for a, p in zip(sets.anchors, sets.anchored))
    anchor_bytes = sum(a.numel() * a.element_size() for a in sets.anchors)
    assert anchor_bytes == sum(p.numel() * p.element_size() for p in sets.anchored)
    with torch.no_grad():
        for p in sets.anchored:  # move the weights by bf16-representable steps
            p.add_(0.25)
    terms = trainer.regularizer(sets)
    assert terms.penalty.dtype == torch.float32
    expected = sum(0.5 * 0.3 * (p.float() - a.float()).square().sum() for p, a in zip(sets.anchored, sets.anchors))
    torch.testing.assert_close(terms.penalty, expected.detach())
    assert trainer.sp_reference.fingerprint()  # hashing bf16 anchors works (resume checks it)


def test_text_classifier_accumulation_two_by_two_equals_one_by_four(tmp_path, distilbert_folder):
    """The correction on a model that drops num_items_in_batch (DistilBERT's per-micro-batch mean), proven on the
    weights: without it, Trainer would skip the 1/accumulation division and the 2 x 2 step would be twice as long."""
    tokenizer = AutoTokenizer.from_pretrained(distilbert_folder)
    results = {}
    for accumulation in (1, 2):
        torch.manual_seed(0)  # the same new layers for both runs
        model = AutoModelForSequenceClassification.from_pretrained(distilbert_folder, num_labels=2,
                                                                   seq_classif_dropout=0.0)
        args = sp_config(tmp_path / str(accumulation), max_steps=2, per_device_train_batch_size=4 // accumulation,
                         gradient_accumulation_steps=accumulation, learning_rate=0.5, sp_alpha=0.5)
        trainer = SPTrainer(model=model, args=args, train_dataset=sentiment_dataset(distilbert_folder, False),
                            data_collator=DataCollatorWithPadding(tokenizer, padding="max_length", max_length=8))
        trainer.train()
        assert trainer.sp.corrects_loss_normalisation
        results[accumulation] = {n: p.detach().clone() for n, p in model.named_parameters()}
    torch.manual_seed(0)
    start = AutoModelForSequenceClassification.from_pretrained(distilbert_folder, num_labels=2).state_dict()
    assert max((results[1][n] - start[n]).abs().max() for n in results[1] if n in start) > 1e-3
    for name in results[1]:
        torch.testing.assert_close(results[2][name], results[1][name], rtol=1e-5, atol=1e-6)
