"""How the `hf-l2sp` commands log: one format, INFO and up, on stdout (progress lines read with the results);
and `announce`, for the lines a plain script must show too."""

from __future__ import annotations

import logging
import sys

FORMAT = "%(asctime)s %(name)s: %(message)s"


def configure_command_logging() -> None:
    """Set up logging for a command run from the shell (the library itself never configures logging)."""
    logging.basicConfig(format=FORMAT, level=logging.INFO, stream=sys.stdout)


def announce(logger: logging.Logger, message: str) -> None:
    """`message` at INFO where the application configured logging; on stderr otherwise, since a plain script
    (no logging set up) shows only warnings. For the few lines a user must see, like what the penalty covers."""
    if logging.getLogger().handlers or logger.handlers:
        logger.info("%s", message)
    else:
        print(message, file=sys.stderr)
