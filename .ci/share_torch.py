"""Hard-link the installed torch stack of one venv into another (``python share_torch.py SRC_VENV DST_VENV``).

`.venv` and `.venv-lowest` pin the same torch/torchvision pair, whose CUDA build is about 5.3 GB (torch, triton and
the nvidia/cuda wheels). Building it twice filled the CI machine's disk, so the second venv gets hard links to the
first one's files, dist-info included: pip then sees the pair as installed and leaves it alone, while every other
package of the lowest set is installed for real. A link costs no space and neither venv can change the other's
files (pip removes and replaces files, it never rewrites them in place). Files outside site-packages (console
scripts such as torchrun, whose first line names the source venv's python) are not linked.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from pathlib import Path

SHARED = re.compile(r"^(torch|torchvision|triton|nvidia-.*|cuda-.*)$")


def site_packages(venv: Path) -> Path:
    found = sorted(venv.glob("lib/python*/site-packages"))
    if len(found) != 1:
        raise SystemExit(f"share_torch: expected one site-packages under {venv}, found {found}")
    return found[0]


def shared_files(src_site: Path) -> list[Path]:
    """Paths (relative to site-packages) of every file the shared distributions installed there."""
    from importlib.metadata import distributions

    files: list[Path] = []
    for dist in distributions(path=[str(src_site)]):
        if not SHARED.match(dist.metadata["Name"].lower()):
            continue
        files += [Path(f) for f in dist.files or () if not str(f).startswith("..")]
    return files


def link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:  # another file system: a copy still works, it only costs the space
        shutil.copy2(src, dst)


def main(src_venv: str, dst_venv: str) -> None:
    src_site, dst_site = site_packages(Path(src_venv)), site_packages(Path(dst_venv))
    files = [f for f in shared_files(src_site) if (src_site / f).is_file()]
    if not any(f.parts[0] == "torch" for f in files):
        raise SystemExit(f"share_torch: no torch installed in {src_site}")
    for f in files:
        link(src_site / f, dst_site / f)
    print(f"share_torch: linked {len(files)} files of the torch stack into {dst_site}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    main(*sys.argv[1:])
