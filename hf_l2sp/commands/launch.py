"""Relaunch a command under `accelerate launch` with a shipped or given config (`--accelerate_config`)."""

from __future__ import annotations

import argparse
import subprocess
import sys
from importlib import resources
from pathlib import Path

from ..utils.errors import MissingFileError


def split_accelerate_config(argv: list[str]) -> tuple[str | None, list[str]]:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--accelerate_config", default=None)
    known, rest = pre.parse_known_args(argv)
    return known.accelerate_config, rest


def accelerate_config_path(name: str) -> Path:
    """A YAML path, or the name of a config shipped in hf_l2sp/accelerate_configs (e.g. 'multi_gpu', 'fsdp2')."""
    path = Path(name).expanduser()
    if path.is_file():
        return path
    shipped = Path(str(resources.files("hf_l2sp") / "accelerate_configs"))
    candidate = shipped / f"{name}.yaml"
    if candidate.is_file():
        return candidate
    choices = sorted(p.stem for p in shipped.glob("*.yaml"))
    raise MissingFileError(f"accelerate_config {name!r} is neither a file nor a shipped config; shipped: "
                            f"{', '.join(choices)}.")


#: `accelerate launch` options a command passes on, overriding the config's (e.g. a shipped config's 8 processes).
LAUNCH_OPTIONS = {"--num_processes": int, "--main_process_port": int, "--mixed_precision": str}


def relaunch_under_accelerate(config: str, command: str, argv: list[str]) -> int:
    """`hf-l2sp CMD --accelerate_config X [--num_processes N] ...` == `accelerate launch --config_file X
    [--num_processes N] -m hf_l2sp.cli CMD ...` (also --main_process_port and --mixed_precision)."""
    pre = argparse.ArgumentParser(add_help=False)
    for option, kind in LAUNCH_OPTIONS.items():
        pre.add_argument(option, type=kind, default=None)
    known, argv = pre.parse_known_args(argv)
    launch = [x for option in LAUNCH_OPTIONS if (value := getattr(known, option[2:])) is not None
              for x in (option, str(value))]
    cmd = [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", "--config_file",
           str(accelerate_config_path(config)), *launch, "-m", "hf_l2sp.cli", command, *argv]
    print("running:", " ".join(cmd), flush=True)
    return subprocess.call(cmd)
