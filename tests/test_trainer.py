"""SPTrainer inside the real Trainer loop: exactness, gradient accumulation, eval loss, logging, failures."""

import math

import pytest
import torch
from transformers import TimmWrapperForImageClassification, Trainer, TrainerCallback, TrainingArguments

from hf_l2sp import Reference, SPConfig, SPTrainer
from hf_l2sp.loading.model_parts import find_head_modules

from .helpers import sp_config, tensor_dataset, timm_classifier, trainable_state, vit_classifier


def perturbed_reference(model, scale=0.05, seed=1):
    """Anchors away from the current weights, so the penalty gradient is large from the first step."""
    reference = Reference.snapshot(model, find_head_modules(model))
    gen = torch.Generator().manual_seed(seed)
    for t in reference.tensors.values():
        t.add_(scale * torch.randn(t.shape, generator=gen))
    return reference


class GradCapture(TrainerCallback):
    """Copies every gradient just before the first optimizer step."""

    def __init__(self):
        self.grads = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self.grads is None:
            self.grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def test_zero_coefficients_reproduce_plain_trainer_bit_for_bit(tmp_path):
    data = tensor_dataset(16)
    common = dict(output_dir=str(tmp_path / "plain"), use_cpu=True, report_to="none", save_strategy="no",
                  max_steps=3, per_device_train_batch_size=4, learning_rate=0.05, optim="sgd",
                  lr_scheduler_type="constant", logging_steps=1, disable_tqdm=True, seed=0, data_seed=0)
    plain_model = timm_classifier()
    Trainer(model=plain_model, args=TrainingArguments(**common), train_dataset=data).train()
    sp_model = timm_classifier()
    common["output_dir"] = str(tmp_path / "sp")
    trainer = SPTrainer(model=sp_model, args=SPConfig(**common, regularizer="l2_sp", sp_alpha=0.0, sp_beta=0.0,
                                                       sp_include="all"), train_dataset=data)
    trainer.train()
    assert any("sp/penalty" in log for log in trainer.state.log_history)  # the penalty path really ran
    for (name, p), q in zip(plain_model.named_parameters(), sp_model.parameters()):
        assert torch.equal(p, q), name


@pytest.mark.parametrize("make_model, size", [(lambda: timm_classifier("test_convnext"), 32),
                                              (vit_classifier, 16)], ids=["timm_convnext", "native_vit"])
def test_penalty_enters_each_optimizer_step_once_under_accumulation(tmp_path, make_model, size):
    """Same 8 samples as 1x8, 2x4 and 4x2 (micro-batch x accumulation): same weights after one step.

    Both models are batch-size independent (LayerNorm), so any difference is the penalty counted wrongly. The
    native ViT normalises its loss by num_items_in_batch (Trainer then skips the GA division); TimmWrapper does not.
    """
    data = tensor_dataset(8, size=size)
    results = []
    for batch, accumulation in [(8, 1), (4, 2), (2, 4)]:
        model = make_model()
        reference = perturbed_reference(model, scale=0.05)
        args = sp_config(tmp_path / f"{batch}x{accumulation}", max_steps=1, per_device_train_batch_size=batch,
                         gradient_accumulation_steps=accumulation, sp_alpha=5.0, sp_beta=1.0, learning_rate=0.1)
        SPTrainer(model=model, args=args, train_dataset=data, reference=reference).train()
        results.append(trainable_state(model))
    moved = max((results[0][n] - make_model().state_dict()[n]).abs().max().item() for n in results[0])
    assert moved > 0.01  # the penalty dominates the step, so a GA-fold error could not hide
    for other in results[1:]:
        for name in results[0]:
            torch.testing.assert_close(other[name], results[0][name], rtol=1e-5, atol=1e-6, msg=name)


