"""sp_mode 'grad' and 'decoupled' against the loss path; bf16 autocast and torch.compile against eager."""

import pytest
import torch
from datasets import Dataset

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


@pytest.mark.parametrize("sp_mode", ["grad", "decoupled"])
@pytest.mark.parametrize("logging_steps", [1, 2])
def test_side_modes_log_omega_of_the_logging_step(tmp_path, sp_mode, logging_steps):
    """Where Omega acts in the optimizer step (outside the returned loss), its value is computed only at the steps
    that log and at the last: sp/penalty is Omega at the logging step, before its update, which is the loss path's
    value at that step (plain SGD: the same weights in every mode); loss = sp/task_loss + sp/penalty; the final
    train_loss counts each logged value for every step of its window (issue 38). With a log at every step all of
    it equals the loss path's (issue 22b)."""
    every_step = run(tmp_path, "loss", logging_steps=1)[0]
    omega = {log["step"]: log for log in every_step.state.log_history if "sp/penalty" in log}
    trainer = run(tmp_path, sp_mode, sp_mode=sp_mode, logging_steps=logging_steps)[0]
    logs = [log for log in trainer.state.log_history if "sp/penalty" in log]
    assert [log["step"] for log in logs] == list(range(logging_steps, 4, logging_steps))
    for log in logs:
        assert log["sp/penalty"] == pytest.approx(omega[log["step"]]["sp/penalty"], rel=1e-5)
        assert log["loss"] == pytest.approx(log["sp/task_loss"] + log["sp/penalty"], rel=1e-6)
        if logging_steps == 1:
            assert log["loss"] == pytest.approx(omega[log["step"]]["loss"], rel=1e-5)
    final = {name: next(log["train_loss"] for log in t.state.log_history if "train_loss" in log)
             for name, t in (("loss", every_step), ("side", trainer))}
    per_step = [omega[step]["sp/penalty"] for step in (1, 2, 3)]
    counted = per_step if logging_steps == 1 else [per_step[1], per_step[1], per_step[2]]  # window 1-2, then 3
    assert final["side"] == pytest.approx(final["loss"] - sum(per_step) / 3 + sum(counted) / 3, rel=1e-5)


def test_a_log_the_trainer_could_not_foresee_measures_omega_then(tmp_path):
    """logging_strategy 'epoch': the end of the first epoch (step 3 of 6) is not known to log in advance, so that
    log takes its own pass at the weights it finds, after step 3's update: the loss path's value at step 4. The last
    step (6) is known to end the run and measures before its update, as the loss path does."""
    every_step = run(tmp_path, "loss", logging_steps=1, max_steps=6, per_device_train_batch_size=8)[0]
    omega = {log["step"]: log["sp/penalty"] for log in every_step.state.log_history if "sp/penalty" in log}
    trainer = run(tmp_path, "epoch", sp_mode="grad", max_steps=-1, num_train_epochs=2, logging_strategy="epoch",
                  per_device_train_batch_size=8)[0]
    logs = {log["step"]: log for log in trainer.state.log_history if "sp/penalty" in log}
    assert sorted(logs) == [3, 6]
    assert logs[3]["sp/penalty"] == pytest.approx(omega[4], rel=1e-5)
    assert logs[6]["sp/penalty"] == pytest.approx(omega[6], rel=1e-5)
    assert omega[3] != pytest.approx(omega[4], rel=1e-3)  # the two points differ: the check can fail
    # train_loss: each logged value for the 3 steps of its window (the log's own pass counts no step)
    final = {name: next(log["train_loss"] for log in t.state.log_history if "train_loss" in log)
             for name, t in (("loss", every_step), ("epoch", trainer))}
    counted = 3 * omega[4] + 3 * omega[6]
    assert final["epoch"] == pytest.approx(final["loss"] - sum(omega.values()) / 6 + counted / 6, rel=1e-5)


@pytest.mark.parametrize("sp_mode", ["grad", "decoupled"])
def test_side_modes_log_omega_of_the_logging_step_on_a_causal_lm(tmp_path, sp_mode):
    """The same promise on a native transformers causal LM (GPT-2, tied embedding): with a log every 2 steps,
    sp/penalty is the loss path's value at the logging step and loss = sp/task_loss + sp/penalty."""
    from transformers import GPT2LMHeadModel

    from .text_models import gpt2_config

    rows = [[5, 6, 7, 8, 9, 10, 11, 12]] * 12
    data = Dataset.from_dict({"input_ids": rows, "labels": rows})

    def lm_run(name, **overrides):
        torch.manual_seed(0)
        model = GPT2LMHeadModel(gpt2_config())
        reference = perturbed_reference(model, scale=0.05)
        args = sp_config(tmp_path / name, **{"max_steps": 4, "sp_alpha": 2.0, "per_device_train_batch_size": 2,
                                             **overrides})
        trainer = SPTrainer(model=model, args=args, train_dataset=data, reference=reference)
        trainer.train()
        return [log for log in trainer.state.log_history if "sp/penalty" in log]

    omega = {log["step"]: log["sp/penalty"] for log in lm_run("loss", logging_steps=1)}
    logs = lm_run(sp_mode, sp_mode=sp_mode, logging_steps=2)
    assert [log["step"] for log in logs] == [2, 4]
    for log in logs:
        assert log["sp/penalty"] == pytest.approx(omega[log["step"]], rel=1e-5)
        assert log["loss"] == pytest.approx(log["sp/task_loss"] + log["sp/penalty"], rel=1e-6)
    assert omega[1] != pytest.approx(omega[2], rel=1e-4)  # a window average would differ: the check can fail
