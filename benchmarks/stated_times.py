"""How long what the README and the docs tell a newcomer to run takes on this machine: every time they state comes
from here (the table in benchmarks/README.md, with its date and machine).

    python benchmarks/stated_times.py                        # quick start, recipe, demo, compare, study --quick
    python benchmarks/stated_times.py --cases setup tests    # the slow ones: a fresh venv (6 GB), the suite
    python benchmarks/stated_times.py --repeat 2             # each case twice: a range, not one figure

Each case runs as a newcomer runs it, in a fresh process and a temporary folder, offline, with this checkout's
`.venv` (`./dev setup` builds it), and is timed from start to exit (imports, data and model loading included).
Run it alone on the machine: another job on one of the two cores doubles the figures.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = ROOT / ".venv" / "bin"


def readme_block(*needles: str) -> str:
    """The one Python block of the README or the docs holding every needle (as the README tests find it)."""
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    blocks = {b for page in pages for b in re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)}
    found = [b for b in blocks if all(n in b for n in needles)]
    if len(found) != 1:
        raise SystemExit(f"expected one Python block with {needles}, found {len(found)}")
    return found[0]


def script(code: str) -> list[str]:
    def command(folder: Path) -> list[str]:
        (folder / "example.py").write_text(code)
        return [str(VENV_BIN / "python"), "example.py"]
    return command


def cli(*args: str):
    return lambda folder: [str(VENV_BIN / "hf-l2sp"), *args]


def fresh_venv(folder: Path) -> list[str]:
    """A venv in `folder`, then the install `./dev setup` makes (pip's cache is used, as on a second install)."""
    return ["bash", "-c", f"python3 -m venv {folder}/venv && {folder}/venv/bin/python -m pip install -q "
                          f"-c {ROOT}/constraints.txt '{ROOT}[test,demo]'"]


CASES = {
    "quickstart": ("image quick start (README's first example)",
                   script(readme_block("load_backbone(", "trainer.train()", "runs/quickstart"))),
    "train": ("hf-l2sp train --config offline_lite0_digits_l2sp",
              cli("train", "--config", "offline_lite0_digits_l2sp", "--output_dir", "run")),
    "demo": ("./dev demo (hf-l2sp demo)", cli("demo", "--output_dir", "demo")),
    "compare": ("compare snippet (search page)", script(readme_block("compare(options", "load_recipe"))),
    "study_quick": ("hf-l2sp study --quick", cli("study", "--quick", "--output", "quick")),
    "lm_study_quick": ("hf-l2sp lm-study --quick, empty cache",
                       cli("lm-study", "--quick", "--output", "lm", "--cache", "cache")),
    "setup": ("fresh venv: pip install -c constraints.txt '.[test,demo]'", fresh_venv),
    "tests": ("./dev test -q (the suite)", lambda folder: [str(ROOT / "dev"), "test", "-q"]),
}
DEFAULT = ["quickstart", "train", "demo", "compare", "study_quick"]


def run_case(name: str) -> float:
    label, build = CASES[name]
    folder = Path(tempfile.mkdtemp(prefix=f"stated_{name}_"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONPATH": str(ROOT)}
    try:
        command = build(folder)
        start = time.perf_counter()
        done = subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        if done.returncode != 0:
            raise SystemExit(f"{label} failed ({done.returncode}):\n{done.stderr[-3000:]}")
        return seconds
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 100 else f"{seconds:.0f} s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=DEFAULT)
    parser.add_argument("--repeat", type=int, default=1)
    options = parser.parse_args()
    print(f"{date.today().isoformat()}, {platform.machine()}, {os.cpu_count()} CPUs, Python "
          f"{platform.python_version()}\n")
    print("| what | runs | time |\n| --- | --- | --- |")
    for name in options.cases:
        times = [run_case(name) for _ in range(options.repeat)]
        spread = minutes(min(times)) if len(times) == 1 else f"{minutes(min(times))} to {minutes(max(times))}"
        print(f"| {CASES[name][0]} | {len(times)} | {spread} |", flush=True)


if __name__ == "__main__":
    sys.exit(main())
