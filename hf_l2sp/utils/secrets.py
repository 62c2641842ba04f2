"""Credentials never leave the process: what arguments are saved without, and the scan every upload passes first.

`Trainer` pickles its arguments (`training_args.bin`) into the output folder and every checkpoint, `hub_token`
included, and uploads that file with the weights. `SPArguments` pickles itself with its credential fields blanked
(the live object keeps them); and before any upload the files that would go up are read for the token in use and for
anything shaped like a Hugging Face token, and one is refused naming the file.
"""

from __future__ import annotations

import fnmatch
import os
import re
from pathlib import Path

from .errors import ConfigError

#: Argument fields that hold credentials (TrainingArguments' hub_token; names other configs use for the same).
CREDENTIAL_FIELD = re.compile(r"(^|_)(hub_token|token_hub|api_key|access_token|password|secret)$")
#: What a Hugging Face user or organisation token looks like.
HF_TOKEN_SHAPE = re.compile(rb"hf_[A-Za-z0-9]{30,}")
_CHUNK = 1 << 20


class SecretInUploadError(ConfigError):
    """A file that would be uploaded holds a credential."""


def credential_fields(args) -> list[str]:
    return [name for name in vars(args) if CREDENTIAL_FIELD.search(name)]


def tokens_in_use(*given: str | None) -> list[str]:
    """The tokens an upload would use: the ones given and the one huggingface_hub finds (HF_TOKEN, stored login)."""
    from huggingface_hub import get_token

    found = [t for t in (*given, os.environ.get("HF_TOKEN"), get_token()) if t]
    return list(dict.fromkeys(found))


def upload_files(folder: str | os.PathLike, ignore_patterns: list[str] | None = None) -> list[Path]:
    """The files `upload_folder(folder, ignore_patterns=...)` would send (patterns on the path inside the folder)."""
    folder = Path(folder)
    files = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        relative = path.relative_to(folder).as_posix()
        if relative.startswith(".cache/") or any(fnmatch.fnmatch(relative, pattern) or
                                                 fnmatch.fnmatch(relative.split("/")[0], pattern)
                                                 for pattern in ignore_patterns or []):
            continue
        files.append(path)
    return files


def _holds(path: Path, needles: list[bytes]) -> str | None:
    """What secret `path` holds ('the token in use' / 'a Hugging Face token'), read in chunks that overlap."""
    overlap = max([len(n) for n in needles] + [64])
    tail = b""
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            window = tail + chunk
            if any(n in window for n in needles):
                return "the token in use"
            if HF_TOKEN_SHAPE.search(window):
                return "a Hugging Face token"
            tail = window[-overlap:]
    return None


def check_upload(folder: str | os.PathLike, ignore_patterns: list[str] | None = None, tokens=()) -> None:
    """Refuse, naming the file, an upload of `folder` in which a file holds one of `tokens` or a token's shape."""
    needles = [t.encode() for t in tokens if t]
    for path in upload_files(folder, ignore_patterns):
        what = _holds(path, needles)
        if what:
            raise SecretInUploadError(
                f"Refusing to upload {str(folder)!r}: {path.relative_to(folder).as_posix()} holds {what}. Remove "
                "the credential from that file (or the file from the folder) and push again; nothing was uploaded.")
