"""Trainer's own contract, kept by SPTrainer (and SPMixin over a Trainer subclass).

Under `regularizer="none"` and under `l2_sp` with both coefficients 0, SPTrainer must train exactly as `Trainer`:
the same weights bit for bit, the same logs apart from the `sp/` keys, on any model Trainer takes (a module with
scalar parameters that returns a loss, a Linear, an `nn.Sequential` with a `compute_loss_func`, a custom
`PreTrainedModel`), with `model_init`, gradient accumulation and gradient checkpointing. Under `l2_sp` it must accept
the same models. Resume accepts what Trainer resumes, missing checkpoints raise Trainer's error type, the NaN/inf
logging filter stays Trainer's, and search, predict and evaluate work.
"""

from __future__ import annotations

import math

import pytest
import torch
from datasets import Dataset
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel, Trainer, TrainingArguments

from hf_l2sp import SPConfig, SPMixin, SPTrainer

#: The ways a penalty can be off: SPTrainer must then be Trainer.
ZERO = [dict(regularizer="none"), dict(regularizer="l2_sp", sp_alpha=0.0, sp_beta=0.0)]
ACTIVE = dict(regularizer="l2_sp", sp_alpha=0.5, sp_beta=0.1)
#: Log keys that measure the machine, not the training.
TIMING = ("runtime", "per_second")


class ScalarModel(nn.Module):
    """y = a x + b with scalar parameters, returning its loss (as transformers' own Trainer tests do)."""

    def __init__(self, a=0.5, b=-0.25):
        super().__init__()
        self.a, self.b = nn.Parameter(torch.tensor(a)), nn.Parameter(torch.tensor(b))

    def forward(self, input_x, labels=None):
        y = self.a * input_x + self.b
        return {"loss": nn.functional.mse_loss(y, labels), "logits": y}


class LinearModel(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.linear = nn.Linear(1, 1)

    def forward(self, input_x, labels=None):
        y = self.linear(input_x.unsqueeze(-1)).squeeze(-1)
        return {"loss": nn.functional.mse_loss(y, labels), "logits": y}


class RegressionConfig(PretrainedConfig):
    model_type = "hf_l2sp_regression"

    def __init__(self, a=0.5, b=-0.25, **kwargs):
        super().__init__(**kwargs)
        self.a, self.b = a, b


class RegressionPreTrainedModel(PreTrainedModel):
    config_class = RegressionConfig
    base_model_prefix = "regression"
    supports_gradient_checkpointing = True

    def __init__(self, config):
        super().__init__(config)
        self.a = nn.Parameter(torch.tensor(float(config.a)))
        self.b = nn.Parameter(torch.tensor(float(config.b)))
        self.hidden = nn.Linear(1, 4)
        self.out = nn.Linear(4, 1)
        self.post_init()

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            generator = torch.Generator().manual_seed(module.in_features * 7 + module.out_features)
            with torch.no_grad():
                module.weight.copy_(0.3 * torch.randn(module.weight.shape, generator=generator))
                module.bias.zero_()

    def forward(self, input_x, labels=None):
        y = self.a * input_x + self.b + self.out(torch.tanh(self.hidden(input_x.unsqueeze(-1)))).squeeze(-1)
        loss = nn.functional.mse_loss(y, labels) if labels is not None else None
        return {"loss": loss, "logits": y}


def sequential():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(1, 3), nn.Tanh(), nn.Linear(3, 1), nn.Flatten(0))


def mse(outputs, labels, num_items_in_batch=None):
    return nn.functional.mse_loss(outputs, labels)


MODELS = {
    "scalars": (lambda: ScalarModel(), "input_x", {}),
    "linear": (lambda: LinearModel(), "input_x", {}),
    "sequential": (sequential, "input", {"compute_loss_func": mse}),  # labels kept by label_names (arguments)
    "pretrained": (lambda: RegressionPreTrainedModel(RegressionConfig()), "input_x", {}),
}


