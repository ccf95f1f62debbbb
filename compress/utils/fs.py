"""File-system helpers: folders that appear whole or not at all, locks, probes, checksums.

An export ``out/NAME`` is written as ``out/.NAME.tmp-XXXXXXXX`` and renamed at the end
(:func:`atomic_directory`); a replaced export is moved to ``out/.NAME.old-PID`` for the instant
of the swap. A run holds ``out/.NAME.lock`` (:func:`target_lock`) for its whole length, so while
it holds the lock any such temporary folder of NAME was left by a killed run and can go
(:func:`remove_stale_temporaries`).
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from compress.errors import ExportError

try:  # POSIX only; elsewhere runs are not locked
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "atomic_directory",
    "lock_path",
    "probe_writable",
    "remove_stale_temporaries",
    "sha256_file",
    "stale_temporaries",
    "target_lock",
]


_TMP_MARK = ".tmp-"
_OLD_MARK = ".old-"


@contextmanager
def atomic_directory(target: Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``target``; rename it to ``target`` only on success.

    A crash or an exception leaves no half-written ``target`` behind: the temporary folder is
    removed and an existing ``target`` is untouched unless the new one is complete.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}{_TMP_MARK}", dir=target.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the result should be an ordinary folder
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if target.exists():
        if not overwrite:
            shutil.rmtree(tmp, ignore_errors=True)
            raise FileExistsError(target)
        backup = target.with_name(f".{target.name}{_OLD_MARK}{os.getpid()}")
        os.replace(target, backup)
        os.replace(tmp, target)
        shutil.rmtree(backup, ignore_errors=True)
    else:
        os.replace(tmp, target)


def sha256_file(path: Path, chunk_bytes: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks so large shards need no extra memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk_bytes):
            digest.update(block)
    return digest.hexdigest()


def lock_path(target: Path) -> Path:
    """The lock file a run writing ``target`` holds: ``.NAME.lock`` beside it."""
    target = Path(target)
    return target.parent / f".{target.name}.lock"


@contextmanager
def target_lock(target: Path) -> Iterator[None]:
    """Hold an exclusive advisory lock on ``target`` (a folder to be written) for the duration.

    A second holder fails at once with an :class:`ExportError` naming the first one's pid. The
    parent folders are created if needed and, when the body fails, removed again if still empty;
    the lock file is removed on exit.
    """
    target = Path(target)
    created = _make_parents(target.parent)
    lock = lock_path(target)
    succeeded = False
    try:
        if fcntl is None:  # pragma: no cover
            yield
            succeeded = True
            return
        handle = _acquire(lock, target)
        try:
            yield
            succeeded = True
        finally:
            # unlinked while still held: a waiter that opened the old file sees it is gone
            # (inode check in _acquire) and retries on a fresh one
            lock.unlink(missing_ok=True)
            os.close(handle)
    finally:
        if not succeeded:
            for folder in reversed(created):
                try:
                    folder.rmdir()
                except OSError:
                    break


def _make_parents(folder: Path) -> list[Path]:
    """``mkdir -p folder``; the folders it created, outermost first."""
    missing = []
    current = folder
    while not current.exists() and current != current.parent:
        missing.append(current)
        current = current.parent
    folder.mkdir(parents=True, exist_ok=True)
    return list(reversed(missing))


def _acquire(lock: Path, target: Path) -> int:
    assert fcntl is not None
    while True:
        handle = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(handle, 64).decode(errors="replace").strip() or "unknown"
            os.close(handle)
            raise ExportError(
                f"{target}: another compress run (pid {holder}) is writing this export now",
                hint=f"wait for it to finish, or choose another export folder (lock: {lock})",
            ) from None
        except BaseException:
            os.close(handle)
            raise
        try:
            current = os.stat(lock).st_ino
        except FileNotFoundError:
            current = None
        if current == os.fstat(handle).st_ino:
            os.ftruncate(handle, 0)
            os.write(handle, f"{os.getpid()}\n".encode())
            return handle
        os.close(handle)  # the previous holder removed this file as we opened it: retry


def stale_temporaries(target: Path) -> list[Path]:
    """Temporary folders that runs writing ``target`` make beside it (``.NAME.tmp-*``,
    ``.NAME.old-*``). Only stale ones exist while the caller holds :func:`target_lock`."""
    target = Path(target)
    if not target.parent.is_dir():
        return []
    name = re.escape(target.name)
    # mkdtemp's 8 random characters / a pid: never a prefix of another target's temporaries
    pattern = re.compile(rf"\.{name}(\.tmp-[A-Za-z0-9_]{{8}}|\.old-[0-9]+)")
    return sorted(p for p in target.parent.iterdir() if pattern.fullmatch(p.name) and p.is_dir())


def remove_stale_temporaries(target: Path) -> list[Path]:
    """Remove what :func:`stale_temporaries` finds; returns the folders removed."""
    removed = []
    for folder in stale_temporaries(target):
        shutil.rmtree(folder, ignore_errors=True)
        if not folder.exists():
            removed.append(folder)
    return removed


def probe_writable(folder: Path) -> None:
    """Raise the :class:`OSError` that creating a file in ``folder`` (or, if it does not exist
    yet, in its nearest existing parent, where it would be made) meets; a real probe, since
    permissions, read-only mounts and pseudo file systems all answer differently."""
    current = Path(folder)
    while not current.exists():
        if current == current.parent:
            break
        current = current.parent
    if not current.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(current))
    handle, probe = tempfile.mkstemp(prefix=".compress-probe-", dir=current)
    os.close(handle)
    os.unlink(probe)
