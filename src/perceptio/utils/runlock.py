"""One writer per run folder: :func:`run_lock`.

Training, evaluation, tokenizer training and the quickstart hold a lock on the folder they write while they run.
The lock is a file, ``FOLDER/.perceptio.lock``, created exclusively (``O_EXCL``) and holding JSON
``{"pid", "host", "started", "command", "what"}``; where ``fcntl`` exists its holder also keeps an exclusive
``flock`` on it, which the kernel drops when the holder dies however it dies (SIGKILL, power cut aside).

A second writer fails at once with :class:`RunFolderLockedError`, naming the holder. A lock left by a process
that is gone is *stale* and taken over (with a warning): on the same host, when the recorded pid is not alive or
nobody holds the ``flock`` (the pid was reused). A lock written on another host is never taken over (network
file systems do not reliably share ``flock``): the error says which file to delete once that process is gone.

The lock is re-entrant within one thread (``train_from_folder`` locks the folder that ``train_tokenizer`` then
locks again); another thread of the same process is refused like another process. Under ``torchrun`` only global
rank 0 takes the lock: the other ranks belong to the same job (a refused rank 0 ends the job).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from perceptio.errors import UserError
from perceptio.utils.distributed import is_main_process

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["LOCK_NAME", "RunFolderLockedError", "read_lock", "run_lock"]

logger = logging.getLogger(__name__)

#: The lock file's name inside the run folder.
LOCK_NAME = ".perceptio.lock"

#: A lock file without a readable record younger than this is being written by its creator (not stale).
_BEING_WRITTEN_S = 10.0
#: How long to wait for a lock file that is being written or taken over to settle before giving up.
_SETTLE_S = 2.0


class RunFolderLockedError(UserError, RuntimeError):
    """Another process (or thread) is writing into the run folder.

    Attributes:
        folder: the run folder.
        holder: the lock file's record (``pid``, ``host``, ``started``, ``command``, ``what``; empty if unreadable).
    """

    def __init__(self, message: str, *, folder: Path, holder: dict[str, Any]) -> None:
        super().__init__(message)
        self.folder = folder
        self.holder = holder


@dataclass
class _Held:
    pid: int
    thread: int
    fd: int
    what: str
    depth: int = 1


_held: dict[str, _Held] = {}  # real path of a folder -> this process's lock on it
_guard = threading.Lock()


def _close_inherited_locks() -> None:
    """In a forked child (a data-loader worker): close the copies of the parent's lock files. A copy would keep
    the ``flock`` held after the parent dies, until the child noticed and exited, so that the next run could not
    take the dead run's folder over at once. The child holds no lock of its own."""
    for held in _held.values():
        with contextlib.suppress(OSError):
            os.close(held.fd)
    _held.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_inherited_locks)


def read_lock(folder: str | Path) -> dict[str, Any] | None:
    """The record of the lock on ``folder`` (None if there is none or it is unreadable)."""
    try:
        return _parse((Path(folder) / LOCK_NAME).read_bytes())
    except OSError:
        return None


@contextlib.contextmanager
def run_lock(folder: str | Path, what: str = "training") -> Iterator[Path]:
    """Hold the lock on ``folder`` (created if missing) while the block runs; yields the lock file's path.

    Args:
        folder: the run folder.
        what: what this process does there (``training``, ``evaluation``, ...), recorded for the error others get.

    Raises:
        RunFolderLockedError: another live process (or another thread of this one) holds the folder.
    """
    folder = Path(folder)
    path = folder / LOCK_NAME
    if not is_main_process():
        yield path  # torchrun: rank 0 holds the lock for the whole job
        return
    key = os.path.realpath(folder)
    with _guard:
        held = _held.get(key)
        if held is not None and held.pid == os.getpid():
            if held.thread != threading.get_ident():
                record = read_lock(folder) or {"pid": os.getpid(), "host": socket.gethostname(), "what": held.what}
                message = _message(folder, record, ", another thread of this process")
                raise RunFolderLockedError(message, folder=folder, holder=record)
            held.depth += 1
    if held is not None and held.pid == os.getpid():  # re-entered by the thread that holds it
        try:
            yield path
        finally:
            with _guard:
                held.depth -= 1
        return
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    fd = _acquire(folder, path, what)
    with _guard:
        _held[key] = _Held(os.getpid(), threading.get_ident(), fd, what)
    try:
        yield path
    finally:
        with _guard:
            _held.pop(key, None)
        _release(path, fd)
        if created:  # a run that failed before writing anything leaves no empty folder behind
            with contextlib.suppress(OSError):
                folder.rmdir()


