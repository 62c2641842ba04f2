"""model_init and hyperparameter_search: every trial is built, anchored and penalised on its own."""

import pytest
import torch
from transformers import TrainerCallback

from hf_l2sp import SPTrainer

from .helpers import sp_config, tensor_dataset, timm_classifier

optuna = pytest.importorskip("optuna")


class AnchorProbe(TrainerCallback):
    """At the start of each training run: is the anchor the model's own starting weights, and which alpha runs?"""

    def __init__(self):
        self.trainer = None
        self.seen = []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        trainer = self.trainer
        sets = trainer.sp_parameters(model)
        same = all(torch.equal(p.detach().float(), a) for p, a in zip(sets.anchored, sets.anchors))
        first = sets.anchored_names[0]
        self.seen.append({"alpha": trainer.regularizer.alpha, "anchor_is_start": same,
                          "anchor": trainer.sp_reference.tensors[first].clone(),
                          "params_are_the_models": all(any(p is q for q in model.parameters())
                                                       for p in sets.anchored)})


def _native_resnet():
    from .invariance_runs import build_model

    return build_model("native_resnet")


@pytest.mark.parametrize("make", [lambda: timm_classifier(seed=3), _native_resnet], ids=["timm", "native_resnet"])
def test_model_init_builds_and_anchors_without_a_model(tmp_path, make):
    trainer = SPTrainer(model_init=make, args=sp_config(tmp_path), train_dataset=tensor_dataset(8))
    start = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    sets = trainer.sp_parameters()
    assert sets.anchored and all(any(p is q for q in trainer.model.parameters()) for p in sets.anchored)
    for name, anchor in zip(sets.anchored_names, sets.anchors):
        torch.testing.assert_close(anchor, start[name])  # the anchor is the model_init weights, not a stale model


def test_hyperparameter_search_anchors_each_trial_to_its_own_model(tmp_path):
    seeds = iter(range(10, 100))
    probe = AnchorProbe()

    def model_init(trial=None):  # a different initialisation per call, so a stale anchor would show
        return timm_classifier(seed=next(seeds))

    args = sp_config(tmp_path, max_steps=2, eval_strategy="steps", eval_steps=2, sp_alpha=0.5)
    trainer = SPTrainer(model_init=model_init, args=args, train_dataset=tensor_dataset(8),
                        eval_dataset=tensor_dataset(6, seed=1), callbacks=[probe])
    probe.trainer = trainer
    alphas = [0.02, 0.3, 2.0]

    def hp_space(trial):
        return {"sp_alpha": trial.suggest_categorical("sp_alpha", alphas)}

    sampler = optuna.samplers.GridSampler({"sp_alpha": alphas})
    best = trainer.hyperparameter_search(direction="minimize", backend="optuna", n_trials=3, hp_space=hp_space,
                                         sampler=sampler)
    assert len(probe.seen) == 3
    assert sorted(s["alpha"] for s in probe.seen) == sorted(alphas)  # each trial's alpha is the one penalising
    assert all(s["anchor_is_start"] and s["params_are_the_models"] for s in probe.seen)
    assert not torch.equal(probe.seen[0]["anchor"], probe.seen[1]["anchor"])  # each trial its own anchor
    assert best.hyperparameters["sp_alpha"] in alphas and best.objective > 0