def test_gradient_difference_is_the_closed_form_penalty_gradient(tmp_path):
    """grad(l2_sp) - grad(none) on the same batch = alpha (w - w0) on S and beta w on the head, read in the loop."""
    data = tensor_dataset(8)
    captured = {}
    for name in ("none", "l2_sp"):
        model = timm_classifier()
        reference = perturbed_reference(model)
        capture = GradCapture()
        args = sp_config(tmp_path / name, max_steps=1, per_device_train_batch_size=8, regularizer=name,
                         sp_alpha=0.7, sp_beta=0.3, gradient_accumulation_steps=1)
        trainer = SPTrainer(model=model, args=args, train_dataset=data, reference=reference, callbacks=[capture])
        trainer.train()
        captured[name] = capture.grads
    sets = trainer.sp_parameters()
    model = timm_classifier()  # same initial weights (same seed)
    params = dict(model.named_parameters())
    for name, anchor in zip(sets.anchored_names, sets.anchors):
        expected = 0.7 * (params[name].detach() - anchor)
        torch.testing.assert_close(captured["l2_sp"][name] - captured["none"][name], expected, atol=1e-5, rtol=1e-4)
    for name in sets.head_names:
        expected = 0.3 * params[name].detach()
        torch.testing.assert_close(captured["l2_sp"][name] - captured["none"][name], expected, atol=1e-5, rtol=1e-4)
    bn = "timm_model.conv1.1.weight"  # sp_include='weights': BatchNorm is free
    torch.testing.assert_close(captured["l2_sp"][bn], captured["none"][bn])


def test_huge_alpha_keeps_backbone_at_anchor_while_head_learns(tmp_path):
    data = tensor_dataset(16)
    distances, head_moves = {}, {}
    for alpha in (0.0, 1000.0):  # lr * alpha = 1: each step pulls S back to w0, the task moves it lr * grad
        model = timm_classifier("test_convnext")
        start = trainable_state(model)
        args = sp_config(tmp_path / str(alpha), max_steps=50, learning_rate=1e-3, sp_alpha=alpha, sp_beta=0.0,
                         sp_include="all")
        trainer = SPTrainer(model=model, args=args, train_dataset=data)
        trainer.train()
        sets = trainer.sp_parameters()
        distances[alpha] = math.sqrt(sum((p.detach() - a).square().sum().item()
                                         for p, a in zip(sets.anchored, sets.anchors)))
        head = "timm_model.head.fc.weight"
        head_moves[alpha] = (model.get_parameter(head) - start[head]).norm().item()
    assert distances[0.0] > 0.05
    assert distances[1000.0] < 0.1 * distances[0.0]
    assert head_moves[1000.0] > 0.3 * head_moves[0.0] > 0


def test_eval_loss_excludes_the_penalty(tmp_path):
    data = tensor_dataset(8)
    losses = {}
    for name in ("none", "l2_sp"):
        model = timm_classifier()
        trainer = SPTrainer(model=model, args=sp_config(tmp_path / name, regularizer=name, sp_alpha=100.0),
                            eval_dataset=data, reference=perturbed_reference(model))
        losses[name] = trainer.evaluate()["eval_loss"]
    assert losses["l2_sp"] == losses["none"]


def test_logs_hold_penalty_parts_averaged_per_window(tmp_path):
    model = timm_classifier()
    args = sp_config(tmp_path, max_steps=4, logging_steps=1, sp_alpha=2.0, sp_beta=0.5)
    trainer = SPTrainer(model=model, args=args, train_dataset=tensor_dataset(16), reference=perturbed_reference(model))
    trainer.train()
    logs = [log for log in trainer.state.log_history if "sp/penalty" in log]
    assert len(logs) == 4
    for log in logs:  # one micro-step per window: Omega = alpha/2 d^2 + head part exactly
        assert log["sp/penalty"] == pytest.approx(2.0 / 2 * log["sp/distance"] ** 2 + log["sp/head_penalty"],
                                                  rel=1e-5)
        assert log["sp/distance"] > 0 and log["sp/head_penalty"] > 0
    assert logs[0]["sp/distance"] != logs[-1]["sp/distance"]


def test_logs_average_over_accumulated_micro_steps(tmp_path):
    model = timm_classifier()
    args = sp_config(tmp_path, max_steps=2, logging_steps=2, per_device_train_batch_size=2,
                     gradient_accumulation_steps=2, regularizer="none")
    trainer = SPTrainer(model=model, args=args, train_dataset=tensor_dataset(8))
    trainer.train()
    (log,) = [log for log in trainer.state.log_history if "sp/distance" in log]
    assert log["sp/penalty"] == 0.0 and log["sp/distance"] > 0


