"""`hf-l2sp` command line: a thin dispatcher over `hf_l2sp.commands.*`.

Errors a user can cause (bad recipe or option, missing file, unreachable Hub, mismatched weights, unsupported
accelerate set-up, a diverging penalty) are `hf_l2sp.utils.errors.UserError`s: printed as one line, exit status 2;
set HF_L2SP_DEBUG=1 to see the traceback. Anything else, a plain ValueError included, is a bug and keeps its
traceback.
"""

from __future__ import annotations

import difflib
import importlib
import os
import sys

from .utils.errors import UserError

COMMANDS = {
    "train": ("hf_l2sp.commands.train", "Fine-tune a pretrained backbone on an image dataset with an SP regularizer."),
    "evaluate": ("hf_l2sp.commands.evaluation", "Evaluate a fine-tuned checkpoint on a dataset split (top-1/5, "
                 "per class, bootstrap intervals)."),
    "fisher": ("hf_l2sp.commands.fisher", "Estimate the diagonal Fisher of a source classifier (for l2_sp_fisher)."),
    "search": ("hf_l2sp.commands.search", "Search a regularizer's coefficient (and lr) on validation; best.yaml."),
    "compare": ("hf_l2sp.commands.search", "Tune several regularizers, then compare them on paired seeds."),
    "study": ("hf_l2sp.commands.study", "Transfer study: every regularizer on offline real data, tables and plots."),
    "lm-study": ("hf_l2sp.commands.lm_study", "Forgetting study on SmolLM2-135M: L2-SP against a lower learning rate, "
                 "L2, LoRA, weight averaging and replay."),
    "push": ("hf_l2sp.commands.push", "Upload a finished run folder to the Hugging Face Hub."),
    "demo": ("hf_l2sp.commands.demo", "Offline demo: ImageNet Lite0 on real digits, L2-SP beside L2."),
    "regularizers": ("hf_l2sp.commands.info", "List the registered regularizers and their formulas."),
    "version": ("hf_l2sp.commands.info", "Print the hf_l2sp version."),
}


def usage() -> str:
    lines = ["usage: hf-l2sp <command> [options]   (hf-l2sp <command> --help for its options)", "", "commands:"]
    lines += [f"  {name:14s}{help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        near = difflib.get_close_matches(name, COMMANDS, n=1)
        hint = f" Did you mean {near[0]!r}?" if near else ""
        print(f"hf-l2sp: unknown command {name!r}.{hint} Commands: {', '.join(COMMANDS)} "
              "(hf-l2sp --help says what each does).", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    entry = getattr(module, {"regularizers": "regularizers", "version": "version",
                             "compare": "compare_main"}.get(name, "main"))
    try:
        return entry(rest) or 0
    except UserError as err:  # a plain ValueError, OSError, ... is a bug: its traceback stays
        if os.environ.get("HF_L2SP_DEBUG"):
            raise
        print(f"hf-l2sp {name}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
