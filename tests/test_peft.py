"""L2-SP on PEFT LoRA adapters: the effective weight's distance to the frozen base, from the factors, exact.

A tiny BERT classifier (saved, then loaded as a Hub checkpoint arrives) with LoRA on query and value, B made
non-zero, the head in modules_to_save. Every value is checked against the merged weight W = W0 + s B A.
"""

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding

from hf_l2sp import SPTrainer

from .helpers import sp_config
from .text_models import save_bert_base, save_gpt2_lm, sentiment_dataset, sft_sp_classes

peft = pytest.importorskip("peft")

ALPHA, BETA, LR = 0.7, 0.3, 0.1
TARGETS = ("query", "value")


@pytest.fixture(scope="module")
def bert_folder(tmp_path_factory):
    return save_bert_base(tmp_path_factory.mktemp("bert"))


def lora_model(folder, seed=0, **config):
    torch.manual_seed(seed)
    base = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2)
    options = dict(r=4, lora_alpha=8, target_modules=list(TARGETS), modules_to_save=["classifier"],
                   task_type="SEQ_CLS", lora_dropout=0.0)
    options.update(config)
    model = peft.get_peft_model(base, peft.LoraConfig(**options))
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # B starts at 0 in PEFT: make the adapters differ from the base
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(0.3 * torch.randn(param.shape, generator=gen))
    return model


def lora_layers(model):
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def merged_distance(model, adapter="default"):
    """sum over adapted layers of ||W - W0||_F^2, with W formed explicitly (differentiable in A and B)."""
    total = 0.0
    for layer in lora_layers(model):
        b, a = layer.lora_B[adapter].weight, layer.lora_A[adapter].weight
        delta = b @ a if not layer.fan_in_fan_out else (b @ a).T  # GPT-2's Conv1D stores W transposed
        merged = layer.get_base_layer().weight + layer.scaling[adapter] * delta
        total = total + (merged - layer.get_base_layer().weight).square().sum()
    return total


def trainer_for(model, tmp_path, folder, **overrides):
    args = sp_config(tmp_path, **{"sp_alpha": ALPHA, "sp_beta": BETA, **overrides})
    return SPTrainer(model=model, args=args, train_dataset=sentiment_dataset(folder, keep_text=False),
                     data_collator=DataCollatorWithPadding(AutoTokenizer.from_pretrained(folder)))


@pytest.mark.parametrize("config", [{}, {"use_rslora": True}], ids=["lora", "rslora"])
def test_penalty_and_gradient_equal_autograd_through_the_merged_weight(tmp_path, bert_folder, config):
    model = lora_model(bert_folder, **config)
    expected_scaling = 8 / 4 ** 0.5 if config else 8 / 4
    assert all(layer.scaling["default"] == expected_scaling for layer in lora_layers(model))
    trainer = trainer_for(model, tmp_path, bert_folder)
    sets = trainer.sp_parameters()
    sets.direct_gradients = False  # gradients returned to autograd.grad (the trainer adds them to .grad itself)
    assert len(sets.lora) == 2 and sets.anchored == [] and trainer.sp_reference.tensors == {}  # no anchor copy
    assert set(sets.head_names) == {"classifier.weight"}  # the head copy in modules_to_save: beta
    terms = trainer.regularizer(sets)
    head = sets.head[0]
    expected = 0.5 * ALPHA * merged_distance(model) + 0.5 * BETA * head.square().sum()
    torch.testing.assert_close(terms.penalty, expected.detach())
    assert float(terms.penalty) > 1.0  # the "penalty 0.0" would fail here
    torch.testing.assert_close(terms.distance, merged_distance(model).detach().sqrt())
    lora_params = [p for n, p in model.named_parameters() if "lora_" in n]
    ours = torch.autograd.grad(terms.penalty, lora_params)
    reference = torch.autograd.grad(0.5 * ALPHA * merged_distance(model), lora_params)
    for got, want in zip(ours, reference):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_gradient_added_after_backward_equals_the_one_autograd_gets(tmp_path, bert_folder):
    """Adapters of one shape with different scalings (alpha_pattern) are batched together; the trainer's path adds
    their gradient to `.grad` once the backward pass has finished: onto no `.grad`, then onto one, it equals the
    gradient returned to autograd, which equals autograd's through the merged weight."""
    model = lora_model(bert_folder, alpha_pattern={"value": 16})
    assert sorted({layer.scaling["default"] for layer in lora_layers(model)}) == [2.0, 4.0]
    trainer = trainer_for(model, tmp_path, bert_folder)
    sets = trainer.sp_parameters()
    lora_params = [p for n, p in model.named_parameters() if "lora_" in n]
    sets.direct_gradients = False
    returned = torch.autograd.grad(trainer.regularizer(sets).penalty, lora_params)
    merged = torch.autograd.grad(0.5 * ALPHA * merged_distance(model), lora_params)
    sets.direct_gradients = True
    for param in lora_params:
        param.grad = None
    for times in (1, 2):
        trainer.regularizer(sets).penalty.backward()
        for param, got, want in zip(lora_params, returned, merged):
            torch.testing.assert_close(param.grad, times * got)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_group_lasso_on_adapters_equals_the_merged_rows(tmp_path, bert_folder):
    model = lora_model(bert_folder)
    trainer = trainer_for(model, tmp_path, bert_folder, regularizer="group_lasso_sp")
    value = trainer.regularizer(trainer.sp_parameters()).penalty
    expected = 0.0
    for layer in lora_layers(model):
        delta = layer.scaling["default"] * (layer.lora_B["default"].weight @ layer.lora_A["default"].weight)
        expected = expected + delta.shape[1] ** 0.5 * delta.norm(dim=1).sum()
    head = trainer.sp_parameters().head[0]
    torch.testing.assert_close(value, (ALPHA * expected + 0.5 * BETA * head.square().sum()).detach())


