"""Atomic file writes, and cleaning up after writers that were killed.

A file is written under a hidden temporary name in its final folder and then renamed, so
a reader never sees half a file. Temporary names carry the writer's host and process id:
the next writer into the same folder removes what a dead process on this host left
behind (or anything older than a day), and never a live writer's file.
"""
from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import socket
import stat
import threading
import time
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

TEMP_SUFFIX = ".ngtmp"
_HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:40] or "host"
_TEMP = re.compile(r"^\..*\.(?P<host>[A-Za-z0-9-]+)\.(?P<pid>\d+)\.[0-9a-f]+" + re.escape(TEMP_SUFFIX) + "$")
STALE_SECONDS = 24 * 3600
_cleaned: set[str] = set()
_cleaned_lock = threading.Lock()


def temp_path(folder: Path, name: str) -> Path:
    """A fresh hidden temporary name for ``name`` in ``folder``, marked with this host and process."""
    return folder / f".{name[:100]}.{_HOST}.{os.getpid()}.{secrets.token_hex(6)}{TEMP_SUFFIX}"


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces ``path``, on any failure it is removed."""
    _check_replaceable(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(path.parent)
    tmp = temp_path(path.parent, path.name)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


def _check_replaceable(path: Path) -> None:
    """The rename at the end replaces whatever has the name: only a regular file (or a link to one) may be
    replaced, never a device, a FIFO, a folder or a link such as /dev/stdout (a save to /dev/null run as
    root would otherwise swap the system's null device for a file)."""
    from .files import special_file_system

    try:
        info = os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return
    if stat.S_ISLNK(info.st_mode):
        target = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(path)), os.readlink(path)))
        if special_file_system(path, target):
            raise OSError(errno.EEXIST, f"is a link to '{target}', not a regular file; name a regular file", str(path))
        try:
            info = os.stat(path)
        except OSError:  # a dangling link is replaced like a file
            return
    if stat.S_ISDIR(info.st_mode):
        raise OSError(errno.EISDIR, "is a folder, not a regular file; name a regular file", str(path))
    if not stat.S_ISREG(info.st_mode):
        raise OSError(errno.EEXIST, "exists and is not a regular file; name a regular file", str(path))


def write_new_numbered(folder: Path, name_for: Callable[[int], str], first: int, write: Callable[[BinaryIO], None]) -> Path:
    """Write a new file ``folder/name_for(n)`` for the first free n >= ``first``, atomically, never replacing
    an existing file: the data goes to a temporary file, which then gets its final name with ``os.link``
    (which fails rather than overwrite; the next number is tried), or, on file systems without hard links,
    an ``os.replace`` onto a name first claimed by an exclusive create."""
    folder.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(folder)
    temp = temp_path(folder, name_for(first))
    # os.open with 0o666 so the file gets the usual permissions (umask applies), unlike mkstemp's 0o600
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        index = first
        while True:
            target = folder / name_for(index)
            try:
                os.link(temp, target)
                return target
            except FileExistsError:
                index += 1
            except OSError:  # no hard links here: claim the name with an exclusive create, then rename onto it
                try:
                    os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
                except FileExistsError:  # another writer has this number (a check, then a rename, would race)
                    index += 1
                    continue
                try:
                    os.replace(temp, target)
                except BaseException:  # never leave the empty claim behind
                    with contextlib.suppress(OSError):
                        target.unlink()
                    raise
                return target
    finally:
        with contextlib.suppress(OSError):
            temp.unlink()


def write_bytes_atomic(path: Path, data: bytes) -> Path:
    with atomic_path(Path(path)) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text_atomic(path: Path, text: str) -> Path:
    return write_bytes_atomic(Path(path), text.encode("utf-8"))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def is_stale_temp(path: Path, now: float | None = None) -> bool:
    """A temporary file whose writer is gone: a dead process on this host, or older than a day."""
    match = _TEMP.match(path.name)
    if match is None:
        return False
    if match["host"] == _HOST and int(match["pid"]) != os.getpid() and not _alive(int(match["pid"])):
        return True
    try:
        return (now or time.time()) - path.stat().st_mtime > STALE_SECONDS
    except OSError:
        return False


def clean_stale_temps(folder: Path, depth: int = 0) -> int:
    """Remove stale temporary files in ``folder`` (and ``depth`` levels below), once per folder per process."""
    key = f"{Path(folder).resolve()}|{depth}"
    with _cleaned_lock:
        if key in _cleaned:
            return 0
        _cleaned.add(key)
    removed = 0
    folders, frontier = [Path(folder)], [Path(folder)]
    for _ in range(depth):
        frontier = [sub for f in frontier for sub in _subfolders(f)]
        folders += frontier
    now = time.time()
    for current in folders:
        try:
            names = [p for p in current.iterdir() if p.name.endswith(TEMP_SUFFIX)]
        except OSError:
            continue
        for tmp in names:
            if is_stale_temp(tmp, now):
                with contextlib.suppress(OSError):
                    tmp.unlink()
                    removed += 1
    return removed


def _subfolders(folder: Path) -> list[Path]:
    try:
        return [p for p in folder.iterdir() if p.is_dir() and not p.is_symlink()]
    except OSError:
        return []
