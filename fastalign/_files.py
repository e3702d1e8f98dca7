"""Files and folders written whole or not at all: a temporary file (folder) beside the target,
renamed over it once complete and removed on any failure, and write errors that name the
final path."""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import BinaryIO

PARTIAL_SUFFIX = ".partial"

# The causes a user can act on, in their words; other errors keep the system's text.
DISK_ERRORS = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.EROFS: "permission denied (read-only file system)",
}


def write_error(path: str | os.PathLike, exc: OSError, what: str = "write") -> OSError:
    """An error of ``exc``'s class and errno whose message names ``path`` (the file the
    user asked for, not a temporary one) and the cause: ``cannot write PATH: no space left
    on device``."""
    cause = DISK_ERRORS.get(exc.errno) or exc.strerror or str(exc)
    return type(exc)(exc.errno, f"cannot {what} {path}: {cause}")


def os_error_of(exc: BaseException) -> OSError | None:
    """``exc`` if it is an OSError, else the OSError it was raised from or while handling
    (torch.save reports a failed write of a Python file as a RuntimeError in some
    versions), else None."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, OSError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def partial_path(path: str | os.PathLike) -> Path:
    """The temporary file that :func:`atomic_write` writes ``path`` through."""
    path = Path(path)
    return path.with_name(path.name + PARTIAL_SUFFIX)


def remove_partial(path: str | os.PathLike) -> bool:
    """Removes the temporary file of ``path`` that an interrupted write left; True if one
    was there."""
    try:
        partial_path(path).unlink()
    except FileNotFoundError:
        return False
    return True


@contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """``with atomic_write(path) as f:`` writes ``f`` (binary) to ``path.partial``, then
    renames it over ``path``: readers see the old file or the whole new one. On any error
    the partial file is removed and an OSError is raised again naming ``path``."""
    path = Path(path)
    partial = partial_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(partial, "wb") as f:
            yield f
            f.flush()
            # The data reach the disk before the rename makes them the file.
            os.fsync(f.fileno())
        os.replace(partial, path)
    except BaseException as exc:
        # A partial left behind would hold the space of a full disk, and look like data.
        with suppress(OSError):
            partial.unlink(missing_ok=True)
        cause = os_error_of(exc) if isinstance(exc, Exception) else None
        if cause is not None:
            raise write_error(path, cause) from exc
        raise


def _fsync(path: Path) -> None:
    """A file's data, or a folder's entries, on the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """``with atomic_directory(path) as folder:`` writes the files of ``path`` in ``folder``,
    a new folder beside it (``path.partial-XXXX``); once the block ends, the files are synced
    and the folder renamed to ``path``: readers see no folder, the old one or the whole new
    one. An existing ``path`` (the caller decides whether it may be replaced) is renamed aside
    first and removed once the new folder is in place. On any error the new folder is
    removed and an OSError is raised again naming ``path``."""
    path = Path(path)
    folder = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(prefix=f"{path.name}{PARTIAL_SUFFIX}-", dir=path.parent))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(folder, 0o777 & ~umask)  # a folder's usual mode, not mkdtemp's private one
        yield folder
        for entry in folder.iterdir():
            _fsync(entry)
        _fsync(folder)
        old = None
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f"{path.name}.old-", dir=path.parent))
            os.replace(path, old / path.name)
        try:
            os.replace(folder, path)
        except OSError:
            if old is not None:  # the old folder back in its place
                os.replace(old / path.name, path)
                old.rmdir()
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        _fsync(path.parent)
    except BaseException as exc:
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
        cause = os_error_of(exc) if isinstance(exc, Exception) else None
        if cause is not None:
            raise write_error(path, cause) from exc
        raise
