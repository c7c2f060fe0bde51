"""Checkpoint folders of resumable jobs (training, depth-tokenizer training): which one to resume from.

A job writes ``<out>/checkpoints/step-NNNNNNN`` folders, each complete when its ``trainer_state.json`` exists
(the folder is written under a temporary name and renamed). A checkpoint can still be unusable: a disk that
lost the end of a file, a copy cut short, or weights that produced a non-finite loss. :func:`latest_checkpoint`
returns the newest *intact* one and says which newer ones it passed over and why; :func:`set_aside` renames a
checkpoint known to be bad (``bad-step-NNNNNNN``, with the reason in ``REASON.txt``) so that no resume picks it,
while its files stay for inspection.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from perceptio.utils.weights_files import CorruptWeightsError, check_safetensors_file

__all__ = ["checkpoint_problem", "checkpoint_step", "last_good_checkpoint", "latest_checkpoint", "set_aside"]

logger = logging.getLogger(__name__)


def checkpoint_step(folder: Path) -> int:
    """The step of a ``step-NNNNNNN`` folder, from its name."""
    return int(folder.name.removeprefix("step-"))


def checkpoint_problem(folder: str | Path) -> str | None:
    """Why ``folder`` cannot be resumed from (in words, naming the file), or None when it is intact: every JSON
    file parses, ``trainer_state.json`` holds the step, and every safetensors file is whole (header and sizes; no
    tensor is read)."""
    folder = Path(folder)
    state = folder / "trainer_state.json"
    if not state.is_file():
        return f"{state} is missing (the checkpoint was not finished)"
    for path in sorted(folder.glob("*.json")):
        try:
            payload = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            return f"{path} is empty or not whole JSON ({path.stat().st_size} bytes)"
        if path == state and not (isinstance(payload, dict) and isinstance(payload.get("step"), int)):
            return f"{path} holds no step"
    for path in sorted(folder.glob("*.safetensors")):
        try:
            check_safetensors_file(path)
        except CorruptWeightsError as err:
            return str(err)
    return None


def latest_checkpoint(out_dir: str | Path, *, warn: bool = True) -> Path | None:
    """The newest intact checkpoint under ``out_dir/checkpoints`` (None if there is none). Newer ones that are
    damaged are passed over, each with a warning that names it and what is wrong."""
    folder = Path(out_dir) / "checkpoints"
    if not folder.is_dir():
        return None
    for candidate in sorted(folder.glob("step-*"), reverse=True):
        if not candidate.is_dir() or not candidate.name.removeprefix("step-").isdigit():
            continue
        problem = checkpoint_problem(candidate)
        if problem is None:
            return candidate
        if warn and (candidate / "trainer_state.json").is_file():  # an unfinished one is normal after a kill
            logger.warning("checkpoint %s is damaged and is passed over: %s", candidate, problem)
    return None


def set_aside(folder: Path, reason: str) -> Path:
    """Rename checkpoint ``folder`` to ``bad-<name>`` (replacing an older one of that name) and write ``reason``
    into its ``REASON.txt``; returns the new path."""
    target = folder.with_name(f"bad-{folder.name}")
    if target.exists():
        import shutil

        shutil.rmtree(target)
    folder.rename(target)
    (target / "REASON.txt").write_text(reason.rstrip() + "\n")
    return target


def last_good_checkpoint(out_dir: str | Path, failed_step: int) -> Path | None:
    """After a non-finite loss at ``failed_step``: set aside every checkpoint of that step or later (the weights
    that produced the loss), and return the newest intact one left, the state a resume continues from."""
    folder = Path(out_dir) / "checkpoints"
    if folder.is_dir():
        for candidate in sorted(folder.glob("step-*")):
            if candidate.name.removeprefix("step-").isdigit() and checkpoint_step(candidate) >= failed_step:
                set_aside(candidate, f"its weights gave a non-finite loss at step {failed_step}")
    return latest_checkpoint(out_dir)