def regression_data(column: str, n: int = 16, seed: int = 0, marked: int | None = None) -> Dataset:
    """y = 2 x + 3 + noise; `marked`: that sample's x is 1e4 (ExplodingModel's loss is then inf)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=gen)
    if marked is not None:
        x[marked] = 1e4
    y = 2.0 * x + 3.0 + 0.1 * torch.randn(n, generator=gen)
    values = x.unsqueeze(-1) if column == "input" else x
    return Dataset.from_dict({column: values.tolist(), "labels": y.tolist()}).with_format("torch")


def arguments(tmp_path, name, sp: dict | None, **overrides):
    values = dict(output_dir=str(tmp_path / name), use_cpu=True, report_to="none", save_strategy="no", max_steps=6,
                  per_device_train_batch_size=4, learning_rate=0.1, logging_steps=1, disable_tqdm=True, seed=0,
                  data_seed=0, dataloader_num_workers=0, label_names=["labels"])
    values.update(overrides)
    return TrainingArguments(**values) if sp is None else SPConfig(**values, **sp)


def run(trainer_class, tmp_path, name, model_key, sp, use_model_init=False, resume=None, **overrides):
    build, column, extra = MODELS[model_key]
    model_args = {"model_init": build} if use_model_init else {"model": build()}
    trainer = trainer_class(args=arguments(tmp_path, name, sp, **overrides), train_dataset=regression_data(column),
                            **model_args, **extra)
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def weights(trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters()}


def plain_logs(trainer) -> list[dict]:
    return [{k: v for k, v in entry.items() if not k.startswith("sp/") and not any(t in k for t in TIMING)}
            for entry in trainer.state.log_history]


def assert_same_training(ours, theirs):
    mine, plain = weights(ours), weights(theirs)
    assert mine.keys() == plain.keys()
    for name in plain:
        assert torch.equal(mine[name], plain[name]), name
    assert plain_logs(ours) == plain_logs(theirs)


@pytest.mark.parametrize("sp", ZERO, ids=["none", "zero-coefficients"])
@pytest.mark.parametrize("model_key", list(MODELS))
@pytest.mark.parametrize("setup", ["plain", "model_init", "accumulation"])
def test_without_an_acting_penalty_training_is_trainers_bit_for_bit(tmp_path, sp, model_key, setup):
    options = dict(use_model_init=setup == "model_init")
    if setup == "accumulation":
        options.update(gradient_accumulation_steps=2, per_device_train_batch_size=2)
    theirs = run(Trainer, tmp_path, "plain", model_key, None, **options)
    ours = run(SPTrainer, tmp_path, "ours", model_key, sp, **options)
    assert_same_training(ours, theirs)


@pytest.mark.parametrize("sp", [*ZERO, ACTIVE], ids=["none", "zero-coefficients", "l2_sp"])
def test_gradient_checkpointing(tmp_path, sp):
    """On a transformers model that supports it (a tiny GPT-2): Trainer's result without an acting penalty."""
    from transformers import GPT2LMHeadModel

    from .text_models import gpt2_config, padded_lm_batch

    trainers = []
    for trainer_class, options in ((Trainer, None), (SPTrainer, sp)):
        torch.manual_seed(0)
        trainer = trainer_class(model=GPT2LMHeadModel(gpt2_config()), args=arguments(
            tmp_path, trainer_class.__name__, options, gradient_checkpointing=True, max_steps=2, label_names=None),
            train_dataset=padded_lm_batch())
        trainer.train()
        trainers.append(trainer)
    assert trainers[1].model.is_gradient_checkpointing
    if sp is not ACTIVE:
        assert_same_training(trainers[1], trainers[0])


@pytest.mark.parametrize("model_key", list(MODELS))
def test_a_penalty_trains_every_model_trainer_trains(tmp_path, model_key, caplog):
    """No detectable head: every trainable tensor is anchored to its start, none is new, and for a plain module a
    WARNING names sp_head (the documented default; a transformers model that is no classifier has no head to find).
    The penalty acts: the weights differ from Trainer's."""
    with caplog.at_level("WARNING", logger="hf_l2sp"):
        ours = run(SPTrainer, tmp_path, "ours", model_key, dict(ACTIVE, sp_include="all"))
    warned = any("sp_head" in r.getMessage() and "none is new" in r.getMessage() for r in caplog.records)
    assert warned == (model_key != "pretrained")
    sets = ours.sp_parameters()
    assert sets.head == [] and len(sets.anchored) == len(list(ours.model.parameters()))
    theirs = run(Trainer, tmp_path, "plain", model_key, None)
    assert any(not torch.equal(a, b) for a, b in zip(weights(ours).values(), weights(theirs).values()))
    assert all(math.isfinite(entry["sp/penalty"]) for entry in ours.state.log_history if "sp/penalty" in entry)


def test_a_model_with_only_scalar_parameters_under_none_is_not_refused(tmp_path):
    """'none' ignores sp_alpha: nothing to anchor is no reason to refuse (it was, for 'weights' on scalars)."""
    run(SPTrainer, tmp_path, "ours", "scalars", dict(regularizer="none", sp_alpha=0.1))


def test_alpha_with_nothing_to_anchor_is_refused_in_one_line(tmp_path):
    with pytest.raises(ValueError, match=r"sp_alpha=0.5 anchors no tensor of ScalarModel.*sp_include='all'"):
        run(SPTrainer, tmp_path, "ours", "scalars", dict(ACTIVE, sp_include="weights"))


