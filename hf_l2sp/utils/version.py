"""The installed version of hf_l2sp (recorded in run folders and printed by `hf-l2sp version`)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("hf_l2sp")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+local"
