"""The language-model study (`hf-l2sp lm-study`) at a tiny size: a random-init Llama with a word-level tokenizer in
place of SmolLM2, generated sentences in place of the Bible, Wikipedia and news. The real weights and text need
package downloads and an hour; their committed results are checked against the docs in `test_lm_study_results`."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

from hf_l2sp.cli import main as cli_main
from hf_l2sp.lm_study import Budget, Corpora, LMStudy, LMStudyPlan, Method, full_plan, quick_plan, write_report
from hf_l2sp.lm_study.data import StudyData, token_blocks
from hf_l2sp.lm_study.measure import mean_loss
from hf_l2sp.lm_study.report import matched, plain_curve, reference
from hf_l2sp.utils.intervals import interval
from hf_l2sp.lm_study.texts import bible_chapters, wiki_articles, wiki_plain
from tests.text_models import WORDS, save_llama_lm

pytestmark = pytest.mark.filterwarnings("ignore")


def test_bible_splits_at_matthew_and_joins_verses_by_chapter():
    verses = [("Genesis", 1, 1, "In the beginning."), ("Genesis", 1, 2, "And the earth."), ("Malachi", 4, 6, "Lest."),
              ("Matthew", 1, 1, "The book."), ("Revelation", 22, 21, "Amen.")]
    jsonl = "\n".join(json.dumps({"book": b, "chapter": c, "verse": v, "text": t}) for b, c, v, t in verses)
    old, new = bible_chapters(jsonl)
    assert old == ["In the beginning. And the earth.", "Lest."]
    assert new == ["The book.", "Amen."]
    with pytest.raises(ValueError, match="no book 'Matthew'"):
        bible_chapters(jsonl.split("\n")[0])


def test_wiki_markup_becomes_prose_and_redirects_are_skipped():
    markup = ("{{Infobox|name={{nested|x}}}}\n'''Anarchism''' is a [[political philosophy]] of [[self-governance|"
              "self-governed]] societies.&lt;ref&gt;Woodcock&lt;/ref&gt; [[File:A.jpg|thumb|a [[b]] c]]\n"
              "== History ==\n* The [http://example.org first] era.\n{| class=x\n| cell\n|}")
    assert wiki_plain(markup) == ("Anarchism is a political philosophy of self-governed societies.\nHistory\n"
                                  "The first era.")
    body = "x " * 1200
    xml = (f"<page><ns>0</ns><text>#REDIRECT [[Elsewhere]]</text></page><page><ns>0</ns><text>{body}</text></page>"
           f"<page><ns>4</ns><text>{body}</text></page><page><ns>0</ns><text>short</text></page>")
    assert wiki_articles(xml) == [body.strip()]


def _sentences(rng: random.Random, count: int, words: list[str]) -> list[str]:
    return [" ".join(rng.choice(words) for _ in range(rng.randint(4, 12))) for _ in range(count)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_lm")
    save_llama_lm(folder)
    rng = random.Random(0)
    corpora = Corpora(train=_sentences(rng, 60, WORDS[:10]), target=_sentences(rng, 30, WORDS[:10]),
                      retention={"wikipedia": _sentences(rng, 30, WORDS[8:]), "news": _sentences(rng, 30, WORDS[5:])},
                      general=_sentences(rng, 80, WORDS))
    budget = Budget(steps=3, batch_size=2, block=8, heal_steps=2, heal_learning_rate=1e-2, eval_blocks=3, kl_blocks=2)
    return folder, corpora, budget


def test_training_blocks_are_seeded_and_replay_is_rounded_up_from_unused_general_text(tiny):
    folder, corpora, budget = tiny
    from transformers import AutoTokenizer

    data = StudyData.build(AutoTokenizer.from_pretrained(str(folder)), corpora, budget)
    plain = Method("plain", 1e-3)
    first, none = data.training_blocks(plain, 0, budget)
    assert none == 0.0 and first.shape == (6, 8)
    assert torch.equal(first, data.training_blocks(plain, 0, budget)[0])
    assert not torch.equal(first, data.training_blocks(plain, 1, budget)[0])
    mixed, fraction = data.training_blocks(Method("replay", 1e-3, replay=0.01), 0, budget)
    assert fraction == 1 / 6  # 1 % of six sequences, rounded up to one
    unused = data.general[budget.heal_steps * budget.batch_size:]
    replayed = [row for row in mixed if not any(torch.equal(row, t) for t in data.train)]
    assert len(replayed) == 1 and any(torch.equal(replayed[0], g) for g in unused)
    assert not any(torch.equal(replayed[0], h) for h in data.heal_blocks(budget))


def test_token_blocks_join_documents_with_eos_and_drop_the_remainder(tiny):
    folder, _, _ = tiny
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    blocks = token_blocks(tokenizer, ["the cat sat", "the dog ran on"], 4)
    ids = tokenizer("the cat sat", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids += tokenizer("the dog ran on", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert blocks.tolist() == [ids[:4], ids[4:8]]
    with pytest.raises(ValueError, match="fewer than one block of 64"):
        token_blocks(tokenizer, ["the cat"], 64)


def test_matching_interpolates_plain_front_and_gives_a_t_interval():
    def rec(method, family, seed, gain, forgetting, kl=0.0, mix=1.0):
        return {"method": method, "family": family, "seed": seed, "target_gain": gain, "forgetting": forgetting,
                "kl": kl, "mix": mix}

    records = []
    for seed, shift in ((0, 0.0), (1, 0.01), (2, -0.01)):
        records += [rec("plain-lr1", "plain", seed, 0.1, 0.02 + shift, 0.1), rec("plain-lr3", "plain", seed, 0.2,
                    0.06 + shift, 0.3), rec("plain-lr9", "plain", seed, -0.1, 0.3, 0.9),  # dominated by w0
                    rec("l2_sp-x", "l2_sp", seed, 0.15, 0.01 + 2 * shift, 0.1)]
    records.append(rec("lora-y", "lora", 0, 0.5, 0.05))  # beyond every plain gain: against plain's best run
    records.append(rec("replay-z", "replay", 0, -0.05, 0.07))  # gained nothing: against w0
    curve = plain_curve(records, 0, "forgetting")
    assert curve == [(0.0, 0.0), (0.1, 0.02), (0.2, 0.06)]
    assert reference(curve, 0.15) == (pytest.approx(0.04), "same gain")
    assert reference(curve, 0.05) == (pytest.approx(0.01), "same gain")
    assert reference(curve, 0.25) == (0.06, "best plain") and reference(curve, -0.05) == (0.0, "w0")
    rows = {row["method"]: row for row in matched(records)}
    diffs = [0.01 - 0.04, 0.03 - 0.05, -0.01 - 0.03]  # per seed: l2_sp's forgetting minus plain's at gain 0.15
    mean = sum(diffs) / 3
    half = 4.303 * (sum((d - mean) ** 2 for d in diffs) / 2) ** 0.5 / math.sqrt(3)
    assert rows["l2_sp-x"]["forgetting_difference"] == pytest.approx(mean)
    assert (rows["l2_sp-x"]["forgetting_low"], rows["l2_sp-x"]["forgetting_high"]) == pytest.approx(
        (mean - half, mean + half))
    assert rows["l2_sp-x"]["kl_difference"] == pytest.approx(0.1 - 0.2)
    assert rows["l2_sp-x"]["compared_with"] == "same gain ×3"
    assert rows["lora-y"]["compared_with"] == "best plain ×1"
    assert rows["lora-y"]["forgetting_difference"] == pytest.approx(0.05 - 0.06)
    assert math.isnan(rows["lora-y"]["forgetting_low"])  # one seed: no interval
    assert rows["replay-z"]["compared_with"] == "w0 ×1" and rows["replay-z"]["forgetting_difference"] == 0.07
    assert rows["l2_sp-x"]["gain_difference"] == 0.0  # compared at its own gain
    assert rows["lora-y"]["gain_difference"] == pytest.approx(0.5 - 0.2)  # the best plain run of seed 0 gained 0.2
    assert rows["replay-z"]["gain_difference"] == -0.05
    assert interval([1.0, 1.0]) == (1.0, 1.0, 1.0)


@pytest.fixture(scope="module")
def finished(tiny, tmp_path_factory):
    folder, corpora, budget = tiny
    out, cache = tmp_path_factory.mktemp("lm_out"), tmp_path_factory.mktemp("lm_cache")
    plan = LMStudyPlan(methods=(Method("plain", 1e-2, wise=(0.0, 0.5, 1.0)), Method("l2_sp", 1e-2, "l2_sp", 1.0),
                                Method("lora", 1e-2, lora_rank=2), Method("replay", 1e-2, replay=0.2)),
                       seeds=(0, 1), budget=budget)
    study = LMStudy(plan, folder, corpora, out, cache)
    records = study.run()
    return study, records, out, cache


def test_study_measures_loss_and_kl_against_the_healed_weights(finished, tiny):
    study, records, out, cache = finished
    folder, _, budget = tiny
    from transformers import AutoModelForCausalLM

    healed = next(cache.glob("healed-*"))
    base = AutoModelForCausalLM.from_pretrained(str(folder))
    w0 = AutoModelForCausalLM.from_pretrained(str(healed))
    assert any(not torch.equal(a, b) for a, b in zip(base.parameters(), w0.parameters()))  # healing trained
    start = json.loads((out / "start.json").read_text())
    assert start["healed"]["target_loss"] == pytest.approx(mean_loss(w0, study.data.target)[0], abs=1e-6)
    assert start["healed"]["kl"] == 0.0 and start["before_healing"]["kl"] > 0
    assert len(records) == 2 * (4 + 3)  # per seed: four runs, three WiSE mixtures of the plain one
    for seed in (0, 1):
        plain, *wise = [r for r in records if r["seed"] == seed and r["method"].endswith("plain-lr0.01")]
        by_mix = {r["mix"]: r for r in wise}
        assert by_mix[0.0]["forgetting"] == pytest.approx(0, abs=1e-6) and by_mix[0.0]["kl"] == pytest.approx(0,
                                                                                                              abs=1e-6)
        assert by_mix[0.0]["distance"] == pytest.approx(0, abs=1e-6)
        for key in ("target_loss", "forgetting", "kl", "distance"):
            assert by_mix[1.0][key] == pytest.approx(plain[key], abs=1e-6)
        assert by_mix[0.5]["distance"] == pytest.approx(plain["distance"] / 2, rel=1e-5)
        assert plain["forgetting"] == pytest.approx(
            (plain["wikipedia_loss"] - start["healed"]["wikipedia_loss"]
             + plain["news_loss"] - start["healed"]["news_loss"]) / 2, abs=1e-9)
    replay = [r for r in records if r["family"] == "replay"]
    assert all(r["replay"] == pytest.approx(2 / 6) for r in replay)  # 20 % of six, rounded up
    assert all(r["distance"] > 0 for r in records if r["family"] == "lora")


def test_kl_is_the_two_model_kl_on_target_text(finished, tiny):
    """The recorded KL equals KL(p_w0 ‖ p) computed from the healed checkpoint and the run's end weights."""
    study, records, out, cache = finished
    _, _, budget = tiny
    from transformers import AutoModelForCausalLM

    from hf_l2sp.lm_study.runner import _trainer_args, train

    w0 = AutoModelForCausalLM.from_pretrained(str(next(cache.glob("healed-*"))))
    model = AutoModelForCausalLM.from_pretrained(str(next(cache.glob("healed-*"))))
    torch.manual_seed(0)
    blocks, _ = study.data.training_blocks(Method("plain", 1e-2), 0, budget)
    train(model, blocks, _trainer_args(str(out / "again"), budget, 1e-2, 0, budget.steps, regularizer="none"))
    x = study.data.target[: budget.kl_blocks]
    with torch.no_grad():
        p0 = torch.log_softmax(w0(input_ids=x).logits[:, :-1], -1)
        p = torch.log_softmax(model(input_ids=x).logits[:, :-1], -1)
    expected = float((p0.exp() * (p0 - p)).sum(-1).mean())
    plain = next(r for r in records if r["seed"] == 0 and r["method"] == "plain-lr0.01")
    assert plain["kl"] == pytest.approx(expected, rel=1e-4)


