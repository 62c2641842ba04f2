"""SPMixin over TRL's trainers, offline on a tiny GPT-2: the penalty's value and one optimizer step equal the closed
form, and accumulation keeps TRL's own token normalisation."""

from dataclasses import dataclass

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_l2sp import Reference, SPArguments, SPMixin

from .text_models import SENTENCES, save_gpt2_lm

trl = pytest.importorskip("trl")

ALPHA, LR = 0.5, 0.1


@dataclass
class SFTSPConfig(SPArguments, trl.SFTConfig):
    pass


class SFTSPTrainer(SPMixin, trl.SFTTrainer):
    pass


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_gpt2_lm(tmp_path_factory.mktemp("gpt2"))


def perturbed(model, scale=0.1):
    reference = Reference.snapshot(model, [])
    gen = torch.Generator().manual_seed(5)
    for tensor in reference.tensors.values():
        tensor.add_(scale * torch.randn(tensor.shape, generator=gen))
    return reference


def sft_step(folder, tmp_path, regularizer, accumulation=1, steps=1, **extra):
    model = AutoModelForCausalLM.from_pretrained(folder)
    reference = perturbed(model)
    args = SFTSPConfig(
        output_dir=str(tmp_path / f"{regularizer}{accumulation}"), use_cpu=True, report_to="none",
        save_strategy="no", max_steps=steps, learning_rate=LR, optim="sgd", lr_scheduler_type="constant",
        per_device_train_batch_size=4 // accumulation, gradient_accumulation_steps=accumulation, logging_steps=1,
        disable_tqdm=True, seed=0, max_grad_norm=0.0, max_length=16, regularizer=regularizer, sp_alpha=ALPHA,
        sp_beta=0.0, **extra)
    data = Dataset.from_dict({"text": SENTENCES[:4]})
    trainer = SFTSPTrainer(model=model, args=args, train_dataset=data,
                           processing_class=AutoTokenizer.from_pretrained(folder), reference=reference)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.train()
    return trainer, start, {n: p.detach().clone() for n, p in model.named_parameters()}, reference


def test_sft_penalty_and_one_step_equal_the_closed_form(tmp_path, folder):
    plain, start, after_plain, _ = sft_step(folder, tmp_path, "none")
    trainer, start_sp, after_sp, reference = sft_step(folder, tmp_path, "l2_sp")
    anchored = trainer.sp_parameters().anchored_names
    assert "transformer.h.0.attn.c_attn.weight" in anchored and len(anchored) == 6  # Conv1D and embeddings
    expected = sum(0.5 * ALPHA * (start_sp[n] - reference.tensors[n]).square().sum().item() for n in anchored)
    log = trainer.state.log_history[0]
    assert log["sp/penalty"] == pytest.approx(expected, rel=1e-5)
    assert log["loss"] == pytest.approx(log["sp/task_loss"] + log["sp/penalty"], rel=1e-4)
    for name in after_sp:
        pull = LR * ALPHA * (start_sp[name] - reference.tensors[name]) if name in anchored else 0.0
        torch.testing.assert_close(after_sp[name], after_plain[name] - pull, rtol=1e-5, atol=1e-6)
    assert max((after_sp[n] - after_plain[n]).abs().max().item() for n in anchored) > 1e-4


def test_sft_accumulation_keeps_trls_own_loss_and_adds_the_penalty_once(tmp_path, folder):
    """Under accumulation 2 x 2: with regularizer 'none' the weights are plain SFTTrainer's (TRL's own token
    normalisation stands), and l2_sp adds exactly -lr * alpha * (w - w0) to them: Omega enters the step once."""
    trainer, _, after_none, _ = sft_step(folder, tmp_path, "none", accumulation=2)
    assert not trainer.sp.corrects_loss_normalisation  # TRL computes its own loss: SPTrainer leaves it alone
    model = AutoModelForCausalLM.from_pretrained(folder)
    plain_args = trl.SFTConfig(
        output_dir=str(tmp_path / "plain"), use_cpu=True, report_to="none", save_strategy="no", max_steps=1,
        learning_rate=LR, optim="sgd", lr_scheduler_type="constant", per_device_train_batch_size=2,
        gradient_accumulation_steps=2, disable_tqdm=True, seed=0, max_grad_norm=0.0, max_length=16)
    trl.SFTTrainer(model=model, args=plain_args, train_dataset=Dataset.from_dict({"text": SENTENCES[:4]}),
                   processing_class=AutoTokenizer.from_pretrained(folder)).train()
    for name, param in model.named_parameters():
        torch.testing.assert_close(after_none[name], param.detach(), rtol=1e-6, atol=1e-7)
    trainer, start, after_sp, reference = sft_step(folder, tmp_path, "l2_sp", accumulation=2)
    anchored = trainer.sp_parameters().anchored_names
    for name in after_sp:
        pull = LR * ALPHA * (start[name] - reference.tensors[name]) if name in anchored else 0.0
        torch.testing.assert_close(after_sp[name], after_none[name] - pull, rtol=1e-5, atol=1e-6)


@dataclass
class DPOSPConfig(SPArguments, trl.DPOConfig):
    pass


class DPOSPTrainer(SPMixin, trl.DPOTrainer):
    pass


PREFERENCES = {"prompt": ["the movie was", "a cat", "it is", "the dog"], "chosen": [" great", " sat", " good", " ran"],
               "rejected": [" awful", " bad", " not", " mat"]}


def dpo_step(folder, tmp_path, regularizer, accumulation):
    model = AutoModelForCausalLM.from_pretrained(folder)
    reference = perturbed(model)
    args = DPOSPConfig(
        output_dir=str(tmp_path / f"dpo{regularizer}{accumulation}"), use_cpu=True, bf16=False, report_to="none",
        save_strategy="no", max_steps=1, learning_rate=LR, optim="sgd", lr_scheduler_type="constant",
        per_device_train_batch_size=4 // accumulation, gradient_accumulation_steps=accumulation, logging_steps=1,
        disable_tqdm=True, seed=0, max_grad_norm=0.0, regularizer=regularizer, sp_alpha=ALPHA, sp_beta=0.0)
    # DPOTrainer takes ref_model second: SPMixin hands every argument over by the trainer's own signature.
    trainer = DPOSPTrainer(model, None, args, train_dataset=Dataset.from_dict(PREFERENCES),
                           processing_class=AutoTokenizer.from_pretrained(folder), reference=reference)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.train()
    return trainer, start, {n: p.detach().clone() for n, p in model.named_parameters()}, reference


@pytest.mark.parametrize("accumulation", [1, 2])
def test_dpo_penalty_and_one_step_equal_the_closed_form(tmp_path, folder, accumulation):
    _, _, after_none, _ = dpo_step(folder, tmp_path, "none", accumulation)
    trainer, start, after_sp, reference = dpo_step(folder, tmp_path, "l2_sp", accumulation)
    anchored = trainer.sp_parameters().anchored_names
    assert len(anchored) == 6
    expected = sum(0.5 * ALPHA * (start[n] - reference.tensors[n]).square().sum().item() for n in anchored)
    assert trainer.state.log_history[0]["sp/penalty"] == pytest.approx(expected, rel=1e-5)
    for name in after_sp:
        pull = LR * ALPHA * (start[name] - reference.tensors[name]) if name in anchored else 0.0
        torch.testing.assert_close(after_sp[name], after_none[name] - pull, rtol=1e-5, atol=1e-6)
