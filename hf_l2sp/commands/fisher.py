"""`hf-l2sp fisher`: estimate the diagonal Fisher of a pretrained classifier (with its source head) on images.

    hf-l2sp fisher --model timm/resnet50.a1_in1k --dataset_name <source-like images> --num_samples 2000 \\
        --mode sampled --output fisher/resnet50
    accelerate launch --multi_gpu --num_processes 8 -m hf_l2sp.cli fisher ...   (each rank a shard, one reduction)

Then train with `--regularizer l2_sp_fisher --sp_fisher fisher/resnet50`.
"""

from __future__ import annotations

import logging
import sys

from ..utils.logs import configure_command_logging
from ..loading.data import DataArguments
from ..pipeline.fisher import FisherArguments, estimate_fisher_file
from ..pipeline.options import parse_with_recipe
from .launch import relaunch_under_accelerate, split_accelerate_config

logger = logging.getLogger("hf_l2sp.fisher")


def main(argv: list[str] | None = None) -> int:
    config, argv = split_accelerate_config(list(sys.argv[2:] if argv is None else argv))
    if config:
        return relaunch_under_accelerate(config, "fisher", argv)
    configure_command_logging()
    options, data_args = parse_with_recipe((FisherArguments, DataArguments), argv, prog="hf-l2sp fisher",
                                           description=__doc__.split("\n")[0])
    estimate_fisher_file(options, data_args)
    return 0