def test_only_the_active_adapter_is_penalised(tmp_path, bert_folder):
    model = lora_model(bert_folder)
    model.add_adapter("other", peft.LoraConfig(r=2, lora_alpha=2, target_modules=list(TARGETS), task_type="SEQ_CLS"))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B.other" in name:
                param.fill_(5.0)
    trainer = trainer_for(model, tmp_path, bert_folder)
    torch.testing.assert_close(trainer.regularizer(trainer.sp_parameters()).distance,
                               merged_distance(model, "default").detach().sqrt())


def run_steps(folder, tmp_path, regularizer, accumulation=1, steps=1):
    model = lora_model(folder)
    trainer = trainer_for(model, tmp_path / f"{regularizer}{accumulation}", folder, regularizer=regularizer,
                          max_steps=steps, learning_rate=LR, per_device_train_batch_size=4 // accumulation,
                          gradient_accumulation_steps=accumulation)
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainer.train()
    return model, start, {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}, trainer


def test_one_sgd_step_equals_the_closed_form(tmp_path, bert_folder):
    """w_l2sp - w_none = -lr * grad Omega: on B, alpha s^2 B (A A^T); on A, alpha s^2 (B^T B) A; on the head,
    beta w."""
    _, _, plain, _ = run_steps(bert_folder, tmp_path, "none")
    model, start, after, trainer = run_steps(bert_folder, tmp_path, "l2_sp")
    for layer_name in [n.rsplit(".lora_A", 1)[0] for n in start if ".lora_A." in n]:
        a, b = start[f"{layer_name}.lora_A.default.weight"], start[f"{layer_name}.lora_B.default.weight"]
        s = 2.0
        grad_b = ALPHA * s ** 2 * b @ (a @ a.T)
        grad_a = ALPHA * s ** 2 * (b.T @ b) @ a
        torch.testing.assert_close(after[f"{layer_name}.lora_B.default.weight"],
                                   plain[f"{layer_name}.lora_B.default.weight"] - LR * grad_b, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(after[f"{layer_name}.lora_A.default.weight"],
                                   plain[f"{layer_name}.lora_A.default.weight"] - LR * grad_a, rtol=1e-5, atol=1e-6)
    head = "base_model.model.classifier.modules_to_save.default.weight"
    torch.testing.assert_close(after[head], plain[head] - LR * BETA * start[head], rtol=1e-5, atol=1e-6)
    assert trainer.state.log_history[0]["sp/penalty"] > 1.0


def test_accumulation_two_by_two_equals_one_by_four(tmp_path, bert_folder):
    _, _, one, _ = run_steps(bert_folder, tmp_path, "l2_sp", accumulation=1, steps=2)
    _, _, two, _ = run_steps(bert_folder, tmp_path, "l2_sp", accumulation=2, steps=2)
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-5, atol=1e-6)


