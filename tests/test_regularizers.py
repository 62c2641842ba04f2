"""Every penalty against a hand-computed value and its gradient read from .grad after a real backward."""

import math

import pytest
import torch
from torch import nn

from hf_l2sp import REGULARIZERS, FisherDiagonal, Reference, get_regularizer_class, list_regularizers
from hf_l2sp.anchor.parameters import resolve_parameters
from hf_l2sp.penalties import register_regularizer
from hf_l2sp.penalties.group_lasso_sp import GroupLassoSP
from hf_l2sp.penalties.l1_sp import L1SP
from hf_l2sp.penalties.l2 import L2
from hf_l2sp.penalties.l2_sp import L2SP
from hf_l2sp.penalties.l2_sp_fisher import L2SPFisher
from hf_l2sp.penalties.none import NoRegularizer

ALPHA, BETA = 0.3, 0.7
# w - w0 per tensor after the perturbation below; the head starts at these values (w0 of the head is irrelevant).
DELTAS = {"conv.weight": 0.5, "conv.bias": 0.25, "bn.weight": -1.0, "bn.bias": 2.0}
HEAD = {"fc.weight": 0.3, "fc.bias": 0.2}
SIZES = {"conv.weight": 24, "conv.bias": 3, "bn.weight": 3, "bn.bias": 3, "fc.weight": 6, "fc.bias": 2}


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 2)  # weight (3, 2, 2, 2): 3 groups of p_g = 8
        self.bn = nn.BatchNorm2d(3)
        self.fc = nn.Linear(3, 2)  # the new head


def perturbed_tiny():
    model = Tiny()
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(1.0)
    reference = Reference.snapshot(model, head_modules=["fc"])
    with torch.no_grad():
        params = dict(model.named_parameters())
        for name, delta in DELTAS.items():
            params[name].add_(delta)
        for name, value in HEAD.items():
            params[name].fill_(value)
    return model, reference


def evaluate(regularizer, include):
    model, reference = perturbed_tiny()
    sets = resolve_parameters(model, reference.tensors, include)
    regularizer.prepare(sets)
    terms = regularizer(sets)
    if terms.penalty.requires_grad:
        terms.penalty.backward()
    return model, sets, terms


def sq(name):
    return SIZES[name] * (DELTAS.get(name, 0.0) ** 2)


def head_l2(names):
    return BETA / 2 * sum(SIZES[n] * HEAD[n] ** 2 for n in names)


def test_registry_has_every_paper_penalty():
    assert {"none", "l2", "l2_sp", "l1_sp", "group_lasso_sp", "l2_sp_fisher"} <= set(list_regularizers())
    for cls in REGULARIZERS.values():
        assert cls.formula.startswith("Omega(w) =") and cls.__doc__


def test_unknown_name_lists_choices():
    with pytest.raises(ValueError, match=r"Unknown regularizer 'l2sp'. Valid choices: .*l2_sp"):
        get_regularizer_class("l2sp")


def test_register_rejects_bad_and_duplicate_names():
    with pytest.raises(ValueError, match="snake_case"):
        register_regularizer("L2-SP")
    with pytest.raises(ValueError, match="already registered"):
        register_regularizer("l2_sp")(type("Other", (L2SP,), {}))


@pytest.mark.parametrize("include", ["weights", "all"])
def test_parameter_sets(include):
    _, sets, _ = evaluate(L2SP(ALPHA, BETA), include)
    if include == "weights":
        assert sets.anchored_names == ["conv.weight"] and sets.head_names == ["fc.weight"]
    else:
        assert sets.anchored_names == ["conv.weight", "conv.bias", "bn.weight", "bn.bias"]
        assert sets.head_names == ["fc.weight", "fc.bias"]


