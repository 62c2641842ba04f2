"""Declared floors are the tested ones, and a Trainer that lacks a hook SPTrainer relies on is refused loudly."""

import re
from pathlib import Path

import pytest
from transformers import Trainer

from hf_l2sp.training.compat import TRAINER_HOOKS, TRANSFORMERS_FLOOR, check_trainer_hooks

ROOT = Path(__file__).resolve().parents[1]


def declared_floors() -> dict[str, str]:
    text = (ROOT / "pyproject.toml").read_text()
    block = text[text.index("dependencies = ["):text.index("]", text.index("dependencies = ["))]
    return {m.group(1).lower().replace("_", "-"): m.group(2) for m in re.finditer(r'"([\w.-]+)>=([\w.]+)', block)}


def lowest_set() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints-lowest.txt").read_text().splitlines():
        if match := re.match(r"([\w.-]+)==([\w.]+)", line.strip()):
            pins[match.group(1).lower().replace("_", "-")] = match.group(2)
    return pins


def _release(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("."))


def test_every_declared_floor_is_installed_by_the_lowest_set():
    """CI installs constraints-lowest.txt in a second environment: each floor pyproject declares is what it tests."""
    floors, pins = declared_floors(), lowest_set()
    assert set(floors) <= set(pins), set(floors) - set(pins)
    for name, floor in floors.items():
        assert _release(pins[name])[:len(_release(floor))] == _release(floor), (name, floor, pins[name])
    assert _release(floors["transformers"]) == _release(TRANSFORMERS_FLOOR)[:2]


def test_a_trainer_without_a_hook_is_refused_with_the_version_it_needs():
    for missing in ("loss_is_scaled_for_ga", "_clip_grad_norm", "_hp_search_setup"):
        members = {name: getattr(Trainer, name) for name in TRAINER_HOOKS if name != missing}
        old = type("OldTrainer", (), members)
        with pytest.raises(RuntimeError, match=rf"needs transformers >= {re.escape(TRANSFORMERS_FLOOR)}.*{missing}"):
            check_trainer_hooks(old)


def test_a_renamed_parameter_is_refused():
    members = {name: getattr(Trainer, name) for name in TRAINER_HOOKS}
    members["save_model"] = lambda self, output_dir=None: None  # `_internal_call` gone
    with pytest.raises(RuntimeError, match=r"save_model\(\.\.\., _internal_call=\.\.\.\)"):
        check_trainer_hooks(type("OldTrainer", (), members))


def test_the_installed_trainer_has_every_hook():
    check_trainer_hooks(Trainer)