def test_save_load_and_merge(tmp_path, bert_folder):
    model, _, _, trainer = run_steps(bert_folder, tmp_path, "l2_sp", steps=2)
    trainer.save_model()
    out = tmp_path / "l2_sp1" / "out"
    card = (out / "README.md").read_text()
    assert "LoRA on 2 layers" in card and "pipeline_tag: text-classification" in card
    ids = AutoTokenizer.from_pretrained(bert_folder)(["a great film", "awful"], padding=True, return_tensors="pt")
    model.eval()
    with torch.no_grad():
        expected = model(**ids).logits
    base = AutoModelForSequenceClassification.from_pretrained(bert_folder, num_labels=2)
    loaded = peft.PeftModel.from_pretrained(base, str(out)).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**ids).logits, expected)
    merged_dir = tmp_path / "merged"
    trainer.save_merged_model(str(merged_dir))
    merged = AutoModelForSequenceClassification.from_pretrained(merged_dir).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(**ids).logits, expected, rtol=1e-5, atol=1e-5)
    assert "lora" not in " ".join(n for n, _ in merged.named_parameters())
    assert "LoRA on 2 layers" in (merged_dir / "README.md").read_text()
    assert trainer.model is model and any(".lora_A." in n for n, _ in model.named_parameters())  # still trainable


@pytest.mark.parametrize("regularizer, overrides, message", [
    ("l1_sp", {}, "'l1_sp' has no exact form on LoRA adapters"),
    ("l2", {}, "'l2' has no exact form on LoRA adapters"),
    ("l2_sp", {"sp_mode": "grad"}, "acts through the loss"),
    ("l2_sp+delta", {"sp_delta_attention": "uniform"}, "DELTA compares feature maps"),
])
def test_what_is_not_exact_on_adapters_is_refused(tmp_path, bert_folder, regularizer, overrides, message):
    with pytest.raises(ValueError, match=message):
        trainer_for(lora_model(bert_folder), tmp_path, bert_folder, regularizer=regularizer, **overrides)


def test_fisher_penalty_is_refused_on_adapters(tmp_path, bert_folder):
    """l2_sp_fisher needs F_j (W - W0)_j elementwise, i.e. B A for every layer and step: refused, like l1_sp."""
    from hf_l2sp.anchor.fisher_io import FisherDiagonal
    from hf_l2sp.anchor.parameters import check_adapters_supported
    from hf_l2sp.penalties.l2_sp_fisher import L2SPFisher

    trainer = trainer_for(lora_model(bert_folder), tmp_path, bert_folder)
    fisher = L2SPFisher(alpha=1.0, fisher=FisherDiagonal({"x": torch.ones(1)}))
    with pytest.raises(ValueError, match="'l2_sp_fisher' has no exact form on LoRA adapters"):
        check_adapters_supported(trainer.sp_parameters(), fisher, [], "loss")


def test_dora_and_other_adapter_types_are_refused(tmp_path, bert_folder):
    with pytest.raises(ValueError, match="DoRA .* refuse"):
        trainer_for(lora_model(bert_folder, use_dora=True), tmp_path, bert_folder)
    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(bert_folder, num_labels=2)
    ia3 = peft.get_peft_model(base, peft.IA3Config(target_modules=["query", "value"], feedforward_modules=[],
                                                   task_type="SEQ_CLS"))
    with pytest.raises(ValueError, match="IA3.* adapters .* are not supported"):
        trainer_for(ia3, tmp_path, bert_folder)


