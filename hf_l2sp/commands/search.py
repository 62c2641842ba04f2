"""`hf-l2sp search` and `hf-l2sp compare`: every `hf-l2sp train` flag (model, data, `--config` recipe) plus the search.

    hf-l2sp search --config offline_lite0_digits_l2sp --output_dir runs/search --search_alpha 0.001,0.01,0.1
    hf-l2sp search --config ... --n_trials 20 --search_lr 0.003,0.1     (optuna TPE; the search extra)
    hf-l2sp compare --config ... --output_dir runs/compare --regularizers l2,l2_sp --samples_per_class 5,20

Selection reads validation accuracy only; the test split is loaded only by `--final` (search) and by compare's
final runs. Finished runs are kept under the output folder and never redone: rerun the command to resume.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..utils.logs import configure_command_logging
from ..pipeline.options import options_from_argv
from ..tuning import compare, search
from ..tuning.engine import RunsFailed
from ..pipeline.options import ARGUMENT_TYPES
from ..utils.errors import ConfigError


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from err


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from err


def _search_parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, add_help=False)
    parser.add_argument("--search_alpha", type=_floats, default=None,
                        help="Grid of the regularizer's coefficient (default: its own grid from the registry).")
    parser.add_argument("--n_trials", type=int, default=None, help="optuna TPE trials over log(value) instead.")
    parser.add_argument("--search_seeds", type=int, default=1, help="Runs per point (head init, batch order).")
    parser.add_argument("--search_lr", type=_floats, default=None,
                        help="Learning rates searched jointly with the coefficient.")
    parser.add_argument("--vary_split", action="store_true",
                        help="Each search seed also draws its own training subset and validation carve.")
    parser.add_argument("--workers", type=int, default=1, help="Runs in parallel, one-thread processes.")
    parser.add_argument("--max_forgetting", type=float, default=None,
                        help="With --retention_dataset: choose the best target among the settings whose mean "
                             "forgetting of the retention set is at most this.")
    return parser


def _run(argv: list[str], prog: str, extra) -> tuple[argparse.Namespace, dict]:
    parser = _search_parser(prog)
    extra(parser)
    if any(a in ("-h", "--help") for a in argv):
        parser.print_help()
        print("\nand every `hf-l2sp train` option (see `hf-l2sp train --help`).")
        raise SystemExit(0)
    known, rest = parser.parse_known_args(argv)
    if any(a == "--accelerate_config" or a.startswith("--accelerate_config=") for a in rest):
        raise ConfigError(f"{prog} runs its trials as local processes (--workers); --accelerate_config is for "
                          "hf-l2sp train.")
    options = options_from_argv(ARGUMENT_TYPES, rest, prog)
    if not options.get("output_dir"):
        raise ConfigError(f"{prog} needs --output_dir (in the recipe or as a flag): its results go there.")
    if known.workers < 1 or known.search_seeds < 1:
        raise ConfigError("--workers and --search_seeds must be >= 1.")
    configure_command_logging()
    return known, options


def _user_facing(run):
    """Failed runs were logged with their tracebacks; the command ends with one line saying which failed."""
    try:
        return run()
    except RunsFailed as err:
        raise ConfigError(str(err)) from err


def _front_table(points: list[dict], target: str) -> str:
    """Both axes of every setting, as printed by search (compare's report.md has its own table)."""
    lines = [f"setting | {target} | forgetting | on front | within budget"]
    for p in sorted(points, key=lambda p: p["forgetting"]):
        value = "" if p["value"] is None else f" {p['value']:g}"
        lines.append(f"{p['setting']}{value} lr {p['learning_rate']:g} | {p['target']:.4f} | {p['forgetting']:.4f} | "
                     f"{'yes' if p['on_front'] else 'no'} | {'yes' if p['within_budget'] else 'no'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    def extra(parser):
        parser.add_argument("--final", action="store_true", help="Then train the chosen value and test it once.")

    known, options = _run(list(sys.argv[2:] if argv is None else argv), "hf-l2sp search", extra)
    out = Path(options["output_dir"])
    summary = _user_facing(lambda: search(
        {**options, "output_dir": str(out / "best")}, out, values=known.search_alpha, n_trials=known.n_trials,
        seeds=known.search_seeds, learning_rates=known.search_lr, vary_split=known.vary_split, final=known.final,
        workers=known.workers, max_forgetting=known.max_forgetting))
    named = " ".join(f"{field} {summary['value']}" for field in summary["fields"]) or "no coefficient"
    print(f"best {summary['regularizer']}: {named} lr {summary['learning_rate']} "
          f"(mean val accuracy {summary['mean_val_accuracy']:.4f}, decided by {summary['decided_by']}"
          + (f"; mean forgetting {summary['mean_forgetting']:.4f}" if summary.get("mean_forgetting") is not None
             else "") + f"); recipe: {out / 'best.yaml'}")
    if "front" in summary:
        print(_front_table(summary["front"], "val accuracy"))
    if "final" in summary:
        print(f"test accuracy of the chosen configuration: {summary['final']['test_accuracy']:.4f}")
    print(json.dumps({k: v for k, v in summary.items() if k != "best_options"}, default=str))
    return 0


def compare_main(argv: list[str] | None = None) -> int:
    def extra(parser):
        parser.add_argument("--regularizers", required=True, type=lambda t: [x.strip() for x in t.split(",")
                                                                              if x.strip()],
                            help="Comma-separated; the first is the baseline of the paired differences.")
        parser.add_argument("--samples_per_class", type=_ints, default=None, help="Repeat per training size.")
        parser.add_argument("--final_seeds", type=int, default=5, help="Paired final runs per regularizer.")

    known, options = _run(list(sys.argv[2:] if argv is None else argv), "hf-l2sp compare", extra)
    if known.search_alpha is not None:
        raise ConfigError("hf-l2sp compare tunes each regularizer on its own grid (their scales differ); "
                          "--search_alpha is for hf-l2sp search.")
    out = Path(options["output_dir"])
    result = _user_facing(lambda: compare(
        {**options, "output_dir": str(out / "best")}, out, known.regularizers,
        samples_per_class=known.samples_per_class, final_seeds=known.final_seeds, search_seeds=known.search_seeds,
        learning_rates=known.search_lr, search_lr=known.search_lr is not None, vary_split=known.vary_split,
        n_trials=known.n_trials, workers=known.workers, max_forgetting=known.max_forgetting))
    print((out / "report.md").read_text())
    print(json.dumps(result["results"], default=str))
    return 0
