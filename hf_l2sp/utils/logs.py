"""How the `hf-l2sp` commands log: one format, INFO and up, on stdout (progress lines read with the results)."""

from __future__ import annotations

import logging
import sys

FORMAT = "%(asctime)s %(name)s: %(message)s"


def configure_command_logging() -> None:
    """Set up logging for a command run from the shell (the library itself never configures logging)."""
    logging.basicConfig(format=FORMAT, level=logging.INFO, stream=sys.stdout)
