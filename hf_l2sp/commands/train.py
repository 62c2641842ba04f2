"""`hf-l2sp train`: fine-tune a pretrained backbone on an image dataset with an SP regularizer.

    hf-l2sp train --config offline_lite0_digits_l2sp   (a packaged recipe: hf_l2sp/recipes/)
    hf-l2sp train --config recipes/resnet50_dogs_l2_sp.yaml --sp_alpha 0.01 --output_dir runs/dogs
    hf-l2sp train --accelerate_config multi_gpu --config ...   (or fsdp2, zero2, zero3, multi_node, a YAML path)
    accelerate launch --multi_gpu --num_processes 2 -m hf_l2sp.cli train --config ...
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
from pathlib import Path

#: `--help`'s text, rendered from the parser (`render_help`) and kept here so that it answers without importing
#: torch and transformers; a test checks it against the parser.
HELP_FILE = Path(__file__).with_name("train_help.txt")


def parse_args(argv: list[str] | None = None):
    from ..pipeline.options import ARGUMENT_TYPES, parse_with_recipe

    return parse_with_recipe(ARGUMENT_TYPES, argv, prog="hf-l2sp train", description=__doc__.split("\n")[0])


def render_help() -> str:
    """What the parser prints for `--help` (the main options)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
        parse_args(["--help"])
    return out.getvalue()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[2:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv) and "--help-all" not in argv:
        print(HELP_FILE.read_text(), end="")
        raise SystemExit(0)
    from ..pipeline.finetune import finetune
    from ..training.deepspeed_setup import deepspeed_command_defaults
    from ..utils.logs import configure_command_logging
    from .launch import relaunch_under_accelerate, split_accelerate_config

    config, rest = split_accelerate_config(argv)
    if config:
        return relaunch_under_accelerate(config, "train", rest)
    configure_command_logging()
    metrics = finetune(*parse_args(deepspeed_command_defaults(rest)))
    if "test_accuracy" in metrics and os.environ.get("RANK", "0") == "0":  # once, not once per process
        print(f"test accuracy: {metrics['test_accuracy']:.4f}")
    return 0