@pytest.mark.parametrize("include", ["weights", "all"])
def test_l2_sp_value_and_gradient(include):
    model, sets, terms = evaluate(L2SP(ALPHA, BETA), include)
    anchored = sets.anchored_names
    expected = ALPHA / 2 * sum(sq(n) for n in anchored) + head_l2(sets.head_names)
    assert terms.penalty.item() == pytest.approx(expected, rel=1e-6)
    assert terms.head_penalty.item() == pytest.approx(head_l2(sets.head_names), rel=1e-6)
    assert terms.distance.item() == pytest.approx(math.sqrt(sum(sq(n) for n in anchored)), rel=1e-6)
    params = dict(model.named_parameters())
    for name in anchored:  # dOmega/dw = alpha (w - w0), exactly
        torch.testing.assert_close(params[name].grad, torch.full_like(params[name], ALPHA * DELTAS[name]))
    for name in sets.head_names:  # dOmega/dw = beta w
        torch.testing.assert_close(params[name].grad, BETA * params[name].detach())
    for name in set(params) - set(anchored) - set(sets.head_names):
        assert params[name].grad is None  # not penalised at all


def test_l2_value_and_gradient():
    model, sets, terms = evaluate(L2(ALPHA, BETA), "weights")
    w = 1.0 + DELTAS["conv.weight"]
    assert terms.penalty.item() == pytest.approx(ALPHA / 2 * 24 * w**2 + head_l2(["fc.weight"]), rel=1e-6)
    torch.testing.assert_close(model.conv.weight.grad, ALPHA * model.conv.weight.detach())
    torch.testing.assert_close(model.fc.weight.grad, BETA * model.fc.weight.detach())


def test_l1_sp_value_and_gradient():
    model, sets, terms = evaluate(L1SP(ALPHA, BETA), "all")
    expected = ALPHA * sum(SIZES[n] * abs(d) for n, d in DELTAS.items()) + head_l2(["fc.weight", "fc.bias"])
    assert terms.penalty.item() == pytest.approx(expected, rel=1e-6)
    torch.testing.assert_close(model.bn.weight.grad, torch.full((3,), -ALPHA))
    torch.testing.assert_close(model.conv.weight.grad, torch.full((3, 2, 2, 2), ALPHA))


def test_l1_sp_gradient_is_zero_at_the_anchor():
    model = Tiny()
    reference = Reference.snapshot(model, ["fc"])
    sets = resolve_parameters(model, reference.tensors, "weights")
    L1SP(ALPHA, 0.0)(sets).penalty.backward()
    assert torch.count_nonzero(model.conv.weight.grad) == 0


@pytest.mark.parametrize("include", ["weights", "all"])
def test_group_lasso_sp_value(include):
    _, sets, terms = evaluate(GroupLassoSP(ALPHA, BETA), include)
    # conv.weight: 3 groups of p_g = 8 elements, each ||w_g - w0_g|| = sqrt(8 * 0.25): sqrt(8) * sqrt(2) = 4 per group.
    expected = 3 * 4.0
    if include == "all":  # 1-D tensors: groups of one element, sqrt(1) * |d|
        expected += sum(SIZES[n] * abs(DELTAS[n]) for n in ("conv.bias", "bn.weight", "bn.bias"))
    expected = ALPHA * expected + head_l2(sets.head_names)
    assert terms.penalty.item() == pytest.approx(expected, rel=1e-6)


def test_group_lasso_sp_groups_are_output_channels():
    """Moving one filter costs sqrt(p) ||d||; the same squared distance split over filters costs more (sum of
    norms)."""
    model = Tiny()
    reference = Reference.snapshot(model, ["fc"])
    with torch.no_grad():
        model.conv.weight[0].add_(1.0)  # one group, ||d|| = sqrt(8)
    sets = resolve_parameters(model, reference.tensors, "weights")
    one = GroupLassoSP(1.0, 0.0)(sets).penalty.item()
    assert one == pytest.approx(math.sqrt(8) * math.sqrt(8), rel=1e-6)
    with torch.no_grad():
        model.conv.weight.copy_(reference.tensors["conv.weight"])
        model.conv.weight[:, 0].add_(1.0)  # 4 elements in each of the 3 filters, same count per filter
    spread = GroupLassoSP(1.0, 0.0)(resolve_parameters(model, reference.tensors, "weights")).penalty.item()
    assert spread == pytest.approx(3 * math.sqrt(8) * 2.0, rel=1e-6)


def test_group_lasso_sp_gradient_matches_direct_autograd():
    model, reference = perturbed_tiny()
    with torch.no_grad():
        model.conv.weight.add_(torch.randn_like(model.conv.weight))
    sets = resolve_parameters(model, reference.tensors, "weights")
    GroupLassoSP(ALPHA, 0.0)(sets).penalty.backward()
    w = model.conv.weight.detach().clone().requires_grad_(True)
    d = (w - reference.tensors["conv.weight"]).reshape(3, -1)
    (ALPHA * math.sqrt(8) * d.norm(dim=1).sum()).backward()
    torch.testing.assert_close(model.conv.weight.grad, w.grad)


