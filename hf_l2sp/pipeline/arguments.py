"""The command-line parser of the run commands: HfArgumentParser over the option dataclasses, with first errors that
are one line naming the fix, and a `--help` short enough to read (`--help-all` prints every option)."""

from __future__ import annotations

import argparse
import difflib
import re
import sys
import textwrap

from transformers import HfArgumentParser

from ..utils.errors import ConfigError

#: What `--help` shows, in this order, when the parser has it (`--help-all` shows everything).
MAIN_OPTIONS = ("config", "accelerate_config", "model_name_or_path", "dataset_name", "output_dir", "regularizer",
                "sp_alpha", "sp_beta", "sp_include", "sp_mode", "sp_head", "sp_reference", "sp_fisher",
                "learning_rate", "num_train_epochs", "max_steps", "per_device_train_batch_size",
                "max_train_samples_per_class", "image_size", "augmentation", "resume_from_checkpoint",
                "push_to_hub", "hub_model_id", "model", "num_samples", "mode", "output")
HELP_OVERRIDES = {
    "resume_from_checkpoint": "A checkpoint-N folder to resume from, or `last` for the newest complete checkpoint "
                              "in output_dir; the anchor w0 is restored from it.",
}


class OptionsParser(HfArgumentParser):
    """HfArgumentParser whose errors are one line (argparse prints the whole usage first, hundreds of options)."""

    def error(self, message: str):
        print(f"{self.prog}: error: {message}. See `{self.prog} --help`.", file=sys.stderr)
        sys.exit(2)

    def print_help(self, file=None):
        """The main options only; `--help-all` prints every one."""
        by_dest = {a.dest: a for a in self._actions if a.option_strings}
        lines = [f"usage: {self.prog} [--config RECIPE] [--option value ...]", ""]
        if self.description:
            lines += [self.description, ""]
        lines.append("main options (`--help-all` lists every option, with its default):")
        for dest in MAIN_OPTIONS:
            action = by_dest.get(dest)
            if action is not None:
                text = textwrap.wrap(_first_sentence(action.help or ""), 84) or [""]
                lines.append(f"  {action.option_strings[0]:30s} {text[0]}")
                lines += [" " * 33 + more for more in text[1:]]
        lines += ["  --help-all                     every option, with its default"]
        print("\n".join(lines), file=file or sys.stdout)

    def print_full_help(self):
        super().print_help()


class _HelpAll(argparse.Action):
    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help="Every option.")

    def __call__(self, parser, namespace, values, option_string=None):
        parser.print_full_help()
        parser.exit()


def make_parser(dataclass_types: tuple[type, ...], prog: str, description: str) -> OptionsParser:
    parser = OptionsParser(dataclass_types, prog=prog, description=description)
    parser.add_argument("--config", default=None, help="YAML recipe (a path, or a packaged recipe's name such as "
                        "offline_lite0_digits_l2sp): keys are the options below; flags override it.")
    parser.add_argument("--accelerate_config", default=None,
                        help="Relaunch under `accelerate launch` with this config: a YAML path or a shipped name "
                             "(single_gpu, multi_gpu, multi_node, fsdp2, zero1, zero2, zero3).")
    parser.add_argument("--help-all", action=_HelpAll)
    for action in parser._actions:
        if action.dest in HELP_OVERRIDES:
            action.help = HELP_OVERRIDES[action.dest]
    # --config first in the full listing too: its help says the other keys are "the options below".
    parser._actions.sort(key=lambda a: a.dest not in ("help", "config"))
    for group in parser._action_groups:
        group._group_actions.sort(key=lambda a: a.dest not in ("help", "config"))
    return parser


def refuse_unknown(parser: OptionsParser, argv: list[str]) -> None:
    """Flags no option knows stop here, in one line, with the nearest valid names."""
    _, extra = parser.parse_known_args(argv)
    flags = [a for a in extra if a.startswith("-")]
    if not extra:
        return
    known = [a.option_strings[0] for a in parser._actions if a.option_strings]
    hints = []
    for flag in flags:
        close = difflib.get_close_matches(flag.split("=", 1)[0], known, n=2, cutoff=0.75)
        if close:
            hints.append(f"{flag.split('=', 1)[0]} -> {' or '.join(close)}?")
    unknown = " ".join(flags) if flags else " ".join(extra)
    raise ConfigError(f"unknown option(s) {unknown}" + (f" (did you mean: {'; '.join(hints)})" if hints else "")
                      + f". See `{parser.prog} --help`.")


def _first_sentence(text: str) -> str:
    text = " ".join(text.split())
    end = re.search(r"\.\s+(?=[A-Z`])", text)
    return text if end is None else text[: end.start() + 1]
