"""The packages import downward only (docs/architecture.md): each subpackage of ``perceptio`` may import the
packages of lower layers, never one of its own layer or above. Imports inside functions count too."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "perceptio"

#: Lowest first. The same list is drawn in docs/architecture.md.
LAYERS: list[set[str]] = [
    {"errors"},
    {"utils", "vocab", "config", "losses", "weights"},
    {"data"},
    {"tokenizers"},
    {"models"},
    {"eval"},
    {"train", "inference", "baselines"},
    {"pipeline", "demo"},
    {"quickstart", "pretrain"},
    {"experiments"},
    {"cli"},
]
TOP = {"__init__", "__main__"}  # the package's front door (re-exports) and `python -m perceptio`
FRONT_DOOR = 6  # `import perceptio` loads perceptio.inference: only layers above it may import the front door


def _layer(package: str) -> int:
    for index, members in enumerate(LAYERS):
        if package in members:
            return index
    raise AssertionError(f"package or module perceptio.{package} is in no layer: add it to LAYERS and the docs")


def _imports(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        found += [(node.lineno, name) for name in names if name == "perceptio" or name.startswith("perceptio.")]
    return found


def test_every_import_goes_down_the_layers() -> None:
    wrong = []
    for path in sorted(SRC.rglob("*.py")):
        own = path.relative_to(SRC).parts[0].removesuffix(".py")
        if own in TOP:
            continue
        for line, name in _imports(path):
            target = name.split(".")[1] if "." in name else "__init__"
            if target == own:
                continue
            level = FRONT_DOOR if target in TOP else _layer(target)
            if level >= _layer(own):
                wrong.append(f"{path.relative_to(SRC.parent)}:{line} ({own}) imports {name}")
    assert not wrong, "imports against the layer order:\n" + "\n".join(wrong)


#: The synthetic world is a dataset, not a dependency of the library's machinery: only the applications that
#: build or show it import it, and the tiny preset, whose tokenizer is trained on the world's words.
SYNTHETIC_USERS = {"pipeline/stages.py", "pretrain.py", "experiments/grounding.py", "demo/app.py"}
SYNTHETIC_USERS |= {f"cli/{name}.py" for name in ("data", "apps", "experiment", "training")}
SYNTHETIC_USERS |= {"models/presets.py"}


def test_only_the_applications_import_the_synthetic_world() -> None:
    wrong = []
    for path in sorted(SRC.rglob("*.py")):
        relative = path.relative_to(SRC).as_posix()
        if relative.startswith("data/synthetic/") or relative in SYNTHETIC_USERS:
            continue
        wrong += [f"{relative}:{line} imports {name}" for line, name in _imports(path) if "data.synthetic" in name]
    assert not wrong, "\n".join(wrong)


def _runtime_imports(path: Path) -> set[str]:
    """Modules a file imports when it runs (inside functions too), not those under ``if TYPE_CHECKING:``."""
    tree = ast.parse(path.read_text())
    typing_only = {
        id(inner)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"
        for statement in node.body
        for inner in ast.walk(statement)
    }
    names = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module.startswith("perceptio"):
            names |= {f"{node.module}.{alias.name}" for alias in node.names} | {node.module}
        elif isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names if alias.name.startswith("perceptio")}
    return names


def test_no_module_imports_itself_through_others() -> None:
    """No file-level import cycles (a package's ``__init__`` re-exporting its modules excepted)."""
    modules = {}
    for path in SRC.rglob("*.py"):
        parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {
        name: {m for m in _runtime_imports(path) if m in modules and m != name and not name.startswith(m + ".")}
        for name, path in modules.items()
    }
    cycles = set()
    for start in graph:
        stack = [(start, (start,))]
        while stack:
            node, trail = stack.pop()
            for nxt in graph[node]:
                if nxt == start:
                    cycles.add(" -> ".join((*trail, start)))
                elif nxt not in trail and len(trail) < 6:
                    stack.append((nxt, (*trail, nxt)))
    assert not cycles, "\n".join(sorted(cycles))
