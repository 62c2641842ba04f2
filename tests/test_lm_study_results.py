"""The language-model study's committed results and the docs page that reads them: the tables recompute exactly
from the committed `results.csv`, the page shows them as computed, and every claim of its verdict holds in them."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from hf_l2sp.lm_study.plan import full_plan, quick_plan
from hf_l2sp.lm_study.report import against_committed, markdown, matched, read_csv, summary

ROOT = Path(__file__).resolve().parents[1]
FILES = ROOT / "docs" / "results" / "lm_study_files"
PAGE = ROOT / "docs" / "results" / "lm_study.md"


@pytest.fixture(scope="module")
def rows():
    return read_csv(FILES / "results.csv")


@pytest.fixture(scope="module")
def means(rows):
    return {row["method"]: {key: value[0] if isinstance(value, tuple) else value for key, value in row.items()}
            for row in summary(rows)}


@pytest.fixture(scope="module")
def against_plain(rows):
    return {row["method"]: row for row in matched(rows)}


def verdict() -> str:
    text = PAGE.read_text()
    return text[text.index("**What came out.**"):text.index("**Limits.**")]


def test_tables_recompute_from_the_committed_csv_and_the_page_shows_them(rows):
    start = json.loads((FILES / "start.json").read_text())
    tables = markdown(rows, start)
    assert tables == (FILES / "results.md").read_text()
    assert tables.strip() in PAGE.read_text()


def test_committed_runs_are_the_full_plan_on_every_seed(rows):
    plan = full_plan()
    expected = {(m.name, seed) for m in plan.methods for seed in plan.seeds}
    assert {(r["method"], r["seed"]) for r in rows if r["family"] != "wise"} == expected
    quick = quick_plan()  # the quick form repeats some of these rows: its runs are a subset
    assert {(m.name, s) for m in quick.methods for s in quick.seeds} <= expected


def test_every_figure_the_verdict_quotes_is_in_the_tables():
    tables = (FILES / "results.md").read_text()
    quoted = re.findall(r"[−+-]?\d+\.\d{4}", verdict())
    assert len(quoted) > 40
    for figure in quoted:
        assert figure.replace("−", "-").lstrip("+") in tables.replace("+", ""), figure


def test_the_verdict_holds_in_the_committed_numbers(means, against_plain):
    def gain(name):
        return means[name]["target_gain"]

    def forgetting(name):
        return means[name]["forgetting"]

    plain = [name for name in means if name.startswith("plain-")]
    # The learning rate: a low one forgets next to nothing; 2e-4 and 3e-4 overshoot.
    assert forgetting("plain-lr3e-05") < 0 < forgetting("plain-lr0.0001")
    for high in ("plain-lr0.0002", "plain-lr0.0003"):
        assert gain(high) < gain("plain-lr3e-05") and forgetting(high) > 4 * forgetting("plain-lr0.0001")
    # L2-SP at alpha 1 gains more than any learning rate, forgetting as much as plain's best run (within the
    # interval), the gain at the edge of three seeds' resolution.
    for name in ("l2_sp-lr0.0001-a1", "l2_sp-lr0.0003-a1"):
        row = against_plain[name]
        assert gain(name) > max(gain(p) for p in plain)
        assert row["compared_with"] == "best plain ×3" and row["gain_difference"] > 0 and row["gain_low"] >= 0
        assert row["forgetting_low"] < 0 < row["forgetting_high"]
    assert against_plain["l2_sp-lr0.0001-a1"]["gain_low"] < 1e-4  # "at the edge"
    # ... and tames 3e-4.
    assert gain("plain-lr0.0003") < 0 < gain("l2_sp-lr0.0003-a1")
    assert forgetting("plain-lr0.0003") > 10 * forgetting("l2_sp-lr0.0003-a1")
    # Where it loses: every L2-SP run at a gain plain reaches forgets more than plain there.
    same_gain_sp = [n for n, r in against_plain.items() if "l2_sp" in n and r["compared_with"] == "same gain ×3"]
    assert sorted(same_gain_sp) == ["l2_sp-lr0.0003-a0.1", "lora_l2_sp-lr0.001-a1-r16"]
    assert all(against_plain[n]["forgetting_low"] > 0 for n in same_gain_sp)
    # L2 forgets more than plain at its gain, far from w0; LoRA forgets more than plain's best and 4x L2-SP's.
    assert against_plain["l2-lr0.0003-a0.1"]["forgetting_low"] > 0
    assert means["l2-lr0.0003-a0.1"]["distance"] > 20 * means["l2_sp-lr0.0003-a1"]["distance"]
    assert against_plain["lora-lr0.001-r16"]["forgetting_low"] > 0
    assert forgetting("lora-lr0.001-r16") > 3.9 * forgetting("l2_sp-lr0.0003-a1")
    assert abs(gain("lora-lr0.001-r16") - gain("l2_sp-lr0.0003-a1")) < 0.002
    # Replay: on the curve at 1e-4, no rescue at 3e-4.
    for name in ("replay-lr0.0001-replay0.01", "replay-lr0.0001-replay0.1"):
        assert against_plain[name]["forgetting_low"] < 0 < against_plain[name]["forgetting_high"]
    assert gain("replay-lr0.0003-replay0.01") < 0 and gain("replay-lr0.0003-replay0.1") < 0
    # WiSE-FT at m = 0.25 is the only method clearly below plain's curve; more mixing forgets more.
    below = [n for n, r in against_plain.items() if r["forgetting_high"] < 0]
    assert below == ["wise-of-plain-lr0.0003 (m=0.25)"]
    assert gain("wise-of-plain-lr0.0003 (m=0.25)") < gain("l2_sp-lr0.0001-a1")
    # KL: where its interval excludes zero, it has the sign of the forgetting difference.
    clear = {n: r for n, r in against_plain.items() if r["kl_low"] > 0 or r["kl_high"] < 0}
    assert set(clear) == {"l2_sp-lr0.0003-a0.1", "replay-lr0.0001-replay0.1", "replay-lr0.0003-replay0.01",
                          "replay-lr0.0003-replay0.1", "wise-of-plain-lr0.0003 (m=0.75)"}
    assert all((r["kl_difference"] > 0) == (r["forgetting_difference"] > 0) for r in clear.values())
    high_gain = [n for n in means if gain(n) > 0.07 and not n.startswith(("lora", "wise"))]
    assert min(high_gain, key=lambda n: means[n]["kl"]) == "l2_sp-lr0.0001-a1"


def test_a_rerun_is_set_beside_the_committed_runs(rows, tmp_path):
    """What `lm-study --quick` prints at its end: each of its runs beside the committed one, and the largest gap."""
    plan = quick_plan()
    quick = [r for r in rows if (r["method"], r["seed"]) in {(m.name, s) for m in plan.methods for s in plan.seeds}]
    assert len(quick) >= 3
    assert against_committed(quick, FILES / "results.csv")[-1] == "largest difference from the committed study: 0.0000"
    moved = dict(quick[0], target_gain=quick[0]["target_gain"] + 0.0123)
    lines = against_committed([moved, *quick[1:], dict(quick[0], method="elsewhere")], FILES / "results.csv")
    assert lines[-1] == "largest difference from the committed study: 0.0123"
    assert any(line.startswith("elsewhere") and "not in results.csv" in line for line in lines)
    assert against_committed(quick, tmp_path / "absent.csv") == []
