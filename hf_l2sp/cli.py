"""`hf-l2sp` command line: a thin dispatcher over subcommands."""

from __future__ import annotations

import argparse
import sys


def _cmd_regularizers(_args: argparse.Namespace) -> int:
    from .regularizers import REGULARIZERS

    for name in sorted(REGULARIZERS):
        print(f"{name:16s} {REGULARIZERS[name].formula}")
    return 0


def _cmd_version(_args: argparse.Namespace) -> int:
    from . import __version__

    print(__version__)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-l2sp", description="L2-SP fine-tuning for timm and transformers.")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("regularizers", help="List the registered regularizers and their formulas.").set_defaults(
        func=_cmd_regularizers
    )
    commands.add_parser("version", help="Print the hf_l2sp version.").set_defaults(func=_cmd_version)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