def test_sft_trainer_with_lora(tmp_path):
    """SPMixin + TRL's SFTTrainer + a LoRA causal LM (GPT-2's Conv1D layers: PEFT's fan_in_fan_out)."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    SFTSPConfig, SFTSPTrainer = sft_sp_classes()

    folder = save_gpt2_lm(tmp_path / "gpt2")
    model = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(folder),
                                peft.LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn"], fan_in_fan_out=True,
                                                task_type="CAUSAL_LM", lora_dropout=0.0))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.fill_(0.1)
    args = SFTSPConfig(output_dir=str(tmp_path / "sft"), use_cpu=True, report_to="none", save_strategy="no",
                       max_steps=1, max_length=16, learning_rate=0.1, optim="sgd", disable_tqdm=True,
                       logging_steps=1, regularizer="l2_sp", sp_alpha=ALPHA)
    trainer = SFTSPTrainer(model=model, args=args, train_dataset=Dataset.from_dict({"text": ["the cat sat"] * 4}),
                           processing_class=AutoTokenizer.from_pretrained(folder))
    expected = 0.5 * ALPHA * merged_distance(model).item()
    # group lasso groups the stored weight's dim-0 slices; GPT-2 stores W transposed, and so does the check
    from hf_l2sp.penalties.group_lasso_sp import GroupLassoSP

    rows = sum(layer.get_base_layer().weight.shape[1] ** 0.5 * (layer.scaling["default"] * (
        layer.lora_B["default"].weight @ layer.lora_A["default"].weight).T).norm(dim=1).sum()
        for layer in lora_layers(model))
    value, _ = GroupLassoSP(alpha=1.0).lora_penalty(trainer.sp_parameters().lora)
    torch.testing.assert_close(value, rows.detach())
    trainer.train()
    assert trainer.state.log_history[0]["sp/penalty"] == pytest.approx(expected, rel=1e-5)


def test_biases_trained_with_bias_all_are_anchored_to_their_start(tmp_path, bert_folder):
    model = lora_model(bert_folder, bias="all")
    trainer = trainer_for(model, tmp_path, bert_folder, sp_include="all")
    sets = trainer.sp_parameters()
    biases = [n for n in sets.anchored_names if n.endswith("bias")]
    assert biases and all(n in trainer.sp_reference.tensors for n in biases)  # a snapshot of those few tensors
    assert not any("lora_" in n or n.endswith("query.weight") for n in trainer.sp_reference.tensors)
    with torch.no_grad():
        for p in sets.anchored:
            p.add_(0.1)
    terms = trainer.regularizer(sets)
    expected = 0.5 * ALPHA * (merged_distance(model) + sum(0.01 * p.numel() for p in sets.anchored))
    expected = expected + 0.5 * BETA * sum(p.square().sum() for p in sets.head)
    torch.testing.assert_close(terms.penalty, expected.detach(), rtol=1e-5, atol=1e-6)


def test_drift_of_a_peft_model_groups_its_anchored_tensors_by_block(tmp_path, bert_folder):
    """The drift report's blocks are named as the tensors are (canonical), not with PEFT's wrapper prefix, which
    put every anchored tensor of a PEFT model into 'stem'."""
    from hf_l2sp.artefacts.drift import compute_drift

    model = lora_model(bert_folder, bias="all")
    trainer = trainer_for(model, tmp_path, bert_folder, sp_include="all")
    drift = compute_drift(model, trainer.sp_reference.tensors, set(trainer.sp_parameters().anchored_names))
    in_block = {row["name"] for row in drift["layers"] if row["stage"] == "bert.encoder.layer.0"}
    assert in_block and all(name.startswith("bert.encoder.layer.0.") for name in in_block)
    assert "bert.encoder.layer.0.attention.self.query.bias" in in_block


def test_the_construction_line_says_lora_keeps_no_copy_of_w0(tmp_path, bert_folder, caplog):
    """The docs say LoRA keeps no copy of w0: the construction line says the same, and names what it does copy
    (the trained copy of modules_to_save)."""
    caplog.set_level("INFO", logger="hf_l2sp")
    trainer = trainer_for(lora_model(bert_folder), tmp_path, bert_folder)
    line = next(r.getMessage() for r in caplog.records if "anchored" in r.getMessage())
    copied = len(trainer.sp_reference.tensors)
    assert "anchor: the frozen base weights (LoRA adapters: no copy of w0)" in line and "snapshot of" not in line
    assert (f"; {copied} other trainable tensor(s) copied" in line) if copied else ("copied" not in line)
