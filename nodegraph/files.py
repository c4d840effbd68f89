"""Files that params name: only regular files and folders of regular files are read.

A FIFO, a device, a socket or anything under /proc, /sys or /dev (directly or through a
symlink; /dev/shm, a RAM disk of ordinary files, excepted) is refused before it is opened:
reading one can block forever or never end.
Content hashes for cache keys open files without blocking and check again that they are
regular, so a file swapped for a FIFO after validation is refused too.
"""
from __future__ import annotations

import errno
import hashlib
import os
import stat
from pathlib import Path
from typing import NamedTuple

SPECIAL_ROOTS = ("/proc", "/sys", "/dev")
# tmpfs RAM disks of ordinary files (models are copied there to load fast); a device elsewhere under /dev is
# refused by its file type anyway
ORDINARY_UNDER_SPECIAL = ("/dev/shm",)
MAX_FOLDER_ENTRIES = 10_000
# Model files run to gigabytes; hashing one whole costs seconds per process. Past this size a
# file is fingerprinted by its size, times and first and last SAMPLE bytes (a safetensors header,
# which lists every tensor, sits at the start). ctime changes on every write, even one that
# restores mtime, so an edit in the middle is still a new fingerprint.
LARGE_FILE = 256 * 1024**2
SAMPLE = 8 * 1024**2
_KINDS = {stat.S_IFIFO: "a FIFO (named pipe)", stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device",
          stat.S_IFSOCK: "a socket"}


class FileProblem(NamedTuple):
    code: str  # "missing_file" | "bad_file"
    message: str


class UnsafeFile(OSError):
    """A path that is not a regular file (or folder of them) where one was expected."""


def _too_long(path: Path) -> bool:
    return any(len(part.encode()) > 255 for part in Path(path).parts)


def _stat_problem(path: Path, exc: OSError, kind: str = "any") -> FileProblem:
    if exc.errno in (errno.ENOENT, errno.ENOTDIR):
        word = {"file": "file", "dir": "folder"}.get(kind, "file or folder")
        return FileProblem("missing_file", f"no such {word} '{path}'")
    if exc.errno == errno.ENAMETOOLONG or (exc.errno == errno.ENOENT and _too_long(path)):
        longest = max((len(part) for part in Path(path).parts), default=0)
        return FileProblem("bad_file", f"the path is too long for the file system ({len(str(path))} characters, a "
                                       f"name of {longest}; names may have at most 255); shorten it")
    if exc.errno == errno.ELOOP:
        return FileProblem("bad_file", f"'{path}' is a loop of symbolic links")
    if exc.errno == errno.EACCES:
        return FileProblem("bad_file", f"'{path}' cannot be read (permission denied)")
    return FileProblem("bad_file", f"'{path}' cannot be read: {exc.strerror or exc}")


def special_file_system(path: Path, real: str | None = None) -> str | None:
    """Whether ``path`` (whose resolved path is ``real``, found when not given) is on a special file system."""
    real = real or os.path.realpath(path)
    if any(real == root or real.startswith(root + "/") for root in ORDINARY_UNDER_SPECIAL):
        return None
    for root in SPECIAL_ROOTS:
        if real == root or real.startswith(root + "/"):
            via = "" if str(path) == real else f" (through a link to '{real}')"
            return f"'{path}' is on {root}{via}, a special file system; give a regular file"
    return None


def _mode_problem(path: Path, mode: int, kind: str) -> str | None:
    if stat.S_ISREG(mode):
        return "is a file, not a folder" if kind == "dir" else None
    if stat.S_ISDIR(mode):
        return "is a folder, not a file" if kind == "file" else None
    what = _KINDS.get(stat.S_IFMT(mode), "not a regular file")
    return f"is {what}, not a regular file; give a regular file"


def check_path(path: str | Path, kind: str = "file") -> FileProblem | None:
    """Why ``path`` must not be read (None: a regular file, or a folder of regular files, as ``kind`` says:
    "file", "dir" or "any")."""
    path = Path(path)
    try:
        info = os.stat(path)
    except OSError as exc:
        return _stat_problem(path, exc, kind)
    special = special_file_system(path)
    if special:
        return FileProblem("bad_file", special)
    problem = _mode_problem(path, info.st_mode, kind)
    if problem:
        return FileProblem("bad_file", f"'{path}' {problem}")
    if stat.S_ISDIR(info.st_mode):
        return _folder_problem(path)
    return None