def test_nan_penalty_stops_before_any_checkpoint(tmp_path):
    model = timm_classifier()
    reference = Reference.snapshot(model, find_head_modules(model))
    next(iter(reference.tensors.values()))[0] = float("nan")
    args = sp_config(tmp_path, max_steps=3, save_strategy="steps", save_steps=1, logging_steps=5)
    trainer = SPTrainer(model=model, args=args, train_dataset=tensor_dataset(16), reference=reference)
    with pytest.raises(FloatingPointError, match=r"l2_sp penalty became NaN/inf at optimizer step 1"):
        trainer.train()
    assert not list((tmp_path / "out").glob("checkpoint-*"))


def test_anchor_is_outside_the_model_and_not_saved(tmp_path):
    model = timm_classifier()
    trainer = SPTrainer(model=model, args=sp_config(tmp_path), train_dataset=tensor_dataset(8))
    n_state = len(model.state_dict())
    trainer.train()
    trainer.save_model(str(tmp_path / "saved"))
    assert len(model.state_dict()) == n_state
    from safetensors import safe_open

    with safe_open(str(tmp_path / "saved" / "model.safetensors"), "pt") as f:
        assert len(list(f.keys())) == n_state
    anchor = trainer.sp_reference.tensors["timm_model.conv1.0.weight"]
    assert anchor.dtype == torch.float32 and anchor.data_ptr() != model.timm_model.conv1[0].weight.data_ptr()
    assert "timm_model.fc.weight" not in trainer.sp_reference.tensors


def test_reference_from_checkpoint_equals_snapshot(tmp_path):
    timm_classifier(num_labels=5).save_pretrained(tmp_path / "source")  # a source with another head
    model = TimmWrapperForImageClassification.from_pretrained(  # the usual way: pretrained backbone, new 3-way head
        tmp_path / "source", num_labels=3, ignore_mismatched_sizes=True)
    args = sp_config(tmp_path, sp_reference=str(tmp_path / "source"), sp_include="all")
    trainer = SPTrainer(model=model, args=args)
    snap = Reference.snapshot(model, find_head_modules(model))
    assert trainer.sp_reference.tensors.keys() == snap.tensors.keys()
    for k in snap.tensors:
        assert torch.equal(trainer.sp_reference.tensors[k], snap.tensors[k])
    assert trainer.sp_parameters().head_names == ["timm_model.fc.weight", "timm_model.fc.bias"]


def test_reference_head_of_the_same_shape_is_anchored(tmp_path):
    """S is decided by the reference: a source head of the same shape is a pretrained tensor like any other."""
    timm_classifier(num_labels=3).save_pretrained(tmp_path / "source")
    trainer = SPTrainer(model=timm_classifier(num_labels=3),
                        args=sp_config(tmp_path, sp_reference=str(tmp_path / "source")))
    assert "timm_model.fc.weight" in trainer.sp_parameters().anchored_names


def test_reference_of_another_architecture_is_refused(tmp_path):
    timm_classifier("resnet10t").save_pretrained(tmp_path / "other")
    with pytest.raises(ValueError, match=r"does not match TimmWrapperForImageClassification: model parameters "
                       r"missing from the reference: layer3.0.conv3.weight.*shape mismatches outside the head: "
                       r"bn1.bias: reference \(64,\) vs model \(32,\)"):
        SPTrainer(model=timm_classifier(), args=sp_config(tmp_path, sp_reference=str(tmp_path / "other")))


def test_training_arguments_are_refused_with_a_fix(tmp_path):
    with pytest.raises(TypeError, match="needs its arguments to include SPArguments.*Replace TrainingArguments"):
        SPTrainer(model=timm_classifier(), args=TrainingArguments(output_dir=str(tmp_path), use_cpu=True))


def test_native_model_head_and_anchor(tmp_path):
    model = vit_classifier()
    trainer = SPTrainer(model=model, args=sp_config(tmp_path, sp_include="all"))
    sets = trainer.sp_parameters()
    assert sets.head_names == ["classifier.weight", "classifier.bias"]
    assert len(sets.anchored) == sum(1 for _ in model.parameters()) - 2


def test_sp_head_override_and_typo(tmp_path):
    model = timm_classifier()
    trainer = SPTrainer(model=model, args=sp_config(tmp_path, sp_head="none"))
    assert trainer.sp_parameters().head_names == []
    with pytest.raises(ValueError, match=r"sp_head names module\(s\) \['fcc'\].*Top-level modules: \['timm_model'\]"):
        SPTrainer(model=timm_classifier(), args=sp_config(tmp_path, sp_head="fcc"))
