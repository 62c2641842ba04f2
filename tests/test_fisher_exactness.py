"""estimate_fisher is exact on every timm test CNN and a native transformers ResNet, or the layer goes to vmap.

Reference: the paper's definition computed by brute force, one autograd backward per (sample, class) for `exact`
and per (sample, draw) for `sampled`, with the same draws. Eval mode with non-trivial BatchNorm statistics.
"""

import json

import pytest
import torch
from torch import nn

from hf_l2sp.anchor import per_sample
from hf_l2sp.anchor.fisher import estimate_fisher
from hf_l2sp.loading.forward import call_image_model, logits_of

ARCHITECTURES = ["test_resnet", "test_efficientnet", "test_efficientnet_gn", "test_efficientnet_evos", "test_nfnet",
                 "test_byobnet", "test_convnext", "native_resnet"]
DRAWS = 2


def source_model(architecture: str) -> nn.Module:
    torch.manual_seed(0)
    if architecture == "native_resnet":
        from transformers import ResNetConfig, ResNetForImageClassification

        model = ResNetForImageClassification(ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                                          num_labels=3))
    else:
        import timm

        model = timm.create_model(architecture, num_classes=3)
    with torch.no_grad():  # trained-looking BatchNorm statistics, so eval mode really uses them
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d) and module.running_mean is not None:
                module.running_mean.uniform_(-0.3, 0.3)
                module.running_var.uniform_(0.5, 2.0)
    return model.eval()


def data():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, 32, 32, generator=gen)
    return [{"pixel_values": x[:3]}, {"pixel_values": x[3:]}]


def brute_force(model, batches, mode, seed=7):
    """The definition, one backward per (sample, class) or (sample, draw); draws made like estimate_fisher's."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    gen = torch.Generator().manual_seed(seed)
    m = 0
    for batch in batches:
        x = batch["pixel_values"]
        if mode == "sampled":
            with torch.no_grad():
                probs = logits_of(call_image_model(model, x)).float().softmax(-1)
            drawn = torch.multinomial(probs, DRAWS, replacement=True, generator=gen)
        for i in range(len(x)):
            logp = logits_of(call_image_model(model, x[i:i + 1])).float().log_softmax(-1)[0]
            terms = ([(k, logp[k].exp().item()) for k in range(len(logp))] if mode == "exact"
                     else [(int(k), 1.0 / DRAWS) for k in drawn[i]])
            for k, weight in terms:
                grads = torch.autograd.grad(logp[k], list(params.values()), retain_graph=True, allow_unused=True)
                for name, g in zip(params, grads):
                    if g is not None:
                        total[name] += weight * g.square()
            m += 1
    return {n: t / m for n, t in total.items()}


def assert_close_to(estimate, expected):
    assert len(estimate.tensors) == len(expected)
    for (name, value), got in zip(expected.items(), estimate.tensors.values()):
        torch.testing.assert_close(got, value, rtol=1e-4, atol=1e-6 * value.abs().max().item() + 1e-12,
                                   msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("mode", ["exact", "sampled"])
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_every_path_equals_the_definition(architecture, mode):
    model = source_model(architecture)
    expected = brute_force(model, data(), mode)
    methods = ["auto", "vmap"]
    routes = json.loads(estimate_fisher(model, data()[:1], mode, method="auto",
                                        generator=torch.Generator().manual_seed(7)).metadata["method_per_layer"])
    if all(route == "hooks" for route in routes.values()):
        methods.append("hooks")
    for method in methods:
        fisher = estimate_fisher(model, data(), mode, method=method, chunk_size=2, class_chunk=2, draws=DRAWS,
                                 generator=torch.Generator().manual_seed(7))
        assert_close_to(fisher, expected)
        per_layer = json.loads(fisher.metadata["method_per_layer"])
        assert set(per_layer.values()) == set(fisher.metadata["method"].split("+")), method
        if method == "vmap":
            assert set(per_layer.values()) == {"vmap"}


def test_weight_standardised_and_unruled_layers_go_to_vmap():
    """Subclasses that change the forward (StdConv2d, ScaledStdConv2d) never get the plain-conv rule."""
    from timm.layers import ScaledStdConv2d, StdConv2d

    model = source_model("test_nfnet")
    routes = json.loads(estimate_fisher(model, data()[:1], "exact").metadata["method_per_layer"])
    std = {n for n, m in model.named_modules() if type(m) in (ScaledStdConv2d, StdConv2d)}
    assert std and all(routes[n] == "vmap" for n in std)
    assert any(r == "hooks" for r in routes.values())  # its plain convs and the head keep the fast path
    assert per_sample.rule_of(StdConv2d(3, 4, 3)) is None and per_sample.rule_of(nn.Conv2d(3, 4, 3)) == "conv"
    assert per_sample.rule_of(nn.GroupNorm(2, 4)) is None
    with pytest.raises(ValueError, match=r"method='hooks' has no per-sample rule for layers \[.*\] of NormFreeNet; "
                                         r"use method='auto'"):
        estimate_fisher(model, data()[:1], "exact", method="hooks")


class InPlaceAfterFirstLayer(nn.Module):
    """The first layer with a per-sample rule is followed by an in-place activation and nothing before it is a
    hooks target (here: a weight-standardised conv before it goes to vmap), as in nf_regnet's stage-0 SE `fc1`."""

    def __init__(self):
        super().__init__()
        from timm.layers import StdConv2d

        self.stem = StdConv2d(3, 4, 3)  # no per-sample rule: vmap
        self.fc1 = nn.Conv2d(4, 6, 1)  # the first hooked layer ...
        self.act = nn.ReLU(inplace=True)  # ... modified in place right after
        self.fc2 = nn.Conv2d(6, 4, 1)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        x = self.fc2(self.act(self.fc1(self.stem(x))))
        return self.head(x.mean((2, 3)))


@pytest.mark.parametrize("mode", ["exact", "sampled"])
def test_in_place_activation_after_the_first_hooked_layer(mode):
    """Issue 22c: that layer's Fisher came out 0, because the backward never reached the value before the ReLU."""
    torch.manual_seed(0)
    model = InPlaceAfterFirstLayer().eval()
    expected = brute_force(model, data(), mode)
    assert expected["fc1.weight"].abs().max() > 1e-6  # the definition gives non-zero values
    fisher = estimate_fisher(model, data(), mode, method="auto", draws=DRAWS,
                             generator=torch.Generator().manual_seed(7))
    assert json.loads(fisher.metadata["method_per_layer"])["fc1"] == "hooks"
    assert_close_to(fisher, expected)
