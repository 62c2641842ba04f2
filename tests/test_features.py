"""DELTA and BSS: formulas, attention, frozen source copy, composition with weight penalties."""

import pytest
import torch
from safetensors import safe_open
from torch import nn

from hf_l2sp import SPConfig, SPTrainer
from hf_l2sp.penalties.bss import bss_value
from hf_l2sp.penalties.delta import attention_from_rise

from .helpers import sp_config, tensor_dataset, timm_classifier


def test_bss_equals_a_direct_svd_and_its_gradient_matches_finite_differences():
    torch.manual_seed(0)
    features = torch.randn(6, 9, dtype=torch.float64)
    s = torch.linalg.svd(features, full_matrices=False).S
    assert bss_value(features, 1).item() == pytest.approx(s[-1].item() ** 2, rel=1e-10)
    assert bss_value(features, 2).item() == pytest.approx((s[-2:] ** 2).sum().item(), rel=1e-10)
    assert torch.autograd.gradcheck(lambda f: bss_value(f, 2), (features.clone().requires_grad_(True),))
    assert bss_value(features.float().to(torch.bfloat16), 1).dtype == torch.float32


def test_attention_is_softmax_of_zscore_over_five():
    rise = torch.tensor([0.0, 1.0, 2.0, 5.0])
    z = (rise - rise.mean()) / rise.std(unbiased=False)
    torch.testing.assert_close(attention_from_rise(rise), torch.softmax(z / 5, 0))
    torch.testing.assert_close(attention_from_rise(torch.ones(4)), torch.full((4,), 0.25))


def delta_trainer(tmp_path, model, **overrides):
    args = sp_config(tmp_path, **{"regularizer": "delta", "sp_delta_attention": "uniform", "sp_delta_alpha": 1.0,
                                  "sp_beta": 0.0, **overrides})
    return SPTrainer(model=model, args=args, train_dataset=tensor_dataset(8))


def run_delta(trainer, model, x):
    (feature,) = trainer.feature_regularizers
    model.train()
    with feature.capture(model):
        model(pixel_values=x)
    return feature.penalty({"pixel_values": x})


def test_delta_is_zero_at_w0_and_equals_a_hand_computation(tmp_path):
    model = timm_classifier("test_convnext")  # LayerNorm: train and eval forwards agree, so Omega(w0) is exactly 0
    trainer = delta_trainer(tmp_path, model)
    (feature,) = trainer.feature_regularizers
    assert feature.layers == ["timm_model.stages.0", "timm_model.stages.1", "timm_model.stages.2",
                              "timm_model.stages.3"]
    x = torch.randn(3, 3, 32, 32)
    assert run_delta(trainer, model, x).item() == 0.0
    source = timm_classifier("test_convnext")
    source.load_state_dict(model.state_dict())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    penalty = run_delta(trainer, model, x)
    expected = 0.0
    with torch.no_grad():
        for stage in range(4):
            a = model.timm_model.forward_intermediates(x, indices=[stage], intermediates_only=True)[0]
            b = source.timm_model.forward_intermediates(x, indices=[stage], intermediates_only=True)[0]
            expected += 0.5 * ((a - b) ** 2).sum().item() / (a.shape[2] * a.shape[3])  # uniform: C * W_c = 1
    assert penalty.item() == pytest.approx(expected, rel=1e-5)


class Toy(nn.Module):
    """A model whose `stage` output channel 0 is dead (always 0) and channels 1-3 carry the label."""

    main_input_name = "pixel_values"

    def __init__(self):
        super().__init__()
        self.stage = nn.Conv2d(3, 4, 1)
        with torch.no_grad():
            self.stage.weight.zero_()
            self.stage.bias.zero_()
            for c in range(3):
                self.stage.weight[c + 1, c] = 1.0
        self.classifier = nn.Linear(4, 3)
        self.config = type("Config", (), {"num_labels": 3})()

    def forward(self, pixel_values, labels=None, **kwargs):
        logits = self.classifier(torch.relu(self.stage(pixel_values)).mean((2, 3)))
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return {"loss": loss, "logits": logits}


