"""`hf-l2sp push <dir> --repo_id user/name`: upload a finished run (weights, configs, card, drift, Fisher file)."""

from __future__ import annotations

import argparse

from ..artefacts.hub import push_folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hf-l2sp push", description=__doc__.split("\n")[0])
    parser.add_argument("folder", help="Output folder of `hf-l2sp train`.")
    parser.add_argument("--repo_id", required=True, help="Hub repo to create or update, e.g. user/resnet50-dogs-l2sp.")
    parser.add_argument("--private", action="store_true", help="Create the repo as private.")
    parser.add_argument("--commit_message", default="Upload fine-tuned model (hf_l2sp)")
    options = parser.parse_args(argv)
    info = push_folder(options.folder, options.repo_id, private=options.private or None,
                       commit_message=options.commit_message)
    print(f"pushed {options.folder} to {options.repo_id}: {getattr(info, 'commit_url', info)}")
    return 0
