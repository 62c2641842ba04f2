"""The Python examples of the README and the docs run as written (in a temporary folder, offline), the text ones as
scripts; every one is claimed by a test here, and the docs site builds in strict mode."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from .helpers import pil_images

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").rglob("*.md"))]
#: Each Python block of the README and the docs, by words only it holds, and the test that runs it.
BLOCKS = {
    "image quick start": ("load_backbone(", "trainer.train()", "runs/quickstart"),
    "loading": ("timm.create_model(", "pipeline("),
    "text classification": ("AutoModelForSequenceClassification", "DataCollatorWithPadding", "SPTrainer("),
    "sft": ("SFTSPTrainer(", "SPMixin", "Qwen/Qwen2.5-0.5B"),
    "forgetting sft": ("SFTSPTrainer(", "sp_retention_kl"),
    "forgetting images": ("load_backbone(", "retention_datasets"),
    "compare": ("compare(options", "load_recipe"),
    "lora": ("get_peft_model", "save_merged_model"),
}


def python_blocks() -> list[str]:
    """Every distinct Python block of the README and the docs (the README repeats two of the Quickstart's)."""
    found = []
    for page in PAGES:
        for block in re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S):
            if block not in found:
                found.append(block)
    return found


def quick_start() -> str:
    return python_block(*BLOCKS["image quick start"])


def test_every_python_block_is_run_by_a_test():
    for block in python_blocks():
        owners = [name for name, needles in BLOCKS.items() if all(n in block for n in needles)]
        assert len(owners) == 1, f"a Python block no test runs (or two claim):\n{block[:300]}"


def test_readme_is_short_and_opens_with_install_and_both_quick_starts():
    lines = README.read_text().splitlines()
    assert len(lines) <= 200
    order = [next(i for i, line in enumerate(lines) if line.startswith(h))
             for h in ("## Installation", "## Quick start: images", "## Quick start: text")]
    assert order == sorted(order) and order[0] < 25
    assert 'pip install -c constraints.txt ".[demo,trl,peft]"' in README.read_text()  # .ci/readme_install runs it


def test_pages_cite_no_issue_numbers_a_reader_cannot_see():
    for page in [*PAGES, ROOT / "benchmarks" / "README.md"]:
        assert not re.search(r"\bissues? \d", page.read_text(), flags=re.I), page


def test_no_page_installs_from_the_package_index():
    """The package is not on the index: every install line is from a checkout."""
    for page in PAGES:
        text = page.read_text()
        assert "pip install hf_l2sp" not in text and "hf_l2sp[" not in text, page


def test_docs_site_builds_in_strict_mode(tmp_path):
    pytest.importorskip("mkdocs")
    mkdocs = Path(sys.executable).with_name("mkdocs")
    done = subprocess.run([str(mkdocs), "build", "--strict", "--site-dir", str(tmp_path / "site")], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    pages = list((tmp_path / "site").rglob("index.html"))
    assert len(pages) >= 8
    options = (tmp_path / "site" / "reference" / "config" / "index.html").read_text()
    import dataclasses

    from hf_l2sp import SPArguments

    for field in dataclasses.fields(SPArguments):  # generated from the dataclass: every field is there
        assert f"<code>{field.name}</code>" in options, field.name
    assert_renders_as_written(tmp_path / "site")


def assert_renders_as_written(site: Path) -> None:
    """The site says what the Markdown means: nested lists nest (no paragraph of literal '- '), a formula keeps its
    '*' and '||' (no emphasis, no '//'), and the home page's first screen has the install command and code."""
    for page in site.rglob("*.html"):
        html = page.read_text()
        paragraphs = re.findall(r"<p>(.*?)</p>", html, flags=re.S)
        assert not [p for p in paragraphs if re.match(r"\s*- ", p) or "\n- " in p], page
        assert not re.search(r"//(w|alpha)(?![w.])", html), page  # ||w|| rendered as //w//
    options = (site / "reference" / "config" / "index.html").read_text()
    assert "lr*alpha*(w - w0)" in options and "<em>alpha</em>" not in options
    penalties = (site / "reference" / "penalties" / "index.html").read_text()
    assert "alpha/2 * &#124;&#124;w_S - w0_S&#124;&#124;^2" in penalties or "||w_S - w0_S||^2" in penalties
    nested = (site / "concepts" / "parameters" / "index.html").read_text()
    assert re.search(r"<li>.*?<ul>\s*<li>renamed modules", nested, flags=re.S)
    home = (site / "index.html").read_text()
    text = re.sub(r"<[^>]+>", "", home[home.index("<h1"):])  # the words a reader sees, highlighting stripped
    first_screen = text[:2500]
    assert 'pip install -c constraints.txt ".[demo,trl,peft]"' in first_screen.replace("&quot;", '"')
    assert "load_backbone(" in first_screen


def test_every_option_is_described_in_the_config_docstring():
    """The options page takes each field's description from SPArguments' docstring: none may be missing."""
    import dataclasses
    import importlib.util

    from hf_l2sp import SPArguments

    spec = importlib.util.spec_from_file_location("docs_hooks", ROOT / "docs" / "hooks.py")
    hooks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hooks)
    described = hooks.field_descriptions()
    assert {f.name for f in dataclasses.fields(SPArguments)} <= set(described)