def toy_data(n=48):
    from datasets import Dataset

    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(n) % 3
    x = 0.1 * torch.rand(n, 3, 4, 4, generator=gen)
    x[torch.arange(n), labels] += 1.0  # the label's channel is bright
    return Dataset.from_dict({"pixel_values": x.numpy(), "labels": labels.numpy()}).with_format("torch")


def test_channel_attention_shape_sum_and_dead_channel(tmp_path):
    model = Toy()
    args = sp_config(tmp_path, regularizer="delta", sp_delta_layers="stage", sp_delta_warmup_steps=200,
                     sp_delta_attention_batches=3, per_device_train_batch_size=16, sp_include="all")
    trainer = SPTrainer(model=model, args=args, train_dataset=toy_data())
    weights = trainer.feature_regularizers[0].weights["stage"]
    assert weights.shape == (4,) and weights.sum().item() == pytest.approx(1.0, abs=1e-6)
    assert weights.argmin().item() == 0 and weights[0] < weights[1:].min()
    assert torch.equal(model.stage.weight[0], torch.zeros_like(model.stage.weight[0]))  # warm-up ran on a copy
    trainer.train()
    trainer.save_model()
    with safe_open(str(tmp_path / "out" / "delta_attention.safetensors"), "pt") as f:
        torch.testing.assert_close(f.get_tensor("stage"), weights)
    reused = SPTrainer(model=Toy(), args=sp_config(tmp_path / "again", regularizer="delta", sp_delta_layers="stage",
                                                   sp_delta_attention=str(tmp_path / "out")),
                       train_dataset=toy_data())
    torch.testing.assert_close(reused.feature_regularizers[0].weights["stage"], weights)


def test_frozen_copy_gets_no_gradient_and_stays_out_of_checkpoints(tmp_path):
    model = timm_classifier()
    trainer = delta_trainer(tmp_path, model, max_steps=3, sp_delta_alpha=10.0)
    source = trainer.feature_regularizers[0].source
    before = {n: p.clone() for n, p in source.named_parameters()}
    trainer.train()
    assert all(not p.requires_grad and p.grad is None for p in source.parameters())
    assert all(torch.equal(before[n], p) for n, p in source.named_parameters())
    assert not source.training
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert not optimized & {id(p) for p in source.parameters()}
    logs = [log for log in trainer.state.log_history if "sp/delta" in log]
    assert logs and logs[-1]["sp/delta"] > 0
    trainer.save_model()
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
        assert len(list(f.keys())) == len(model.state_dict())
    assert not list(model.timm_model._forward_hooks.values())  # hooks removed after each forward


@pytest.mark.parametrize("spec", ["l2_sp+bss", "bss+l2_sp", "l2+delta"])
def test_composition_sums_parts_exactly(tmp_path, spec):
    model = timm_classifier("test_convnext")
    args = sp_config(tmp_path, regularizer=spec, sp_alpha=0.5, sp_beta=0.1, sp_bss_eta=0.3, sp_delta_alpha=0.2,
                     sp_delta_attention="uniform", max_steps=3, logging_steps=1)
    trainer = SPTrainer(model=model, args=args, train_dataset=tensor_dataset(12))
    trainer.train()
    feature = "bss" if "bss" in spec else "delta"
    logs = [log for log in trainer.state.log_history if "sp/penalty" in log]
    assert len(logs) == 3 and logs[-1][f"sp/{feature}"] > 0  # DELTA is 0 at the first step (w = w0)
    for log in logs:  # one micro-step per log: the parts add up to Omega
        rest = log["sp/penalty"] - log[f"sp/{feature}"] - log["sp/head_penalty"]
        if "l2_sp" in spec:
            assert rest == pytest.approx(0.25 * log["sp/distance"] ** 2, rel=1e-4, abs=1e-7)  # alpha/2 d^2
        else:
            assert rest > 0  # alpha/2 ||w_S||^2 of plain L2
        assert log["sp/head_penalty"] > 0


