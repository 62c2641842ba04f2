"""sp_mode 'grad' and 'decoupled' against the loss path; bf16 autocast and torch.compile against eager."""

import pytest
import torch

from hf_l2sp import SPConfig, SPTrainer

from .helpers import sp_config, tensor_dataset, timm_classifier, trainable_state
from .test_trainer import perturbed_reference


def run(tmp_path, name, model_arch="test_convnext", **overrides):
    model = timm_classifier(model_arch)
    reference = perturbed_reference(model, scale=0.05)
    args = sp_config(tmp_path / name, **{"max_steps": 3, "sp_alpha": 2.0, "sp_beta": 0.5, **overrides})
    trainer = SPTrainer(model=model, args=args, train_dataset=tensor_dataset(24), reference=reference)
    trainer.train()
    return trainer, trainable_state(model)


def assert_same(a, b, rtol=1e-5, atol=1e-6):
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=rtol, atol=atol, msg=name)


def differ(a, b):
    return max((a[n] - b[n]).abs().max().item() for n in a)


@pytest.mark.parametrize("regularizer", ["l2_sp", "l2"])
@pytest.mark.parametrize("extra", [{}, {"gradient_accumulation_steps": 2, "optim_args": "momentum=0.9"},
                                   {"bf16": True}], ids=["sgd", "ga2_momentum", "bf16_autocast"])
def test_closed_form_grad_equals_the_loss_path(tmp_path, regularizer, extra):
    _, loss = run(tmp_path, "loss", regularizer=regularizer, **extra)
    trainer, grad = run(tmp_path, "grad", regularizer=regularizer, sp_mode="grad", **extra)
    assert_same(grad, loss, rtol=1e-4 if extra.get("bf16") else 1e-5, atol=1e-5 if extra.get("bf16") else 1e-6)
    logs = [log for log in trainer.state.log_history if "sp/penalty" in log]
    assert logs and logs[-1]["sp/penalty"] > 0  # still logged, computed without a graph


def test_decoupled_equals_coupled_for_plain_sgd_and_differs_for_adam(tmp_path):
    _, coupled = run(tmp_path, "coupled")
    _, decoupled = run(tmp_path, "decoupled", sp_mode="decoupled")
    assert_same(decoupled, coupled)
    _, adam_coupled = run(tmp_path, "adam_coupled", optim="adamw_torch", learning_rate=0.01)
    _, adam_decoupled = run(tmp_path, "adam_decoupled", optim="adamw_torch", learning_rate=0.01, sp_mode="decoupled")
    assert differ(adam_coupled, adam_decoupled) > 1e-4  # with Adam they are different methods


def test_decoupled_pull_has_the_documented_size(tmp_path):
    """With a zero task gradient the step is exactly w - lr*alpha*(w - w0) (and w - lr*beta*w on the head)."""
    model = timm_classifier()
    reference = perturbed_reference(model)
    start = trainable_state(model)
    args = sp_config(tmp_path, max_steps=1, learning_rate=0.1, sp_alpha=2.0, sp_beta=0.5, sp_mode="decoupled",
                     sp_include="all")
    trainer = SPTrainer(model=model, args=args, train_dataset=tensor_dataset(4), reference=reference)
    trainer.compute_loss = _zero_task_loss(trainer)  # no task gradient: only the decoupled pull moves the weights
    trainer.train()
    sets = trainer.sp_parameters()
    for name, anchor in zip(sets.anchored_names, sets.anchors):
        expected = start[name] - 0.1 * 2.0 * (start[name] - anchor)
        torch.testing.assert_close(model.get_parameter(name), expected, rtol=1e-6, atol=1e-7)
    for name in sets.head_names:
        torch.testing.assert_close(model.get_parameter(name), start[name] * (1 - 0.1 * 0.5), rtol=1e-6, atol=1e-7)


def _zero_task_loss(trainer):
    original = trainer.compute_loss

    def compute_loss(model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = original(model, inputs, return_outputs=False, num_items_in_batch=num_items_in_batch)
        return loss * 0.0

    return compute_loss


@pytest.mark.parametrize("bad", ["l1_sp", "group_lasso_sp", "none"])
def test_optimizer_side_modes_need_a_quadratic_penalty(tmp_path, bad):
    with pytest.raises(ValueError, match=f"sp_mode='grad' needs a quadratic regularizer .*{bad!r}"):
        SPConfig(output_dir=str(tmp_path), use_cpu=True, regularizer=bad, sp_mode="grad")
    with pytest.raises(ValueError, match="sp_mode must be one of loss, grad, decoupled; got 'fused'"):
        SPConfig(output_dir=str(tmp_path), use_cpu=True, sp_mode="fused")


@pytest.mark.slow
@pytest.mark.parametrize("sp_mode", ["loss", "grad"])
def test_torch_compile_equals_eager(tmp_path, sp_mode):
    _, eager = run(tmp_path, "eager", sp_mode=sp_mode, max_steps=2)
    trainer, compiled = run(tmp_path, "compiled", sp_mode=sp_mode, max_steps=2, torch_compile=True)
    assert_same(compiled, eager, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("logging_steps", [1, 2])
def test_grad_mode_logs_loss_as_task_loss_plus_penalty(tmp_path, logging_steps):
    """In sp_mode 'grad' Omega is applied in the optimizer step, outside the returned loss; the logs still read
    loss = sp/task_loss + sp/penalty, equal to the loss path's, and so does the final train_loss (issue 22b)."""
    runs = {mode: run(tmp_path, mode, sp_mode=mode, logging_steps=logging_steps)[0] for mode in ("loss", "grad")}
    logs = {mode: [log for log in t.state.log_history if "sp/penalty" in log] for mode, t in runs.items()}
    assert len(logs["grad"]) == len(logs["loss"]) >= 1
    for got, want in zip(logs["grad"], logs["loss"]):
        assert got["loss"] == pytest.approx(got["sp/task_loss"] + got["sp/penalty"], rel=1e-6)
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)
    final = {mode: next(log["train_loss"] for log in t.state.log_history if "train_loss" in log)
             for mode, t in runs.items()}
    assert final["grad"] == pytest.approx(final["loss"], rel=1e-5)
