"""SPConfig validates every regularizer option before anything runs."""

import warnings

import pytest

from hf_l2sp import SPConfig


def make(tmp_path, **kwargs):
    return SPConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none", **kwargs)


def test_defaults_follow_the_paper(tmp_path):
    args = make(tmp_path)
    assert (args.regularizer, args.sp_alpha, args.sp_beta, args.sp_include) == ("l2_sp", 0.1, 0.01, "weights")
    assert args.remove_unused_columns is True  # Trainer's default: a text script keeps working (issue 21)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"regularizer": "l2-sp"}, ValueError, r"Unknown regularizer 'l2-sp'. Valid choices: .*l1_sp.*l2_sp"),
    ({"sp_alpha": -1.0}, ValueError, r"sp_alpha must be a finite number >= 0, got -1.0"),
    ({"sp_beta": -0.5}, ValueError, r"sp_beta must be a finite number >= 0, got -0.5"),
    ({"sp_alpha": float("nan")}, ValueError, r"sp_alpha must be a finite number >= 0, got nan"),
    ({"sp_include": "weight"}, ValueError, r"sp_include must be one of weights, all; got 'weight'"),
    ({"regularizer": "l2_sp_fisher"}, ValueError, r"needs sp_fisher"),
    ({"regularizer": "l2_sp", "sp_fisher": "f.safetensors"}, ValueError, r"only used by regularizer='l2_sp_fisher'"),
])
def test_bad_options_raise_naming_value_and_choices(tmp_path, kwargs, error, match):
    with pytest.raises(error, match=match):
        make(tmp_path, **kwargs)


def test_weight_decay_with_sp_penalty_warns_about_double_shrinkage(tmp_path):
    with pytest.warns(UserWarning, match=r"weight_decay=0.01 together with regularizer='l2_sp'.*shrunk twice"):
        make(tmp_path, weight_decay=0.01)


@pytest.mark.parametrize("regularizer", ["l2", "none"])
def test_weight_decay_without_anchor_does_not_warn(tmp_path, regularizer):
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        make(tmp_path, weight_decay=0.01, regularizer=regularizer)


def test_every_field_is_documented(tmp_path):
    doc = SPConfig.__doc__
    for name in ("regularizer", "sp_alpha", "sp_beta", "sp_include", "sp_reference", "sp_reference_revision",
                 "sp_fisher", "sp_head"):
        assert f"{name} (" in doc
        assert SPConfig.__dataclass_fields__[name].metadata["help"]