def folder_files(folder: Path) -> list[Path]:
    """Every file below ``folder`` (symlinks followed, loops skipped), sorted; raises UnsafeFile for an entry
    that is not a regular file or folder, or past MAX_FOLDER_ENTRIES."""
    # each folder travels with its resolved path: an entry that is not a link resolves to that path plus its
    # name, so only links need resolving (a realpath per file would cost most of the walk)
    files, seen, stack = [], set(), [(Path(folder), os.path.realpath(folder))]
    count = 0
    while stack:
        current, current_real = stack.pop()
        info = os.stat(current)
        if (info.st_dev, info.st_ino) in seen:
            continue
        seen.add((info.st_dev, info.st_ino))
        with os.scandir(current) as entries:
            for entry in entries:
                count += 1
                if count > MAX_FOLDER_ENTRIES:
                    raise UnsafeFile(f"'{folder}' holds more than {MAX_FOLDER_ENTRIES:,} files; name the model's own "
                                     "folder rather than one above it")
                child = Path(entry.path)
                try:
                    mode = os.stat(child).st_mode
                except OSError as exc:
                    raise UnsafeFile(_stat_problem(child, exc).message) from None
                real = os.path.realpath(child) if entry.is_symlink() else os.path.join(current_real, entry.name)
                special = special_file_system(child, real)
                if special:
                    raise UnsafeFile(special)
                if stat.S_ISDIR(mode):
                    stack.append((child, real))
                elif stat.S_ISREG(mode):
                    files.append(child)
                else:
                    raise UnsafeFile(f"'{child}' {_mode_problem(child, mode, 'file')}")
    return sorted(files)


def _folder_problem(folder: Path) -> FileProblem | None:
    try:
        folder_files(folder)
    except UnsafeFile as exc:
        return FileProblem("bad_file", str(exc))
    except OSError as exc:
        return _stat_problem(folder, exc)
    return None


def identity(path: str | Path) -> tuple:
    """What changes whenever a file's content may have: device, inode, size, mtime and ctime (a folder:
    its files'). Compared before and after a node reads the file."""
    path = Path(path)
    info = os.stat(path)
    if stat.S_ISDIR(info.st_mode):
        return tuple((str(f.relative_to(path)), *identity(f)) for f in folder_files(path))
    return info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns


def open_regular(path: str | Path):
    """Open a regular file for reading without ever blocking (a FIFO swapped in is refused, not waited on)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise UnsafeFile(f"'{path}' {_mode_problem(Path(path), mode, 'file')}")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


_HASHES: dict[tuple, str] = {}


def file_hash(path: Path) -> str:
    """SHA-256 of a file's content (a sampled fingerprint for large files), remembered per identity."""
    with open_regular(path) as handle:
        info = os.fstat(handle.fileno())
        memo = (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)
        cached = _HASHES.get(memo)
        if cached is not None:
            return cached
        if info.st_size < LARGE_FILE:
            cached = hashlib.file_digest(handle, "sha256").hexdigest()
        else:
            digest = hashlib.sha256(f"{info.st_size}:{info.st_mtime_ns}:{info.st_ctime_ns}:".encode())
            digest.update(handle.read(SAMPLE))
            handle.seek(-SAMPLE, os.SEEK_END)
            digest.update(handle.read(SAMPLE))
            cached = "sampled:" + digest.hexdigest()
    _HASHES[memo] = cached
    return cached


def path_fingerprint(path: str) -> str:
    """Content hash of a file; for a folder, the names and hashes of the files in it; for a name that is
    not a local path (a hub id), the name itself."""
    p = Path(path)
    if p.is_dir():
        digest = hashlib.sha256()
        for child in folder_files(p):
            digest.update(str(child.relative_to(p)).encode() + b"\0" + file_hash(child).encode())
        return digest.hexdigest()
    if os.path.lexists(p):
        return file_hash(p)
    return f"absent:{path}"


def folder_problem(path: str | Path, what: str) -> str | None:
    """Why ``path`` cannot be used as a folder to write into (None: it is a folder, or can be made)."""
    path = Path(path)
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        return f"{what}: {_stat_problem(path, exc).message}"
    if not stat.S_ISDIR(info.st_mode):
        return f"{what} '{path}' is a file, not a folder; name a folder"
    return None
