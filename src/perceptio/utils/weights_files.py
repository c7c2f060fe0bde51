"""Checking safetensors files before loading them: an empty, truncated or foreign file is an error that names it
(the safetensors library's own message names neither the file nor the fix)."""

from __future__ import annotations

from pathlib import Path

from perceptio.errors import UserError

__all__ = [
    "CorruptWeightsError",
    "check_safetensors_file",
    "check_safetensors_folder",
    "weights_digest",
    "with_user_umask",
]


class CorruptWeightsError(UserError, ValueError):
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


def with_user_umask(path: str | Path) -> None:
    """Give the safetensors file ``path`` (or every ``*.safetensors`` file under the folder ``path``) the mode a
    newly created file gets under the user's umask. The safetensors library writes through a private temporary
    file, so its files come out 0600 whatever the umask: unreadable to the group that shares a run folder."""
    import os

    mask = os.umask(0)
    os.umask(mask)
    path = Path(path)
    files = sorted(path.rglob("*.safetensors")) if path.is_dir() else [path]
    for file in files:
        file.chmod(0o666 & ~mask)


def weights_digest(folder: str | Path, *, chunk: int = 1 << 22) -> str:
    """SHA-256 (hex, first 16 digits) over the names and bytes of every ``*.safetensors`` file in ``folder``,
    streamed: what identifies a model's weights wherever the folder lives."""
    import hashlib

    digest = hashlib.sha256()
    for path in sorted(Path(folder).glob("*.safetensors")):
        digest.update(path.name.encode() + b"\0")
        with path.open("rb") as handle:
            while block := handle.read(chunk):
                digest.update(block)
    return digest.hexdigest()[:16]