def test_rerun_skips_finished_runs_and_report_files_parse(finished, tiny):
    study, records, out, cache = finished
    runs = sorted((out / "runs").rglob("*.json"))
    stamps = [p.stat().st_mtime_ns for p in runs]
    rerun = LMStudy(study.plan, tiny[0], tiny[1], out, cache)
    assert rerun.run() == records and rerun.executed == 0
    assert [p.stat().st_mtime_ns for p in runs] == stamps
    write_report(out)
    from hf_l2sp.lm_study.report import read_csv

    rows = read_csv(out / "results.csv")
    assert len(rows) == len(records)
    assert (out / "front.png").stat().st_size > 10_000
    table = (out / "results.md").read_text()
    assert "| l2_sp-lr0.01-a1 |" in table and "wise-of-plain-lr0.01 (m=0.5)" in table


def test_plans_and_cli_refusals(capsys):
    full, quick = full_plan(), quick_plan()
    assert len(full.seeds) >= 3 and {m.family for m in full.methods} == {
        "plain", "l2_sp", "l2", "lora", "lora_l2_sp", "replay"}
    assert set(quick.methods) <= set(full.methods) and quick.seeds == (0,) and quick.budget == full.budget
    assert cli_main(["lm-study", "--methods", "plain,bogus"]) == 2
    err = capsys.readouterr().err
    assert "bogus" in err and "l2_sp" in err