def _record(what: str) -> dict[str, Any]:
    command = " ".join([Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python", *sys.argv[1:]])
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": command[:500],
        "what": what,
    }


def _parse(raw: bytes) -> dict[str, Any] | None:
    try:
        record = json.loads(raw.decode())
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(record, dict) or not isinstance(record.get("pid"), int):
        return None
    return record


def _message(folder: Path, record: dict[str, Any], note: str = "") -> str:
    if not record:
        holder = "another process (its lock file is being written, or unreadable)"
    else:
        facts = [f"pid {record.get('pid')} on host {record.get('host')}{note}"]
        if record.get("started"):
            facts.append(f"started {record['started']}")
        command = " ".join(str(record.get("command", "")).split())
        if command:
            facts.append(f"command: {command if len(command) <= 80 else command[:77] + '...'}")
        holder = f"a running {record.get('what') or 'run'} ({', '.join(facts)})"
    return (
        f"{folder} is locked by {holder}: wait for it to end or use another folder; "
        f"if that process is gone, delete {folder / LOCK_NAME}"
    )


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    if os.name == "nt":  # pragma: no cover - os.kill(pid, 0) would send CTRL_C_EVENT there
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: alive, another user's
        return True
    return True


def _flock(fd: int) -> bool | None:
    """Try the exclusive flock: True got it, False someone holds it, None the file system has no flock."""
    if fcntl is None:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError:
        return None
    return True


def _write(fd: int, record: dict[str, Any]) -> None:
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, (json.dumps(record) + "\n").encode())
    with contextlib.suppress(OSError):
        os.fsync(fd)


def _same_file(fd: int, path: Path) -> bool:
    try:
        mine, there = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (mine.st_dev, mine.st_ino) == (there.st_dev, there.st_ino)


def _acquire(folder: Path, path: Path, what: str) -> int:
    record = _record(what)
    deadline = time.monotonic() + _SETTLE_S
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            fd, seen = _take_over(folder, path, record)
            if fd is not None:
                return fd
            if time.monotonic() > deadline:
                raise RunFolderLockedError(_message(folder, seen or {}), folder=folder, holder=seen or {}) from None
            time.sleep(0.05)
            continue
        try:
            if fcntl is not None:
                with contextlib.suppress(OSError):  # blocks only while a contender looks at the new file
                    fcntl.flock(fd, fcntl.LOCK_EX)
            _write(fd, record)
        except BaseException:  # e.g. a full disk: leave no half-made lock behind
            _release(path, fd)
            raise
        return fd


def _take_over(folder: Path, path: Path, record: dict[str, Any]) -> tuple[int | None, dict[str, Any] | None]:
    """Look at an existing lock file: raise if its holder is alive, take it over if it is stale. Returns the
    descriptor now holding the lock, or None and what was read when the file is changing: look again."""
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return None, None  # released meanwhile
    try:
        locked = _flock(fd)
        os.lseek(fd, 0, os.SEEK_SET)
        holder = _parse(os.read(fd, 1 << 16))
        age = time.time() - os.fstat(fd).st_mtime
        same_host = holder is not None and holder.get("host") == record["host"]
        if locked is False:  # a live process holds the flock
            if holder is None or (same_host and not _alive(holder["pid"])):
                return None, holder  # being written, or being taken over by another process: look again
            raise RunFolderLockedError(_message(folder, holder), folder=folder, holder=holder)
        if locked and not _same_file(fd, path):
            return None, holder  # released (deleted) meanwhile
        if holder is None:
            if age < _BEING_WRITTEN_S:
                return None, holder  # its creator is still writing it
        elif not same_host or (locked is None and holder["pid"] != record["pid"] and _alive(holder["pid"])):
            # another host's lock is never judged from here; without flock, a live pid holds it
            raise RunFolderLockedError(_message(folder, holder), folder=folder, holder=holder)
        # stale: nobody holds the flock (its holder died; a live process of that pid is a reused pid), or no
        # flock here and the pid is gone
        gone = "unreadable" if holder is None else f"pid {holder['pid']} on {holder['host']} is gone"
        logger.warning("%s: taking over a stale lock (%s)", folder, gone)
        if locked is None:  # no flock to serialise a take-over in place: delete it and create it afresh
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            return None, holder
        _write(fd, record)
        taken, fd = fd, -1
        return taken, holder
    except OSError:
        return None, None
    finally:
        if fd >= 0:
            os.close(fd)


def _release(path: Path, fd: int) -> None:
    try:
        if _same_file(fd, path):  # unlinked while the flock is held: a waiting contender sees it gone
            path.unlink()
    except OSError as err:  # pragma: no cover - a folder made read-only meanwhile
        logger.warning("could not remove the lock file %s: %s", path, err)
    finally:
        os.close(fd)