def test_bss_features_are_the_heads_input(tmp_path):
    model = timm_classifier("test_resnet")
    trainer = SPTrainer(model=model, args=sp_config(tmp_path, regularizer="bss", sp_bss_eta=1.0, sp_bss_k=2))
    (feature,) = trainer.feature_regularizers
    x = torch.randn(5, 3, 32, 32)
    model.eval()
    with feature.capture(model):
        model(pixel_values=x)
    value = feature.penalty({"pixel_values": x})
    pre_logits = model.timm_model.forward_head(model.timm_model.forward_features(x), pre_logits=True)
    assert value.item() == pytest.approx(bss_value(pre_logits, 2).item(), rel=1e-5)
    assert trainer.regularizer.name == "none"  # BSS alone brings no weight penalty


@pytest.mark.parametrize("spec, match", [
    ("l2_sp+l2", "at most one weight penalty"), ("delta+delta", "each feature penalty once"),
    ("l2_sp+dlta", r"Unknown regularizer 'l2_sp\+dlta'. Valid choices: .*delta, bss"),
])
def test_bad_compositions(tmp_path, spec, match):
    with pytest.raises(ValueError, match=match):
        SPConfig(output_dir=str(tmp_path), use_cpu=True, regularizer=spec)
    with pytest.raises(ValueError, match="act through the loss"):
        SPConfig(output_dir=str(tmp_path), use_cpu=True, regularizer="l2_sp+bss", sp_mode="grad")


def test_card_cites_the_feature_penalty(tmp_path):
    model = timm_classifier()
    trainer = SPTrainer(model=model, args=sp_config(tmp_path, regularizer="l2_sp+bss", max_steps=1),
                        train_dataset=tensor_dataset(4))
    trainer.train()
    trainer.save_model()
    text = (tmp_path / "out" / "README.md").read_text()
    assert "Omega_bss(w) = eta" in text and "@inproceedings{chen2019catastrophic" in text
    assert "@inproceedings{li2018explicit" in text and "feature penalty `bss`" in text
    assert "regularizer:bss" in text and "regularizer:l2_sp" in text


def test_resume_restores_the_runs_channel_attention(tmp_path):
    args = sp_config(tmp_path, regularizer="delta", sp_delta_layers="stage", sp_delta_warmup_steps=20,
                     per_device_train_batch_size=16, max_steps=2, save_strategy="steps", save_steps=2)
    first = SPTrainer(model=Toy(), args=args, train_dataset=toy_data())
    first.train()
    saved = first.feature_regularizers[0].weights["stage"].clone()
    later = SPTrainer(model=Toy(), args=sp_config(tmp_path, regularizer="delta", sp_delta_layers="stage",
                                                  sp_delta_warmup_steps=1, per_device_train_batch_size=16,
                                                  max_steps=3),
                      train_dataset=toy_data())
    assert not torch.allclose(later.feature_regularizers[0].weights["stage"], saved)  # another warm-up, other W
    later.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-2"))
    torch.testing.assert_close(later.feature_regularizers[0].weights["stage"], saved)


@pytest.mark.parametrize("kind, stages", [
    ("native_resnet", ["resnet.encoder.stages.0", "resnet.encoder.stages.1"]),
    ("native_convnext", ["convnext.encoder.stages.0", "convnext.encoder.stages.1"]),
])
def test_delta_finds_the_stages_of_native_transformers_models(tmp_path, kind, stages):
    """No sp_delta_layers needed: transformers CNNs keep their stages in encoder.stages; the drift report uses the
    same stages."""
    from hf_l2sp.artefacts.drift import compute_drift

    from .invariance_runs import build_model

    model = build_model(kind)
    trainer = delta_trainer(tmp_path, model)
    (feature,) = trainer.feature_regularizers
    assert feature.layers == stages
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    assert run_delta(trainer, model, torch.randn(2, 3, 32, 32)).item() > 0
    drift = compute_drift(model, trainer.sp_reference.tensors)
    assert [row["stage"] for row in drift["stages"]][:3] == ["stem", stages[0], stages[1]]


def test_delta_without_stages_asks_for_layers(tmp_path):
    from .helpers import vit_classifier

    with pytest.raises(ValueError, match="neither timm feature_info nor transformers encoder.stages. Set "
                                         "sp_delta_layers"):
        delta_trainer(tmp_path, vit_classifier())