def test_l2_sp_fisher_weights_each_coordinate():
    fisher = FisherDiagonal({"conv.weight": torch.full((3, 2, 2, 2), 2.0), "fc.weight": torch.ones(1000, 3)})
    model, sets, terms = evaluate(L2SPFisher(ALPHA, BETA, fisher), "weights")
    assert terms.penalty.item() == pytest.approx(ALPHA / 2 * 2.0 * sq("conv.weight") + head_l2(["fc.weight"]))
    torch.testing.assert_close(model.conv.weight.grad, torch.full((3, 2, 2, 2), ALPHA * 2.0 * 0.5))


def test_l2_sp_fisher_with_unit_fisher_equals_l2_sp():
    model, reference = perturbed_tiny()
    with torch.no_grad():
        model.conv.weight.add_(torch.randn_like(model.conv.weight))
    sets = resolve_parameters(model, reference.tensors, "all")
    ones = FisherDiagonal({k: torch.ones_like(a) for k, a in zip(sets.anchored_keys, sets.anchors)})
    fisher_reg = L2SPFisher(ALPHA, BETA, ones)
    fisher_reg.prepare(sets)
    assert fisher_reg(sets).penalty.item() == pytest.approx(L2SP(ALPHA, BETA)(sets).penalty.item(), rel=1e-6)


@pytest.mark.parametrize("bad, match", [
    ({"conv.weight": torch.ones(3, 2, 2)}, r"shape mismatches conv.weight"),
    ({"other.weight": torch.ones(2)}, r"no entry for conv.weight"),
])
def test_l2_sp_fisher_rejects_mismatched_files(bad, match):
    model, reference = perturbed_tiny()
    sets = resolve_parameters(model, reference.tensors, "weights")
    with pytest.raises(ValueError, match=match):
        L2SPFisher(ALPHA, BETA, FisherDiagonal(bad, source="f.safetensors")).prepare(sets)


@pytest.mark.parametrize("value, match", [(float("nan"), "NaN/inf"), (-1.0, "negative")])
def test_fisher_rejects_bad_entries(value, match):
    with pytest.raises(ValueError, match=match):
        FisherDiagonal({"conv.weight": torch.tensor([1.0, value])}, source="bad.safetensors")


def test_none_is_zero_but_reports_distance():
    model, sets, terms = evaluate(NoRegularizer(ALPHA, BETA), "weights")
    assert terms.penalty.item() == 0.0 and not terms.penalty.requires_grad
    assert model.conv.weight.grad is None
    assert terms.distance.item() == pytest.approx(math.sqrt(sq("conv.weight")))


@pytest.mark.parametrize("name", ["l2", "l2_sp", "l1_sp", "group_lasso_sp"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_parameters_get_fp32_penalty(name, dtype):
    model, reference = perturbed_tiny()
    model.to(dtype)
    sets = resolve_parameters(model, reference.tensors, "all")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        terms = get_regularizer_class(name)(ALPHA, BETA)(sets)
    assert terms.penalty.dtype == torch.float32
    terms.penalty.backward()
    assert model.conv.weight.grad.dtype == dtype
    model32, sets32, terms32 = evaluate(get_regularizer_class(name)(ALPHA, BETA), "all")
    assert terms.penalty.item() == pytest.approx(terms32.penalty.item(), rel=1e-2)


def test_frozen_parameters_are_never_penalised():
    model, reference = perturbed_tiny()
    model.conv.weight.requires_grad_(False)
    sets = resolve_parameters(model, reference.tensors, "all")
    assert "conv.weight" not in sets.anchored_names + sets.head_names


@pytest.mark.parametrize("bad", [-0.1, float("nan"), float("inf")])
def test_coefficients_must_be_finite_and_non_negative(bad):
    with pytest.raises(ValueError, match="sp_alpha must be a finite number >= 0"):
        L2SP(alpha=bad, beta=0.0)
    with pytest.raises(ValueError, match="sp_beta must be a finite number >= 0"):
        L2SP(alpha=0.0, beta=bad)
