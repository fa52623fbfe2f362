"""The project's shape, read from its source with ast (nothing is imported): layers that point
one way, no private names imported across modules, and a scheduler core that never tests which
mode is in force (that is the step policies' business, runtime/policies.py)."""

import ast
import os

import pytest

from tests.runtime_utils import ROOT

PACKAGES = {"common": "minedraft.common", "runtime": "minedraft.runtime", "workers": "minedraft.workers"}
MODES = {"ar", "sd", "psd", "auto"}


def modules(folder: str, top: str = ROOT) -> list[str]:
    found = []
    for root, _, files in os.walk(os.path.join(top, folder)):
        found += [os.path.join(root, f) for f in files if f.endswith(".py")]
    return sorted(found)


def imported(path: str) -> list[tuple[str, list[str], int]]:
    """(module, names, line) of every import in the file, at any depth."""
    tree = ast.parse(open(path).read(), path)
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(alias.name, [], node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.append((node.module, [alias.name for alias in node.names], node.lineno))
    return out


def offenders(folder: str, forbidden: str, allowed_files: tuple[str, ...] = (), top: str = ROOT) -> list[str]:
    return [f"{os.path.relpath(path, top)}:{line} imports {module}"
            for path in modules(folder, top) if os.path.basename(path) not in allowed_files
            for module, _, line in imported(path) if module == forbidden or module.startswith(forbidden + ".")]


def test_layers_point_one_way():
    assert modules("common") and modules("runtime") and modules("workers")
    assert offenders("workers", "minedraft.runtime") == []
    assert offenders("common", "minedraft.runtime") == [] and offenders("common", "minedraft.workers") == []
    # The scheduler side reaches the workers only where it starts them in Ray actors (the local
    # pool starts `python -m minedraft.workers.process` and imports nothing of them).
    assert offenders("runtime", "minedraft.workers", allowed_files=("ray_pool.py",)) == []


@pytest.mark.parametrize("folder", ["common", "runtime", "workers", "tools", "tests"])
def test_no_module_imports_a_private_name(folder):
    bad = [f"{os.path.relpath(path, ROOT)}:{line} {module}: {name}"
           for path in modules(folder) for module, names, line in imported(path) if module != "__future__"
           for name in names + [module.rsplit(".", 1)[-1]] if name.startswith("_") and not name.startswith("__")]
    assert bad == []


def mode_tests(source: str) -> list[str]:
    """Comparisons that involve a mode's name or a `.mode` attribute, and uses of `is_auto`."""
    bad = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare):
            parts = [node.left, *node.comparators]
            names = {p.value for p in parts if isinstance(p, ast.Constant)} | {
                e.value for p in parts if isinstance(p, (ast.Tuple, ast.List, ast.Set)) for e in p.elts
                if isinstance(e, ast.Constant)}
            if names & MODES or any(isinstance(p, ast.Attribute) and p.attr == "mode" for p in parts):
                bad.append(f"line {node.lineno}: {ast.unparse(node)}")
        elif isinstance(node, ast.Attribute) and node.attr == "is_auto":
            bad.append(f"line {node.lineno}: {ast.unparse(node)}")
    return bad


def test_the_scheduler_core_never_tests_the_mode():
    assert mode_tests(open(os.path.join(ROOT, "runtime", "scheduler.py")).read()) == []


def test_the_checks_see_what_they_look_for(tmp_path):
    """The checks above find what breaks them (a negative control)."""
    (tmp_path / "workers").mkdir()
    (tmp_path / "workers" / "bad.py").write_text("def f():\n    from minedraft.runtime.config import _secret\n")
    assert offenders("workers", "minedraft.runtime", top=str(tmp_path)) == ["workers/bad.py:2 imports minedraft.runtime.config"]
    assert offenders("workers", "minedraft.runtime", allowed_files=("bad.py",), top=str(tmp_path)) == []
    ((_, names, _),) = imported(str(tmp_path / "workers" / "bad.py"))
    assert names == ["_secret"]
    assert len(mode_tests("if self.mode == 'ar' or x.mode != y:\n    n = 2 if sc.mode in ('psd', 'auto') else 1\n"
                          "if self.is_auto:\n    pass\n")) == 4