@pytest.mark.parametrize("sp", [*ZERO, ACTIVE], ids=["none", "zero-coefficients", "l2_sp"])
def test_resume_from_a_plain_trainer_checkpoint(tmp_path, sp, caplog):
    saving = dict(save_strategy="steps", save_steps=3)
    run(Trainer, tmp_path, "plain", "pretrained", None, max_steps=3, **saving)
    checkpoint = str(tmp_path / "plain" / "checkpoint-3")
    with caplog.at_level("WARNING", logger="hf_l2sp"):
        ours = run(SPTrainer, tmp_path, "plain", "pretrained", dict(sp, sp_head="none"), resume=checkpoint, **saving)
    assert ours.state.global_step == 6
    if sp is ACTIVE:  # the model given is the pretrained one: its snapshot is w0, and the warning says so
        assert any("holds no anchor (a plain Trainer checkpoint)" in r.getMessage() for r in caplog.records)
    else:  # Trainer resumed from the same checkpoint
        theirs = run(Trainer, tmp_path, "again", "pretrained", None, resume=checkpoint, **saving)
        assert_same_training(ours, theirs)


def test_resume_true_finds_a_plain_trainer_checkpoint(tmp_path):
    run(Trainer, tmp_path, "plain", "linear", None, max_steps=3, save_strategy="steps", save_steps=3)
    ours = run(SPTrainer, tmp_path, "plain", "linear", dict(ACTIVE, sp_head="none"), resume=True,
               save_strategy="steps", save_steps=3)
    assert ours.state.global_step == 6


@pytest.mark.parametrize("model_state", ["fresh", "trained_further"])
@pytest.mark.parametrize("sp", [ZERO[0], ACTIVE], ids=["none", "l2_sp"])
def test_resume_into_a_model_that_holds_neither_w0_nor_the_checkpoint(tmp_path, model_state, sp):
    """Trainer loads the checkpoint into any model of the same architecture; SPTrainer takes w0 from the checkpoint,
    so the run equals the one resumed into the model the run started from."""
    sp, saving = dict(sp, sp_head="none"), dict(save_strategy="steps", save_steps=3)
    part = run(SPTrainer, tmp_path, "part", "pretrained", sp, max_steps=3, **saving)
    checkpoint = str(tmp_path / "part" / "checkpoint-3")
    usual = run(SPTrainer, tmp_path, "usual", "pretrained", sp, resume=checkpoint, **saving)
    if model_state == "fresh":
        model = RegressionPreTrainedModel(RegressionConfig(a=-1.0, b=2.0))
    else:
        model = part.model  # the same object, trained further after the checkpoint (two plain SGD steps)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        batch = regression_data("input_x", seed=3)[:8]
        for _ in range(2):
            optimizer.zero_grad()
            model(**batch)["loss"].backward()
            optimizer.step()
    trainer = SPTrainer(model=model, args=arguments(tmp_path, "other", sp, **saving),
                        train_dataset=regression_data("input_x"))
    trainer.train(resume_from_checkpoint=checkpoint)
    assert trainer.sp_reference.fingerprint() == usual.sp_reference.fingerprint()
    assert_same_training(trainer, usual)


def test_resume_with_another_batch_size(tmp_path):
    saving = dict(save_strategy="steps", save_steps=3)
    run(SPTrainer, tmp_path, "part", "linear", dict(ACTIVE, sp_head="none"), max_steps=3, **saving)
    ours = run(SPTrainer, tmp_path, "part", "linear", dict(ACTIVE, sp_head="none"), per_device_train_batch_size=2,
               resume=str(tmp_path / "part" / "checkpoint-3"), **saving)
    assert ours.state.global_step == 6


@pytest.mark.parametrize("trainer_class, sp", [(Trainer, None), (SPTrainer, ZERO[0]), (SPTrainer, ACTIVE)])
def test_a_missing_checkpoint_raises_the_error_trainer_raises(tmp_path, trainer_class, sp):
    with pytest.raises(ValueError):
        run(trainer_class, tmp_path, "x", "linear", sp and dict(sp, sp_head="none"),
            resume=str(tmp_path / "no-such-checkpoint"))


class ExplodingModel(ScalarModel):
    """Its loss is inf on the batches holding a marked sample: the weights then go non-finite."""

    def forward(self, input_x, labels=None):
        out = super().forward(input_x, labels)
        if bool((input_x > 1e3).any()):
            out["loss"] = out["loss"] * float("inf")
        return out


