"""The import graph: layers (no upward import but the lazy ``lorax_cil.load``), a NumPy-only
``lorax_cil.evaluation``, and a ``lorax-cil --help`` that imports neither torch nor numpy.

The layers are drawn in docs/architecture.md ("Import layers"); the graph is read from the code
with ``ast`` (imports inside functions count too).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "lorax_cil"

#: package (or top-level module) of lorax_cil -> layer; a module may import its own layer and below
LAYERS = {
    "lorax_cil": 0, "utils": 0, "lazy": 0, "errors": 0, "plugins": 0, "distributed": 0,
    "evaluation": 1, "models": 1, "benchmarks": 1,
    "training": 2,
    "detection": 3,
    "inference": 4,
    "merging": 5,
    "bench": 6, "commands": 6,
    "cli": 7, "__main__": 7,
}
#: the only upward imports: the lazy attribute ``lorax_cil.load``
ALLOWED_UP = {("lorax_cil", "lorax_cil.inference.loading")}


def _modules() -> dict[str, Path]:
    out = {}
    for f in sorted(PKG.rglob("*.py")):
        parts = f.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = f
    return out


def _imports(path: Path, module: str) -> list[tuple[str, int]]:
    """``(imported lorax_cil module, line)`` of every import in the file, nested ones included."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import
                base = module.split(".")[: -node.level + (1 if path.name == "__init__.py" else 0) or None]
                found.append((".".join(base + ([node.module] if node.module else [])), node.lineno))
            elif node.module:
                found.append((node.module, node.lineno))
    return found


def _layer_key(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "lorax_cil"


def _third_party(name: str) -> str | None:
    top = name.split(".")[0]
    return None if top in sys.stdlib_module_names or top == "lorax_cil" else top


def test_every_package_has_a_layer():
    assert {_layer_key(m) for m in _modules()} <= set(LAYERS)


def test_no_upward_import_but_the_lazy_load():
    upward = []
    for module, path in _modules().items():
        src = LAYERS[_layer_key(module)]
        for name, line in _imports(path, module):
            if name.startswith("lorax_cil") and LAYERS.get(_layer_key(name), 0) > src:
                if (module, name) not in ALLOWED_UP:
                    upward.append(f"{module}:{line} imports {name}")
    assert upward == []


def test_the_layer_scan_sees_upward_imports(tmp_path):
    fake = tmp_path / "m.py"
    fake.write_text("def f():\n    from lorax_cil.training.runner import Run\n")
    names = _imports(fake, "lorax_cil.models.m")
    assert names == [("lorax_cil.training.runner", 2)] and LAYERS[_layer_key(names[0][0])] > LAYERS["models"]


#: import circles that are registries loading their built-in entries
REGISTRY_CIRCLES = [
    {"lorax_cil.merging.result", "lorax_cil.merging.methods", "lorax_cil.merging.r2m_merge"},  # merge methods
]


def _circles() -> list[set[str]]:
    """Strongly connected components (more than one module) of the module import graph."""
    mods = _modules()

    def owner(name: str) -> str:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name

    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, path in mods.items():
        for name, _ in _imports(path, m):
            target = owner(name)
            if target and target != m and not m.startswith(target + "."):  # a package's own face
                graph[m].add(target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(comp)

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_circle_outside_a_registry():
    assert [c for c in _circles() if c not in REGISTRY_CIRCLES] == []


def test_evaluation_imports_only_numpy_and_its_own_modules():
    """At module level: the standard library, NumPy and lorax_cil.evaluation; inside the report
    and plot functions also pandas / matplotlib and the stdlib-only lorax_cil.utils."""
    bad = []
    for module, path in _modules().items():
        if not module.startswith("lorax_cil.evaluation"):
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        top = {id(n) for n in tree.body}
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)) or getattr(node, "level", 0):
                continue
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            for name in names:
                ours = name == "lorax_cil.evaluation" or name.startswith("lorax_cil.evaluation.")
                if id(node) in top:
                    ok = ours or _third_party(name) in (None, "numpy") and not name.startswith("lorax_cil")
                else:
                    ok = ours or name == "lorax_cil.utils" or _third_party(name) in (
                        None, "numpy", "pandas", "matplotlib") and not name.startswith("lorax_cil")
                if not ok:
                    bad.append(f"{module}:{node.lineno} imports {name}")
    assert bad == []
    code = ("import sys\nbefore = set(sys.modules)\nimport lorax_cil.evaluation as e\n"
            "new = set(sys.modules) - before\n"
            "mods = [m for m in new if m.startswith('lorax_cil')]\n"
            "third = sorted({m.split('.')[0] for m in new} - set(sys.stdlib_module_names))\n"
            "print(sorted(m for m in mods if not m.startswith('lorax_cil.evaluation')))\n"
            "print([t for t in third if t not in ('lorax_cil', 'numpy')])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    ours, third = out.stdout.strip().splitlines()
    assert ours == "['lorax_cil', 'lorax_cil.lazy']"
    assert third == "[]"


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"], ["bench", "speed", "--help"]])
def test_cli_help_imports_neither_torch_nor_numpy(argv):
    code = ("import sys\nfrom lorax_cil.cli import main\n"
            f"try:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('torch', 'numpy', 'avalanche', 'timm', 'pandas', 'matplotlib') "
            "if m in sys.modules), file=sys.stderr)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.stderr.strip().splitlines()[-1] == "[]", out.stderr[-2000:]
    assert "usage: lorax-cil" in out.stdout


def test_front_doors():
    code = ("import sys\nfrom lorax_cil.models import ExpandableNet, create_backbone\n"
            "from lorax_cil.training import LoRAX, Run, register_strategy\n"
            "from lorax_cil.models.expandable import ExpandableNet as E\n"
            "from lorax_cil.training.runner import Run as R\n"
            "from lorax_cil.training.strategy import LoRAX as L\n"
            "from lorax_cil.training.registry import register_strategy as r\n"
            "assert (ExpandableNet, Run, LoRAX, register_strategy) == (E, R, L, r)\n"
            "assert callable(create_backbone)\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
    light = ("import sys, lorax_cil.models, lorax_cil.training\n"
             "assert 'torch' not in sys.modules, 'the package faces import torch'\n")
    subprocess.run([sys.executable, "-c", light], check=True, cwd=ROOT)
