"""Declared floors are the tested ones, and a Trainer that lacks a hook SPTrainer relies on is refused loudly."""

import re
import subprocess
import sys
from importlib.metadata import distributions
from pathlib import Path

import pytest
from transformers import Trainer

from hf_l2sp.training.compat import TRAINER_HOOKS, TRANSFORMERS_FLOOR, check_trainer_hooks

ROOT = Path(__file__).resolve().parents[1]


def declared_floors() -> dict[str, str]:
    text = (ROOT / "pyproject.toml").read_text()
    block = text[text.index("dependencies = ["):text.index("]", text.index("dependencies = ["))]
    return {m.group(1).lower().replace("_", "-"): m.group(2) for m in re.finditer(r'"([\w.-]+)>=([\w.]+)', block)}


def lowest_set() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints-lowest.txt").read_text().splitlines():
        if match := re.match(r"([\w.-]+)==([\w.]+)", line.strip()):
            pins[match.group(1).lower().replace("_", "-")] = match.group(2)
    return pins


def _release(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("."))


def test_every_declared_floor_is_installed_by_the_lowest_set():
    """CI installs constraints-lowest.txt in a second environment: each floor pyproject declares is what it tests."""
    floors, pins = declared_floors(), lowest_set()
    assert set(floors) <= set(pins), set(floors) - set(pins)
    for name, floor in floors.items():
        assert _release(pins[name])[:len(_release(floor))] == _release(floor), (name, floor, pins[name])
    assert _release(floors["transformers"]) == _release(TRANSFORMERS_FLOOR)[:2]


def test_a_trainer_without_a_hook_is_refused_with_the_version_it_needs():
    for missing in ("loss_is_scaled_for_ga", "_clip_grad_norm", "_hp_search_setup"):
        members = {name: getattr(Trainer, name) for name in TRAINER_HOOKS if name != missing}
        old = type("OldTrainer", (), members)
        with pytest.raises(RuntimeError, match=rf"needs transformers >= {re.escape(TRANSFORMERS_FLOOR)}.*{missing}"):
            check_trainer_hooks(old)


def test_a_renamed_parameter_is_refused():
    members = {name: getattr(Trainer, name) for name in TRAINER_HOOKS}
    members["save_model"] = lambda self, output_dir=None: None  # `_internal_call` gone
    with pytest.raises(RuntimeError, match=r"save_model\(\.\.\., _internal_call=\.\.\.\)"):
        check_trainer_hooks(type("OldTrainer", (), members))


def test_the_installed_trainer_has_every_hook():
    check_trainer_hooks(Trainer)


def test_both_sets_pin_the_torch_pair_that_lowest_shares():
    """`.venv-lowest` hard-links `.venv`'s torch stack: that is the lowest set's torch only if both pin the same
    pair."""
    pinned = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if match := re.match(r"(torch|torchvision)==([\w.]+)", line.strip()):
            pinned[match.group(1)] = match.group(2)
    lowest = lowest_set()
    assert pinned == {"torch": lowest["torch"], "torchvision": lowest["torchvision"]}


def _fake_dist(site: Path, name: str, version: str, files: dict[str, str]) -> None:
    info = site / f"{name}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    for rel, text in files.items():
        (site / rel).parent.mkdir(parents=True, exist_ok=True)
        (site / rel).write_text(text)
    record = [*files, f"{info.name}/METADATA", f"{info.name}/RECORD"]
    (info / "RECORD").write_text("".join(f"{rel},,\n" for rel in record))


def test_share_torch_links_the_torch_stack_and_nothing_else(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src_site = src / "lib/python3.11/site-packages"
    dst_site = dst / "lib/python3.11/site-packages"
    dst_site.mkdir(parents=True)
    _fake_dist(src_site, "torch", "2.14.1", {"torch/__init__.py": "x = 1\n", "../../../bin/torchrun": "#!/src\n"})
    _fake_dist(src_site, "nvidia-cudnn-cu13", "9.0", {"nvidia/cudnn/lib/libcudnn.so": "so"})
    _fake_dist(src_site, "transformers", "5.30.0", {"transformers/__init__.py": ""})

    subprocess.run([sys.executable, str(ROOT / ".ci/share_torch.py"), str(src), str(dst)], check=True)

    for rel in ("torch/__init__.py", "nvidia/cudnn/lib/libcudnn.so", "torch-2.14.1.dist-info/RECORD"):
        assert (dst_site / rel).stat().st_ino == (src_site / rel).stat().st_ino, rel
    assert not (dst_site / "transformers").exists() and not (dst / "bin").exists()
    found = {d.metadata["Name"]: d.version for d in distributions(path=[str(dst_site)])}
    assert found == {"torch": "2.14.1", "nvidia-cudnn-cu13": "9.0"}


def test_share_torch_refuses_a_venv_without_torch(tmp_path):
    for venv in ("src", "dst"):
        (tmp_path / venv / "lib/python3.11/site-packages").mkdir(parents=True)
    run = subprocess.run([sys.executable, str(ROOT / ".ci/share_torch.py"), str(tmp_path / "src"),
                          str(tmp_path / "dst")], capture_output=True, text=True)
    assert run.returncode != 0 and "no torch installed" in run.stderr
