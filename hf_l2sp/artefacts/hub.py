"""Pushing a finished run to the Hub, through Trainer's own machinery or for a finished output folder.

A push never touches the local output: if the Hub cannot be reached or there are no credentials, the folder stays
as it was and the error says how to push it later.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..utils.hub import hub_offline
from ..utils.errors import MissingFileError, UserError
from ..utils.secrets import check_upload, tokens_in_use

#: Same exclusions as Trainer.push_to_hub: private files and intermediate checkpoints stay local.
IGNORE_PATTERNS = ["_*", "checkpoint-*"]
REQUIRED_FILES = ("config.json", "README.md")


class PushError(UserError, OSError):
    """The Hub push failed; the local output is intact."""


def _reason(err: Exception) -> str:
    text = f"{type(err).__name__}: {err}"
    if "token" in text.lower() or "401" in text or "unauthorized" in text.lower():
        return f"no valid Hugging Face credentials: run `hf auth login` or set HF_TOKEN ({text})"
    if hub_offline():
        return f"HF_HUB_OFFLINE=1 is set, so nothing can be uploaded ({text})"
    return f"the Hub could not be reached or refused the upload ({text})"


def push_output(trainer, commit_message: str = "End of training"):
    """`trainer.push_to_hub` (weights, configs, card, drift files, Fisher file), with a clear error on failure."""
    folder = trainer.args.output_dir
    try:
        return trainer.push_to_hub(commit_message=commit_message)
    except Exception as err:
        raise PushError(f"Could not push {folder!r} to the Hub: {_reason(err)}. The local output is complete and "
                        f"unchanged; push it later with `hf-l2sp push {folder} --repo_id <user>/<name>`.") from err


def push_folder(folder: str | os.PathLike, repo_id: str, private: bool | None = None, token: str | None = None,
                commit_message: str = "Upload fine-tuned model (hf_l2sp)"):
    """Upload a finished `hf-l2sp train` output folder to `repo_id` (created if needed)."""
    from huggingface_hub import HfApi

    folder = Path(folder)
    missing = [name for name in REQUIRED_FILES if not (folder / name).is_file()]
    weights = list(folder.glob("*.safetensors")) + list(folder.glob("model.safetensors.index.json"))
    if not folder.is_dir() or missing or not weights:
        raise MissingFileError(f"{str(folder)!r} is not a finished hf-l2sp output folder (missing: "
                                f"{', '.join(missing + ([] if weights else ['model.safetensors']))}).")
    check_upload(folder, IGNORE_PATTERNS, tokens_in_use(token))
    readme = folder / "README.md"
    original = readme.read_text()
    readme.write_text(_card_pointing_at(original, repo_id))  # the card that goes up names the repo
    try:
        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True, token=token)
        return api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=commit_message,
                                 ignore_patterns=IGNORE_PATTERNS, token=token)
    except Exception as err:
        readme.write_text(original)  # nothing was pushed: the card must not name a repo that may not exist
        raise PushError(f"Could not push {str(folder)!r} to {repo_id!r}: {_reason(err)}. The local folder is "
                        "unchanged.") from err


def _card_pointing_at(text: str, repo_id: str) -> str:
    """The card with its loading snippets naming the repo it is pushed to."""
    text = re.sub(r'"(?:hf-hub|local-dir):[^"]+"', f'"hf-hub:{repo_id}"', text)
    return re.sub(r'(from_pretrained\(|model=)"[^"]+"', lambda m: f'{m.group(1)}"{repo_id}"', text)
