"""`hf-l2sp study`: the transfer study (far: ImageNet Lite0 -> digits, MNIST; near: MNIST 0-4 -> 5-9), all penalties.

    hf-l2sp study --output results/study                 # the full study (resumable: rerun to continue)
    hf-l2sp study --quick --output results/quick         # one dataset, two sizes, two seeds, no grid

Writes results.csv (every run), runs.jsonl, results.md, accuracy.png, drift.png, selection.json, command.txt
and invocations.jsonl (one line per invocation: commit, start, minutes, runs executed).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

from ..utils.logs import configure_command_logging
from ..study import Study, full_plan, quick_plan, write_report
from ..study.protocol import REGULARIZERS
from ..study.sources import source_summary
from ..utils.errors import ConfigError

INVOCATIONS = "invocations.jsonl"


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="hf-l2sp study", description=__doc__.split("\n")[0])
    parser.add_argument("--output", default="results/study", help="Results folder (runs already there are kept).")
    parser.add_argument("--quick", action="store_true", help="One dataset, two sizes, two seeds, no grid.")
    parser.add_argument("--workers", type=int, default=2, help="One-thread worker processes (1: in this process).")
    parser.add_argument("--settings", default=None, help="Comma-separated subset of the settings to run.")
    parser.add_argument("--regularizers", default=None, help=f"Comma-separated subset of {', '.join(REGULARIZERS)}.")
    parser.add_argument("--no_flush_denormal", action="store_true", help="Keep denormal floats (slower on x86).")
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error(f"--workers must be >= 1; got {args.workers}.")
    return args


def git_commit(package: Path | None = None) -> str:
    """The checkout's commit, with "+modified" when the package's files differ from it, new ones included (a record
    must not claim a commit whose code did not produce it); "unknown" outside a git checkout (an installed wheel)."""
    package = package or Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=package).stdout.strip()
        tracked = subprocess.run(["git", "ls-files", "--", "__init__.py"], capture_output=True, text=True,
                                 timeout=5, cwd=package).stdout.strip()
        if not head or not tracked:  # not a checkout, or a copy that merely sits inside some repository
            return "unknown"
        changed = subprocess.run(["git", "status", "--porcelain", "--", "."], capture_output=True, text=True,
                                 timeout=5, cwd=package).stdout.strip()  # edits, and new files not yet committed
        return head + ("+modified" if changed else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def build_plan(args: argparse.Namespace):
    plan = quick_plan() if args.quick else full_plan()
    if args.settings:
        wanted = [s.strip() for s in args.settings.split(",") if s.strip()]
        known = [s.name for s in plan.settings]
        unknown = [s for s in wanted if s not in known]
        if unknown:
            raise ConfigError(f"Unknown setting(s) {unknown}; choices: {', '.join(known)}.")
        plan = dataclasses.replace(plan, settings=tuple(s for s in plan.settings if s.name in wanted))
    if args.regularizers:
        plan = dataclasses.replace(plan, regularizers=tuple(r.strip() for r in args.regularizers.split(",")))
    return plan


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[2:] if argv is None else argv)
    configure_command_logging()
    args = parse(argv)
    plan = build_plan(args)
    output = Path(args.output)
    start = time.time()
    study = Study(plan, output, workers=args.workers, flush_denormal=not args.no_flush_denormal)
    selection = study.run()
    for setting in plan.settings:
        selection[setting.name]["description"] = setting.description
        selection[setting.name]["source"] = source_summary(output, setting)
    command = "hf-l2sp study " + " ".join(shlex.quote(a) for a in argv)
    invocation = {"command": command, "git_commit": git_commit(), "workers": args.workers,
                  "flush_denormal": not args.no_flush_denormal,
                  "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
                  "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(start)),
                  "minutes": round((time.time() - start) / 60, 1),
                  "runs_executed": sum(p.executed for p in study.phases)}
    history = output / INVOCATIONS
    if invocation["runs_executed"] or not history.is_file():  # each invocation that ran something adds a line
        with history.open("a") as handle:
            handle.write(json.dumps(invocation) + "\n")
    invocations = [json.loads(line) for line in history.read_text().splitlines() if line.strip()]
    meta = {**invocation, "invocations": invocations}
    paths = write_report(output, selection, meta)
    (output / "command.txt").write_text(command + "\n")
    print("\n".join(f"{name}: {path}" for name, path in paths.items()))
    return 0
