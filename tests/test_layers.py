"""The package's structure, as the docs' Development page states it: layers that import one way, no import
cycles (function-level and TYPE_CHECKING imports included), no private names imported across modules, no module over
400 lines, and a penalty is one module (the registry supplies everything else)."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "hf_l2sp"
#: Each layer may import only from itself and the layers before it.
LAYERS = ["utils", "loading", "anchor", "penalties", "forgetting", "training", "artefacts", "pipeline", "tuning",
          "study", "lm_study", "commands", "cli"]
MAX_LINES = 400


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> list[tuple[str, str]]:
    """(imported module, imported name) for every hf_l2sp import anywhere in the file."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module == "hf_l2sp" or module.startswith("hf_l2sp."):
                for alias in node.names:
                    sub = f"{module}.{alias.name}"
                    found.append((sub, "") if sub in MODULES else (module, alias.name))
        elif isinstance(node, ast.Import):
            found += [(a.name, "") for a in node.names if a.name.startswith("hf_l2sp")]
    return found


def _layer(module: str) -> int | None:
    parts = module.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 and parts[1] in LAYERS else None


GRAPH = {name: {target for target, _ in _imports(name, path)} for name, path in MODULES.items()}


def test_every_module_belongs_to_a_layer():
    outside = [m for m in MODULES if m != "hf_l2sp" and _layer(m) is None]
    assert outside == [], f"modules outside the layers {LAYERS}: {outside}"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m != "hf_l2sp"))
def test_imports_run_one_way(module):
    upward = [t for t in GRAPH[module] if t == "hf_l2sp" or (_layer(t) or 0) > _layer(module)]
    assert upward == [], f"{module} ({LAYERS[_layer(module)]}) imports later layers: {upward}"


def test_no_import_cycles():
    state, stack, cycles = {}, [], []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for target in GRAPH.get(node, ()):
            target = target if target in MODULES else target.rsplit(".", 1)[0]
            if state.get(target) == "open":
                cycles.append(stack[stack.index(target):] + [target])
            elif target not in state:
                visit(target)
        stack.pop()
        state[node] = "done"

    for node in sorted(GRAPH):
        if node not in state:
            visit(node)
    assert cycles == []


def test_no_private_names_imported_across_modules():
    private = [(m, t, n) for m, p in MODULES.items() for t, n in _imports(m, p)
               if n.startswith("_") and not n.startswith("__") and t != m]
    assert private == []


def test_no_module_over_the_line_limit():
    long = {m: n for m, p in MODULES.items() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def test_registry_supplies_names_titles_grids_and_the_study_reads_them():
    from hf_l2sp.penalties import registered
    from hf_l2sp.penalties.spec import grid_point, search_space
    from hf_l2sp.study.protocol import GRID_PARAMETER, GRIDS, REGULARIZERS

    classes = registered()
    assert [c.name for c in classes] == list(REGULARIZERS)
    for cls in classes:
        assert cls.title and cls.formula and cls.citation, cls.name
        assert GRIDS[cls.name] == (tuple(cls.search_grid) or (0.0,))
        assert set(grid_point(cls.name, 0.5)) == set(cls.search_fields) | set(cls.protocol_fixed)
        assert search_space(cls.name).fields == tuple(cls.search_fields)
    assert GRID_PARAMETER["l2"] == "alpha=beta" and GRID_PARAMETER["delta"] == "delta_alpha"
    assert GRID_PARAMETER["none"] == "-"


def test_a_new_penalty_module_is_enough(tmp_path, monkeypatch):
    """Drop one module into the penalties package (a copy, so the installed tree stays untouched): the registry, the
    config validation, the search space, the card title and the study all know it, with no other file changed."""
    import importlib
    import shutil
    import sys

    copy = tmp_path / "hf_l2sp"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    (copy / "penalties" / "l2_half.py").write_text('''
from .kernels import half_squared_distance
from .registry import register_regularizer
from .weight import Regularizer


@register_regularizer("l2_half")
class L2Half(Regularizer):
    """Omega(w) = alpha/4 ||w_S - w0_S||^2 + beta/2 ||w_new||^2."""

    title = "half L2-SP (a test)"
    formula = "Omega(w) = alpha/4 * ||w_S - w0_S||^2 + beta/2 * ||w_new||^2"
    search_grid = (0.5, 5.0)

    @classmethod
    def check_config(cls, args, selected):
        if selected and args.sp_alpha > 100:
            raise ValueError("l2_half: sp_alpha must be <= 100")

    def anchored_penalty(self, params, anchors):
        value, sq = half_squared_distance(params, anchors)
        return 0.5 * self.alpha * value, sq
''')
    for name in [m for m in sys.modules if m == "hf_l2sp" or m.startswith("hf_l2sp.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.syspath_prepend(str(tmp_path))
    hf_l2sp = importlib.import_module("hf_l2sp")
    from hf_l2sp.penalties.spec import search_space
    from hf_l2sp.study.protocol import GRIDS

    assert hf_l2sp.__file__.startswith(str(copy))
    assert "l2_half" in hf_l2sp.list_regularizers() and GRIDS["l2_half"] == (0.5, 5.0)
    assert search_space("l2_half+bss").grid == (0.5, 5.0)
    hf_l2sp.SPConfig(output_dir=str(tmp_path / "o"), regularizer="l2_half", use_cpu=True, report_to="none")
    with pytest.raises(ValueError, match="l2_half: sp_alpha must be <= 100"):
        hf_l2sp.SPConfig(output_dir=str(tmp_path / "o"), regularizer="l2_half", sp_alpha=1000.0, use_cpu=True,
                         report_to="none")


def test_every_imported_name_exists():
    """Imports inside functions run late; check now that each names something real."""
    import importlib

    missing = []
    for module, path in MODULES.items():
        for target, name in _imports(module, path):
            if name and not hasattr(importlib.import_module(target), name):
                missing.append(f"{module}: {target}.{name}")
    assert missing == []
