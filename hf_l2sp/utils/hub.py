"""The Hugging Face Hub as these commands see it: what a repo id looks like, whether offline mode is on, and one
download path whose errors say what to do."""

from __future__ import annotations

import os
import re
from pathlib import Path

from .errors import UserError

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
WEIGHT_PATTERNS = ("*.json", "*.safetensors", "*.bin")


class HubUnavailableError(UserError, OSError):
    """Something had to come from the Hub and could not (offline, unreachable, no such repo)."""


_FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".json", ".yaml", ".yml")


def is_local_path(value: str | os.PathLike | None) -> bool:
    """The one rule for "is this a local path?": it exists, or it is written as a path (starts with '.', '/' or
    '~', holds a backslash or more than one '/', or ends with a weights/config file suffix)."""
    if not value:
        return False
    text = str(value)
    return (text.startswith((".", "/", "~")) or "\\" in text or text.count("/") > 1
            or text.endswith(_FILE_SUFFIXES) or Path(text).expanduser().exists())


def is_hub_id(value: str | os.PathLike | None) -> bool:
    """True for 'owner/name' that is not a local path (`is_local_path`)."""
    return bool(value) and bool(_REPO_ID.match(str(value))) and not is_local_path(value)


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() not in ("0", "", "false", "no", "off")


def hub_offline() -> bool:
    return _flag("HF_HUB_OFFLINE")


def datasets_offline() -> bool:
    return _flag("HF_DATASETS_OFFLINE") or hub_offline()


def download_snapshot(repo_id: str, description: str, revision: str | None = None, cache_dir: str | None = None,
                      allow_patterns=WEIGHT_PATTERNS) -> Path:
    """`snapshot_download`, or an OSError that names what was being loaded (`description`, e.g. "model 'x'") and why
    it could not be."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, revision=revision, cache_dir=cache_dir,
                                      allow_patterns=list(allow_patterns)))
    except Exception as err:
        why = ("HF_HUB_OFFLINE=1 is set and it is not in the local cache" if hub_offline()
               else "the Hub could not be reached or has no such repo")
        raise HubUnavailableError(f"Could not load {description}: it is not a local folder and {why} "
                                  f"({type(err).__name__}). Pass a local folder, or run once with network access "
                                  "to cache it.") from err


def public_name(value: str | None) -> str | None:
    """A name safe to publish: Hub ids and embedded assets as they are, local paths reduced to their last part."""
    if value is None:
        return None
    value = str(value)
    if value.startswith("hf_l2sp:") or is_hub_id(value):
        return value
    if is_local_path(value):
        return f"local folder '{Path(value.rstrip('/')).name}'"
    return value
