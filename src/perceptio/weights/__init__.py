"""Model weights that ship with the package (safetensors, a few MB each), each folder with a model card and
``SHA256SUMS``:

* ``tiny-base``: the pretrained tiny base (``perceptio pretrain``), the tiny counterpart of pretrained InternVL +
  SAM2 + depth tokenizer. ``perceptio quickstart`` fine-tunes Perceptio from it by default.
* ``tiny-perceptio``: the tiny Perceptio model the quickstart recipe produces from that base; ``perceptio predict``
  and ``perceptio eval`` use it when no ``--model`` is given.
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Sequence
from pathlib import Path

__all__ = ["SHIPPED", "export_model", "file_hashes", "shipped", "verify"]

SHIPPED = ("tiny-base", "tiny-perceptio")
_ROOT = Path(__file__).resolve().parent


def shipped(name: str) -> Path:
    """The folder of a shipped model; raises FileNotFoundError (with the command that makes it) when absent."""
    if name not in SHIPPED:
        raise KeyError(f"unknown shipped model {name!r}; the shipped models are {list(SHIPPED)}")
    folder = _ROOT / name
    if not (folder / "model.safetensors").is_file():
        make = "perceptio pretrain" if name == "tiny-base" else "perceptio quickstart"
        raise FileNotFoundError(f"{folder} holds no model.safetensors; this checkout lacks it (make it with `{make}`)")
    return folder


def verify(folder: str | Path) -> None:
    """Check every file listed in ``folder/SHA256SUMS``; raises ValueError naming the first file that differs."""
    folder = Path(folder)
    sums = folder / "SHA256SUMS"
    if not sums.is_file():
        raise FileNotFoundError(f"{sums} not found")
    for line_number, line in enumerate(sums.read_text().splitlines(), start=1):
        digest, _, name = line.partition("  ")
        path = folder / name
        if not path.is_file():
            raise ValueError(f"{sums}:{line_number}: {name} is missing")
        if hashlib.sha256(path.read_bytes()).hexdigest() != digest:
            raise ValueError(f"{sums}:{line_number}: {name} does not match its SHA-256; the file was changed")


def file_hashes(folder: str | Path) -> dict[str, str]:
    """SHA-256 of every file under ``folder`` except ``SHA256SUMS`` and the model card, by relative path."""
    folder = Path(folder)
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.name not in ("SHA256SUMS", "MODEL_CARD.md")
    }


def export_model(source: str | Path, dest: str | Path, card: Sequence[str]) -> Path:
    """Copy a saved model folder to ``dest`` (which must not exist) and write ``SHA256SUMS`` and ``MODEL_CARD.md``:
    the ``card`` lines, then every file's SHA-256 (the shipped-weights test checks that both lists agree)."""
    source, dest = Path(source), Path(dest)
    if not (source / "model.safetensors").is_file():
        raise FileNotFoundError(f"{source}/model.safetensors not found: not a saved Perceptio model folder")
    if dest.exists():
        raise FileExistsError(f"{dest} exists; remove it first to replace the exported model")
    shutil.copytree(source, dest)
    hashes = file_hashes(dest)
    (dest / "SHA256SUMS").write_text("".join(f"{digest}  {name}\n" for name, digest in hashes.items()))
    lines = [*card, "", "## Files (SHA-256)", "", *[f"- `{name}`: `{digest}`" for name, digest in hashes.items()]]
    (dest / "MODEL_CARD.md").write_text("\n".join(lines) + "\n")
    return dest
