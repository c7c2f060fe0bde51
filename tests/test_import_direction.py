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
    {"quickstart", "demo"},
    {"experiments", "pretrain"},
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
SYNTHETIC_USERS = {"quickstart.py", "pretrain.py", "cli/main.py", "experiments/grounding.py", "demo/app.py"}
SYNTHETIC_USERS |= {"models/presets.py"}


def test_only_the_applications_import_the_synthetic_world() -> None:
    wrong = []
    for path in sorted(SRC.rglob("*.py")):
        relative = path.relative_to(SRC).as_posix()
        if relative.startswith("data/synthetic/") or relative in SYNTHETIC_USERS:
            continue
        wrong += [f"{relative}:{line} imports {name}" for line, name in _imports(path) if "data.synthetic" in name]
    assert not wrong, "\n".join(wrong)
