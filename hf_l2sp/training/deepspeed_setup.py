"""What a DeepSpeed run started by `accelerate launch` needs from the script's own config, checked when the config
is built (DeepSpeed itself finds out only when training starts, with a traceback)."""

from __future__ import annotations

import os

import torch

from ..utils.errors import ConfigError


def launched_with_deepspeed() -> bool:
    """True inside `accelerate launch` with a DeepSpeed config (accelerate says so in the environment)."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() in ("1", "true", "yes")


def check_deepspeed_launch(args) -> None:
    """The accelerate config's precision and the training arguments' must agree, and a machine without a GPU
    needs `use_cpu`: each mismatch is one line naming the setting to change."""
    if not launched_with_deepspeed():
        return
    precision = os.environ.get("ACCELERATE_MIXED_PRECISION", "no").lower()
    for dtype in ("bf16", "fp16"):
        if precision == dtype and not getattr(args, dtype):
            raise ConfigError(
                f"The accelerate config runs DeepSpeed in {dtype} (mixed_precision: {dtype}) but the training "
                f"arguments have {dtype}=False: pass {dtype}=True (--{dtype} true), or set mixed_precision: 'no' "
                "in the accelerate config.")
    if not args.use_cpu and not torch.cuda.is_available():
        raise ConfigError(
            "DeepSpeed on a machine without a GPU (DS_ACCELERATOR=cpu) needs use_cpu=True (--use_cpu true): without "
            "it Trainer counts a GPU per process and DeepSpeed stops on its train_batch_size check.")


def deepspeed_command_defaults(argv: list[str]) -> list[str]:
    """`hf-l2sp train` under DeepSpeed: the precision of the accelerate config and, without a GPU, `use_cpu`, unless
    the command line sets them (a recipe that disagrees meets `check_deepspeed_launch`)."""
    if not launched_with_deepspeed():
        return argv
    given = {a.split("=", 1)[0] for a in argv if a.startswith("--")}
    extra = []
    precision = os.environ.get("ACCELERATE_MIXED_PRECISION", "no").lower()
    if precision in ("bf16", "fp16") and not {"--bf16", "--fp16"} & given:
        extra += [f"--{precision}", "true"]
    if "--use_cpu" not in given and not torch.cuda.is_available():
        extra += ["--use_cpu", "true"]
    return [*argv, *extra]