@pytest.mark.parametrize("sp", ZERO, ids=["none", "zero-coefficients"])
@pytest.mark.parametrize("nan_filter", [True, False])
def test_a_non_finite_loss_is_left_to_trainers_handling(tmp_path, sp, nan_filter):
    data = regression_data("input_x", marked=5)
    trainers = []
    for trainer_class, options in ((Trainer, None), (SPTrainer, sp)):
        torch.manual_seed(0)
        trainer = trainer_class(model=ExplodingModel(), args=arguments(
            tmp_path, trainer_class.__name__, options, logging_nan_inf_filter=nan_filter), train_dataset=data)
        trainer.train()
        trainers.append(trainer)
    theirs, ours = trainers
    assert [e.get("loss") for e in plain_logs(ours)] == pytest.approx(
        [e.get("loss") for e in plain_logs(theirs)], nan_ok=True)
    for name, value in weights(theirs).items():
        torch.testing.assert_close(weights(ours)[name], value, rtol=0, atol=0, equal_nan=True)


def test_predict_and_evaluate_are_trainers(tmp_path):
    data = regression_data("input_x")
    theirs = run(Trainer, tmp_path, "plain", "pretrained", None)
    ours = run(SPTrainer, tmp_path, "ours", "pretrained", ZERO[0])
    assert ours.evaluate(data) == pytest.approx(theirs.evaluate(data), rel=0, abs=0) or {
        k: v for k, v in ours.evaluate(data).items() if not any(t in k for t in TIMING)} == {
        k: v for k, v in theirs.evaluate(data).items() if not any(t in k for t in TIMING)}
    torch.testing.assert_close(torch.as_tensor(ours.predict(data).predictions),
                               torch.as_tensor(theirs.predict(data).predictions), rtol=0, atol=0)


def test_hyperparameter_search_with_optuna(tmp_path):
    pytest.importorskip("optuna")
    build, column, _ = MODELS["pretrained"]
    trainer = SPTrainer(model_init=build, args=arguments(tmp_path, "search", dict(ACTIVE, sp_head="none"),
                                                         eval_strategy="no"),
                        train_dataset=regression_data(column), eval_dataset=regression_data(column, seed=1))
    best = trainer.hyperparameter_search(direction="minimize", backend="optuna", n_trials=2,
                                         hp_space=lambda trial: {"sp_alpha": trial.suggest_float("sp_alpha", 0.0, 1.0),
                                                                 "learning_rate": 0.05})
    assert math.isfinite(best.objective)


class LoggingTrainer(Trainer):
    """A Trainer subclass of a user's, which SPMixin composes with."""

    def log(self, logs, start_time=None):
        logs["custom"] = 1.0
        super().log(logs, start_time)


class SPLoggingTrainer(SPMixin, LoggingTrainer):
    pass


@pytest.mark.parametrize("sp", ZERO, ids=["none", "zero-coefficients"])
def test_spmixin_over_a_trainer_subclass_keeps_the_contract(tmp_path, sp):
    theirs = run(LoggingTrainer, tmp_path, "plain", "sequential", None, gradient_accumulation_steps=2)
    ours = run(SPLoggingTrainer, tmp_path, "ours", "sequential", sp, gradient_accumulation_steps=2)
    assert_same_training(ours, theirs)


@pytest.mark.parametrize("sp", ZERO, ids=["none", "zero-coefficients"])
def test_without_an_acting_penalty_the_distance_is_computed_only_when_logged(tmp_path, sp, monkeypatch):
    """Only what is used is computed: 6 steps logged every 3 evaluate the weights twice, not once per step."""
    from hf_l2sp.penalties.none import NoRegularizer
    from hf_l2sp.penalties.weight import Regularizer

    owner = NoRegularizer if sp["regularizer"] == "none" else Regularizer  # whose __call__ the run uses
    calls, original = [], owner.__call__

    def counting(self, params):
        calls.append(1)
        return original(self, params)

    monkeypatch.setattr(owner, "__call__", counting)
    trainer = run(SPTrainer, tmp_path, "ours", "linear", dict(sp, sp_head="none"), logging_steps=3)
    assert len(calls) == 2
    logged = [e for e in trainer.state.log_history if "sp/distance" in e]
    assert len(logged) == 2 and logged[-1]["sp/distance"] > 0


def test_a_checkpoint_saved_over_is_incomplete_until_its_save_ends(tmp_path, monkeypatch):
    """Saving into a checkpoint-N folder that a previous run completed: its old marker goes first, so a save
    interrupted inside Trainer's own files leaves a folder that is never resumed from."""
    from hf_l2sp.anchor.resume import checkpoint_kind

    saving = dict(save_strategy="steps", save_steps=3, max_steps=3)
    run(SPTrainer, tmp_path, "out", "linear", dict(ACTIVE, sp_head="none"), **saving)
    checkpoint = tmp_path / "out" / "checkpoint-3"
    assert checkpoint_kind(checkpoint) == "sp"

    def interrupted(self, output_dir=None, _internal_call=False):
        raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "save_model", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run(SPTrainer, tmp_path, "out", "linear", dict(ACTIVE, sp_head="none"), **saving)
    assert checkpoint_kind(checkpoint) == "interrupted"