def test_quick_start_runs_as_written(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_L2SP_CACHE", str(tmp_path / "cache"))
    code = quick_start().replace("num_train_epochs=15", "num_train_epochs=1")  # same code path, shorter
    exec(compile(code, str(README), "exec"), {})
    out = capsys.readouterr().out
    assert "pretrained tensors" in out and "test_accuracy" in out
    run = tmp_path / "runs" / "quickstart"
    # Issue 22f: the 64 px evaluation transform of the script reaches the checkpoint, and the card names the data.
    from transformers import AutoImageProcessor

    config = json.loads((run / "config.json").read_text())
    assert config["pretrained_cfg"]["input_size"] == [3, 64, 64]
    processor = AutoImageProcessor.from_pretrained(run)
    assert processor(pil_images(1, size=90), return_tensors="pt")["pixel_values"].shape[-1] == 64
    card = (run / "README.md").read_text()
    assert "hf_l2sp:digits" in card and "a user-provided dataset" not in card and "`?`" not in card
    # The README's loading block, as written, on the quick start's folder.
    loading = python_block(*BLOCKS["loading"])
    exec(compile(loading, str(README), "exec"), {})
    assert "(3, 64, 64)" in capsys.readouterr().out


@pytest.mark.parametrize("command", ["./dev demo", "./dev test"])
def test_readme_names_the_two_setup_commands(command):
    assert command in README.read_text()


def test_demo_command_runs_offline(tmp_path, monkeypatch, capsys):
    """`./dev demo` end to end at a reduced size: every run finishes and leaves a loadable folder, and what it prints
    is compact: a header, one line per run, the table (no Trainer log dicts, no progress bars)."""
    from hf_l2sp.cli import main

    monkeypatch.setenv("HF_L2SP_CACHE", str(tmp_path / "cache"))
    assert main(["demo", "--output_dir", str(tmp_path / "demo"), "--samples_per_class", "2", "--epochs", "1",
                 "--seeds", "0", "1"]) == 0
    captured = capsys.readouterr()
    lines = captured.out.strip().splitlines()
    assert len(lines) == 1 + 4 + 3, captured.out
    assert lines[0].startswith("EfficientNet-Lite0 (ImageNet) -> digits, 2 images per class")
    assert [line.split()[:3] for line in lines[1:5]] == [["seed", "0", "l2_sp"], ["seed", "0", "l2"],
                                                          ["seed", "1", "l2_sp"], ["seed", "1", "l2"]]
    assert lines[6].startswith("test accuracy") and lines[7].startswith("backbone drift")
    assert "{'loss'" not in captured.out + captured.err and "it/s]" not in captured.err
    for seed in ("seed0", "seed1"):
        for run in ("l2_sp", "l2"):
            assert (tmp_path / "demo" / seed / run / "model.safetensors").is_file()
            assert (tmp_path / "demo" / seed / run / "README.md").is_file()


def test_demo_report_gives_means_and_the_paired_difference_with_its_interval():
    from hf_l2sp.commands.demo import report

    results = {"l2_sp": {"test accuracy": [0.80, 0.84, 0.82], "backbone drift": [0.02, 0.03, 0.025]},
               "l2": {"test accuracy": [0.30, 0.26, 0.28], "backbone drift": [0.20, 0.21, 0.19]}}
    table = report(results).splitlines()
    assert table[0].split()[:4] == ["mean", "of", "3", "seed(s)"]
    # differences 0.50, 0.58, 0.54: mean 0.54, sd 0.04, half-width 4.303 x 0.04 / sqrt(3) = 0.0994
    assert table[1].split() == ["test", "accuracy", "0.8200", "0.2800", "+0.5400", "(+0.4406", "to", "+0.6394)"]
    assert table[2].split()[:5] == ["backbone", "drift", "0.0250", "0.2000", "-0.1750"]
    single = report({name: {k: v[:1] for k, v in figures.items()} for name, figures in results.items()})
    assert "(" not in single.splitlines()[1]  # one seed: no interval


def python_block(*needles: str) -> str:
    found = [b for b in python_blocks() if all(n in b for n in needles)]
    assert len(found) == 1, needles
    return found[0]


def run_as_script(code: str, folder, swaps: dict[str, str]) -> str:
    """Save a README block as a script, swap in local stand-ins, and run it in a fresh interpreter, offline."""
    for old, new in swaps.items():
        assert old in code, old
        code = code.replace(old, new)
    script = folder / "example.py"
    script.write_text(code)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(README.parent)}
    done = subprocess.run([sys.executable, str(script)], cwd=folder, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stdout


def test_text_classification_example_runs_as_written(tmp_path):
    from .text_models import save_distilbert_base

    local = save_distilbert_base(tmp_path / "distilbert")
    block = python_block(*BLOCKS["text classification"])
    out = run_as_script(block, tmp_path, {'"distilbert/distilbert-base-uncased"': repr(local)})
    assert "task head: classifier" in out and "pre_classifier.weight" in out
    assert "pipeline_tag: text-classification" in (tmp_path / "runs" / "text" / "README.md").read_text()


def test_sft_example_runs_as_written(tmp_path):
    pytest.importorskip("trl")
    from .text_models import save_qwen2_lm

    local = save_qwen2_lm(tmp_path / "qwen2")  # the quick start's family, at a tiny size
    out = run_as_script(python_block(*BLOCKS["sft"]), tmp_path, {'"Qwen/Qwen2.5-0.5B"': repr(local)})
    assert "'anchored_tensors': 8" in out and "'head_tensors': 0" in out  # q k v o gate up down + tied embedding
    assert "pipeline_tag: text-generation" in (tmp_path / "runs" / "sft" / "README.md").read_text()


def test_forgetting_sft_example_runs_as_written(tmp_path):
    pytest.importorskip("trl")
    from .text_models import save_llama_lm

    local = save_llama_lm(tmp_path / "llama")
    out = run_as_script(python_block(*BLOCKS["forgetting sft"]), tmp_path,
                        {'"HuggingFaceTB/SmolLM2-135M"': repr(local)})
    steps = eval(out.strip().splitlines()[-1])
    assert [step for step, _ in steps] == [0, 2, 4] and steps[0][1] == 0.0 and steps[-1][1] != 0.0
    card = (tmp_path / "runs" / "forgetting-sft" / "README.md").read_text()
    assert "| general | loss |" in card and "| target | KL(start ‖ now) per token | 0 |" in card
    assert (tmp_path / "runs" / "forgetting-sft" / "forgetting.png").is_file()


def test_forgetting_image_example_runs_as_written(tmp_path):
    out = run_as_script(python_block(*BLOCKS["forgetting images"]), tmp_path,
                        {"num_train_epochs=5": "max_steps=2", "max_eval_samples=200": "max_eval_samples=20"})
    assert "{'mnist': 'agreement'}" in out
    card = (tmp_path / "runs" / "forgetting-images" / "README.md").read_text()
    assert "| mnist | agreement | 1.0000 |" in card


def test_compare_example_runs_as_written_as_a_script(tmp_path):
    """Issue 22h: the compare snippet, saved as a script, with its two worker processes (spawn re-imports the
    script: the `__main__` guard is what makes it work). Shortened runs; the code path is the same."""
    code = python_block(*BLOCKS["compare"])
    out = run_as_script(code, tmp_path, {
        '"output_dir": "runs/compare/best"}': '"output_dir": "runs/compare/best", "max_steps": 2, '
                                              '"max_train_samples_per_class": 3, "eval_strategy": "no", '
                                              '"save_strategy": "no", "load_best_model_at_end": False}',
        "final_seeds=3": "final_seeds=1"})
    assert "# hf-l2sp compare" in out and "| `l2_sp` |" in out


def test_lora_example_runs_as_written(tmp_path):
    pytest.importorskip("peft")
    from .text_models import save_bert_base

    local = save_bert_base(tmp_path / "bert")
    out = run_as_script(python_block(*BLOCKS["lora"]), tmp_path,
                        {'"google-bert/bert-base-uncased"': repr(local),
                         'report_to="none"': 'report_to="none", use_cpu=True'})
    assert "'lora_layers': 2" in out and "'anchored_tensors': 0" in out  # the tiny BERT has one layer
    assert (tmp_path / "runs" / "lora-merged" / "config.json").is_file()
    card = (tmp_path / "runs" / "lora-merged" / "README.md").read_text()
    assert "LoRA on 2 layers" in card
    assert 'from_pretrained("lora-merged")' in card and 'from_pretrained("lora")' not in card  # the merged folder
    # what the run did: the base is the anchor (no copy), the adapters are counted, and no "no drift" beside them
    assert "the frozen base is the anchor; no copy is kept" in card and "copied when training started" not in card
    assert "| LoRA adapters (their distance to the frozen base) | 2 layers" in card
    assert "No anchored tensors: no drift to report" not in card


@pytest.mark.slow
def test_quick_start_as_written_ends_near_the_accuracy_the_docs_state(tmp_path, monkeypatch, capsys):
    """The image quick start, all 15 epochs (about a minute): the docs say it ends near 0.9 test accuracy (0.924 on
    the development machine; a few points either way across machines)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_L2SP_CACHE", str(tmp_path / "cache"))
    exec(compile(quick_start(), str(README), "exec"), {})
    accuracy = float(re.search(r"'test_accuracy': ([0-9.]+)", capsys.readouterr().out).group(1))
    assert accuracy > 0.8


#: A duration stated in prose or a comment: "4.5 min", "about a minute", "minutes", "65 s", "2 hours".
DURATION = re.compile(r"\b\d+(?:\.\d+)?\s*(?:min|minutes?|hours?)\b|\babout a minute\b|\bminutes\b"
                      r"|\b\d+(?:\.\d+)?\s*s\b(?!\w)")
MONTHS = "January|February|March|April|May|June|July|August|September|October|November|December"
WHEN = re.compile(rf"(?:{MONTHS})\s+20\d\d|20\d\d-\d\d-\d\d")


def test_every_stated_time_says_when_it_was_measured():
    """A time the README or the docs state (how long a command, a run or the suite takes) comes with the date it was
    measured (benchmarks/stated_times.py and the other benchmarks measure them), in the same paragraph or block,
    or for a block of printed output, in the paragraph that introduces it."""
    undated = []
    for page in PAGES:
        previous = ""
        for paragraph in re.split(r"\n\s*\n", page.read_text()):
            # a program's printed output (a fence without a language) is dated by the paragraph that introduces it
            dated = WHEN.search(paragraph) or (paragraph.startswith("```\n") and WHEN.search(previous))
            previous = paragraph
            if (found := DURATION.search(paragraph)) and not dated:
                undated.append(f"{page.relative_to(ROOT)}: ...{paragraph[max(0, found.start() - 60):found.end()]}")
    assert not undated, "\n".join(undated)


def installation_demo_block() -> str:
    page = (ROOT / "docs" / "installation.md").read_text()
    section = page.split("## What `./dev demo` prints", 1)[1]
    return re.search(r"```\n(EfficientNet-Lite0.*?)```", section, flags=re.S).group(1)


def test_the_demo_output_on_the_installation_page_is_what_the_demo_prints():
    """The block the installation page shows: the header, one line per run, and the table that `report` makes of
    those lines (so the page cannot show figures the demo would not print from its own runs)."""
    from hf_l2sp.commands.demo import report

    lines = installation_demo_block().strip().splitlines()
    runs = [line.split() for line in lines if line.startswith("seed ")]
    results = {name: {"test accuracy": [], "backbone drift": []} for name in ("l2_sp", "l2")}
    for words in runs:
        results[words[2]]["test accuracy"].append(float(words[5]))
        results[words[2]]["backbone drift"].append(float(words[8]))
    assert lines[0].startswith("EfficientNet-Lite0 (ImageNet) -> digits, 10 images per class")
    assert len(runs) == 6 and all(line.startswith("seed ") for line in lines[1:7])
    # the runs' lines are rounded to 4 decimals, so the recomputed table may differ in the last digit
    shown, recomputed = lines[7:], report(results).splitlines()
    assert len(shown) == len(recomputed) == 3 and shown[0] == recomputed[0]
    for got, want in zip(shown[1:], recomputed[1:]):
        got, want = got.replace("(", " ").replace(")", " ").split(), want.replace("(", " ").replace(")", " ").split()
        assert got[:2] == want[:2] and [float(x) for x in got[2:] if x != "to"] == pytest.approx(
            [float(x) for x in want[2:] if x != "to"], abs=2e-4)


#: What the docs say the default demo prints, on any machine of this kind (2 CPU cores): the installation page.
DEMO_RANGES = {"l2_sp": (0.75, 0.90), "l2": (0.10, 0.35), "gap": 0.40}


def test_the_docs_state_the_demo_ranges_the_slow_test_checks():
    text = " ".join((ROOT / "docs" / "installation.md").read_text().split())
    (sp_low, sp_high), (l2_low, l2_high) = DEMO_RANGES["l2_sp"], DEMO_RANGES["l2"]
    assert f"`l2_sp` between {sp_low:.2f} and {sp_high:.2f}" in text
    assert f"`l2` between {l2_low:.2f} and {l2_high:.2f}" in text
    assert f"a gap of at least +{DEMO_RANGES['gap']:.2f}" in text


@pytest.mark.slow
def test_the_default_demo_prints_figures_in_the_stated_ranges(tmp_path, monkeypatch, capsys):
    """`./dev demo` as shipped (3 seeds, 10 images per class, 15 epochs): the mean test accuracies and the paired gap
    fall where the installation page says, and the gap's 95 % interval lies above 0 (outside the demo's noise)."""
    from hf_l2sp.cli import main

    monkeypatch.setenv("HF_L2SP_CACHE", str(tmp_path / "cache"))
    assert main(["demo", "--output_dir", str(tmp_path / "demo")]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("test accuracy"))
    drift = next(line for line in out.splitlines() if line.startswith("backbone drift"))
    sp, l2, gap, low = (float(x.strip("()")) for x in row.split()[2:6])
    assert float(drift.split()[2]) <= 0.035  # "near 0.03"
    assert DEMO_RANGES["l2_sp"][0] <= sp <= DEMO_RANGES["l2_sp"][1]
    assert DEMO_RANGES["l2"][0] <= l2 <= DEMO_RANGES["l2"][1]
    assert gap >= DEMO_RANGES["gap"] and low > 0


def test_the_two_demo_recipes_differ_only_in_the_regularizer():
    from hf_l2sp.commands.demo import RUNS
    from hf_l2sp.pipeline.options import load_recipe

    (sp_name, sp_recipe), (l2_name, l2_recipe) = RUNS
    sp, l2 = load_recipe(sp_recipe), load_recipe(l2_recipe)
    assert (sp.pop("regularizer"), l2.pop("regularizer")) == (sp_name, l2_name) == ("l2_sp", "l2")
    sp.pop("output_dir"), l2.pop("output_dir")
    assert sp == l2


def test_the_demo_silences_library_chatter_but_not_warnings_and_restores_it(capsys):
    import logging

    import transformers

    from hf_l2sp.commands.demo import quiet_libraries
    from hf_l2sp.utils.logs import announce

    package = logging.getLogger("hf_l2sp")
    before = (transformers.logging.get_verbosity(), package.level, list(package.handlers))
    with quiet_libraries():
        announce(logging.getLogger("hf_l2sp"), "construction line")
        logging.getLogger("hf_l2sp.train").warning("a warning the user must see")
        assert transformers.logging.get_verbosity() == transformers.logging.ERROR
    err = capsys.readouterr().err
    assert "a warning the user must see" in err and "construction line" not in err
    assert (transformers.logging.get_verbosity(), package.level, list(package.handlers)) == before


def test_the_demo_drops_only_deepspeeds_no_gpu_notice(capsys):
    import logging

    from hf_l2sp.commands.demo import quiet_libraries

    log = logging.getLogger("DeepSpeed")
    with quiet_libraries():
        notice = log.makeRecord("DeepSpeed", logging.WARNING, "x", 1, "Setting accelerator to CPU. If you ...", (),
                                None)
        other = log.makeRecord("DeepSpeed", logging.WARNING, "x", 1, "something else", (), None)
        assert not log.filter(notice) and log.filter(other)
    assert log.filter(notice)
