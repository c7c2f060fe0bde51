"""Checking safetensors files before loading them: an empty, truncated or foreign file is an error that names it
(the safetensors library's own message names neither the file nor the fix)."""

from __future__ import annotations

from pathlib import Path

__all__ = ["CorruptWeightsError", "check_safetensors_file", "check_safetensors_folder"]


class CorruptWeightsError(ValueError):
    """A weights file that cannot be read: empty, cut short (an interrupted copy or save), or not safetensors.

    Attributes:
        path: the file.
    """

    def __init__(self, message: str, *, path: Path) -> None:
        super().__init__(message)
        self.path = path


def check_safetensors_file(path: str | Path) -> None:
    """Raise :class:`CorruptWeightsError` naming ``path`` unless its header is whole and its tensors' bytes are all
    there (the header's offsets are checked against the file size; no tensor is read)."""
    from safetensors import safe_open

    path = Path(path)
    size = path.stat().st_size
    if size == 0:
        message = f"{path} is empty (0 bytes): an interrupted save or copy; save or copy it again"
        raise CorruptWeightsError(message, path=path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            handle.keys()
    except Exception as err:  # noqa: BLE001 - SafetensorError and friends; all mean the same here
        reason = " ".join(str(err).split()) or type(err).__name__
        raise CorruptWeightsError(
            f"{path} ({size} bytes) is not a whole safetensors file ({reason}): cut short by an interrupted save or "
            "copy, or not a safetensors file; save or copy it again",
            path=path,
        ) from None


def check_safetensors_folder(folder: str | Path) -> list[Path]:
    """:func:`check_safetensors_file` on every ``*.safetensors`` file in ``folder``; returns them, sorted."""
    files = sorted(Path(folder).glob("*.safetensors"))
    for path in files:
        check_safetensors_file(path)
    return files
