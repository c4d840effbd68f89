"""Where node outputs are kept between runs: an LRU memory cache and a size-limited disk cache.

Both are keyed by content (see keys.py), never by node id. The memory cache keeps values as
they are, so tensors stay on the device they were made on. The disk cache stores safetensors
files (no pickle) written atomically, each with a digest of its tensors that is checked on
every read: a damaged or altered entry is recomputed, never served. It evicts the least
recently used entries beyond its size limit. Manifest facts (seeds, model ids) live beside
the results they describe, so results served from a cache still report them.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import struct
import sys
import threading
import time
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable

from .atomic import TEMP_SUFFIX, atomic_path, clean_stale_temps, write_text_atomic
from .errors import NodegraphError
from .files import folder_problem, open_regular
from .serialize import NotStorable, flatten, from_metadata, to_metadata, unflatten

DEFAULT_MEMORY_BUDGET = 8 * 1024**3
DEFAULT_DISK_BUDGET = 10 * 1024**3
CACHE_DIR_ENV, CACHE_SIZE_ENV = "NODEGRAPH_CACHE_DIR", "NODEGRAPH_CACHE_SIZE"
OFF = ("off", "none", "no", "0")
ENTRY = re.compile(r"^[0-9a-f]{64}\.(safetensors|facts\.json)$")
DIGEST_KEY = "nodegraph.digest"
_FACTS_KEPT = 100_000


def default_cache_dir() -> Path | None:
    """$NODEGRAPH_CACHE_DIR ("off" turns the disk cache off), else the user's cache folder."""
    value = os.environ.get(CACHE_DIR_ENV)
    if value is not None and value.strip().lower() in OFF:
        return None
    if value:
        return Path(value).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("nodegraph")) / "results"


def parse_size(text: str | int, what: str = "cache size") -> int:
    """Bytes from "10GiB", "500MB", "2G" or a plain number; ``what`` names the setting in the error."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*", str(text), re.IGNORECASE)
    if match is None:
        raise NodegraphError(f"{what} '{text}': write a size such as 10GiB, 500MB or 2000000000")
    number, unit, binary = float(match[1]), match[2].upper(), match[3]
    base = 1024 if binary or not unit else 1000
    return int(number * base ** " KMGT".index(unit or " "))


def default_cache_size() -> int:
    value = os.environ.get(CACHE_SIZE_ENV)
    return parse_size(value, f"${CACHE_SIZE_ENV}") if value else DEFAULT_DISK_BUDGET


_PLAIN = (int, float, str, bool, type(None))


def value_nbytes(value: Any) -> int:
    """Approximate memory held by a node output: its tensors, not the weights of models it refers to."""
    torch = sys.modules.get("torch")  # no tensor exists unless torch was imported
    if torch is None or (type(value) is dict and all(type(v) in _PLAIN for v in value.values())):
        return 0
    total = 0
    stack = [value]
    seen: set[int] = set()
    while stack:
        item = stack.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, torch.Tensor):
            total += item.element_size() * item.nelement()
        elif isinstance(item, torch.nn.Module):
            continue  # model weights are shared and held by their loader: evicting frees nothing
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
        elif hasattr(item, "__dict__") and not isinstance(item, type):
            stack.extend(vars(item).values())
    return total


class MemoryCache:
    """Least-recently-used cache of node outputs with a byte budget; safe to share between threads."""

    def __init__(self, budget_bytes: int = DEFAULT_MEMORY_BUDGET):
        self.budget_bytes = budget_bytes
        # outputs and their sizes apart: a (dict, int) tuple per entry would stay tracked by the collector, and
        # full collections would rescan every entry of a large cache; most outputs hold no tensor (size 0) and
        # are not in _sizes at all
        self._items: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._sizes: dict[str, int] = {}
        self._lock = threading.Lock()
        self.used_bytes = 0

    def __contains__(self, key: str) -> bool:
        return key in self._items

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: str) -> dict[str, Any] | None:
        with self._lock:
            outputs = self._items.get(key)
            if outputs is not None:
                self._items.move_to_end(key)
            return outputs

    def put(self, key: str, outputs: dict[str, Any]) -> None:
        size = value_nbytes(outputs)
        if size > self.budget_bytes:
            return
        with self._lock:
            self._forget(key)
            self._items[key] = outputs
            if size:
                self._sizes[key] = size
                self.used_bytes += size
            while self.used_bytes > self.budget_bytes and self._items:
                evicted, _ = self._items.popitem(last=False)
                self.used_bytes -= self._sizes.pop(evicted, 0)

    def discard(self, key: str) -> None:
        """Forget one entry (a value a node changed in place is no longer what its key names)."""
        with self._lock:
            self._forget(key)

    def _forget(self, key: str) -> None:  # with the lock held
        if self._items.pop(key, None) is not None:
            self.used_bytes -= self._sizes.pop(key, 0)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._sizes.clear()
            self.used_bytes = 0


def save_file(tensors: dict, path: str, metadata: dict[str, str]) -> None:
    """safetensors' writer, imported on first use (torch is not needed to validate a workflow)."""
    from safetensors.torch import save_file as save

    save(tensors, path, metadata=metadata)


def entry_digest(key: str, structure: str, tensors: dict) -> str:
    """SHA-256 over the cache key, a stored value's structure (its JSON text) and every tensor's name, dtype,
    shape and bytes, in name order: any change to the entry, header or body, is a different digest, and so is
    a whole entry moved under another key's name."""
    import torch

    digest = hashlib.sha256(key.encode() + b"\0" + structure.encode() + b"\0")
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        if tensor.numel():
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().data)
    return digest.hexdigest()


def _read_safetensors(path: Path) -> tuple[dict[str, str], bytes]:
    """(metadata, the whole file) of a safetensors file; ValueError when the header is not one, OSError when it is
    no regular file (a FIFO put in its place is refused, not waited on)."""
    with open_regular(path) as handle:
        data = handle.read()
    if len(data) < 8:
        raise ValueError("too short")
    (size,) = struct.unpack("<Q", data[:8])
    if size > len(data) - 8:
        raise ValueError("header runs past the end")
    try:
        header = json.loads(data[8:8 + size])
    except RecursionError:
        raise ValueError("header nested too deeply") from None
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ValueError("no metadata of ours in the header")
    return metadata, data


class DiskCache:
    """Node outputs as safetensors files under ``root``, at most ``max_bytes`` in all (least recently used
    entries go first); entries that do not read back whole count as misses and are removed."""

    def __init__(self, root: str | Path, max_bytes: int = DEFAULT_DISK_BUDGET):
        self.root = Path(root).expanduser()
        problem = folder_problem(self.root, "cache folder")
        if problem:
            raise NodegraphError(problem)
        self.max_bytes = int(max_bytes)
        self._lock = threading.Lock()
        self._used: int | None = None  # bytes in the folder, counted on the first write
        self._unseen = 0  # bytes this process wrote since it last counted the folder
        self._with_facts: set[str] | None = None  # keys with a facts file, listed on first use
        self._listed_at = 0.0  # when they were listed
        self._warned: set[str] = set()

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.safetensors"

    # ------------------------------------------------------------------ results

    def get(self, key: str, device: Any = "cpu") -> dict[str, Any] | None:
        from safetensors import SafetensorError
        from safetensors.torch import load

        path = self._path(key)
        try:
            metadata, data = _read_safetensors(path)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:  # unreadable, truncated, not JSON
            return self._discard(path, exc)
        try:
            tensors = load(data)
            if metadata.get(DIGEST_KEY) != entry_digest(key, metadata.get("nodegraph", ""), tensors):
                return self._discard(path, ValueError("digest mismatch"))
            if str(device) != "cpu":
                tensors = {name: t.to(device) for name, t in tensors.items()}
            value = unflatten(from_metadata(metadata), tensors)
        except (SafetensorError, ValueError, KeyError, TypeError, NotStorable, RecursionError) as exc:
            return self._discard(path, exc)
        if not isinstance(value, dict):
            return self._discard(path, ValueError("not a dict of outputs"))
        self._see_new_entry(path)
        self._touch(key)
        return value

    def _see_new_entry(self, path: Path) -> None:
        """A result written after the facts were listed (by another process sharing the folder: a batch or a
        CLI run beside a server) may come with facts, for it and the nodes it cuts off: list them again."""
        with contextlib.suppress(OSError), self._lock:
            if self._with_facts is not None and path.stat().st_mtime >= self._listed_at:
                self._with_facts = None

    def _touch(self, key: str) -> None:
        """Mark an entry (result and facts) most recently used."""
        for path in (self._path(key), self._path(key).with_suffix(".facts.json")):
            with contextlib.suppress(OSError):
                os.utime(path)

    def _discard(self, path: Path, reason: Exception) -> None:
        """A damaged entry: removed, so the node runs again and writes a good one."""
        with contextlib.suppress(OSError):
            path.unlink()
        return None

    def put(self, key: str, outputs: dict[str, Any], warn: Callable[[str], None] | None = None) -> bool:
        """Store outputs; returns False (and stores nothing) if they hold a non-storable value or the write fails
        (told once to ``warn``, by default a Python warning)."""
        path = self._path(key)
        try:
            structure, tensors = flatten(outputs)
        except NotStorable:
            return False
        except Exception as exc:  # a tensor that cannot even be made contiguous (a sparse one, say)
            self._warn_once("write", f"disk cache {self.root}: cannot store a result ({_reason(exc)}); the run goes "
                                     "on without storing it", warn)
            return False
        try:
            # clone: views of one storage (batch slices) cannot be saved side by side
            tensors = {name: t.detach().cpu().clone() for name, t in tensors.items()}
            metadata = to_metadata(structure)
            metadata[DIGEST_KEY] = entry_digest(key, metadata["nodegraph"], tensors)
            self._prepare_folder(path.parent)
            with atomic_path(path) as tmp:
                save_file(tensors, str(tmp), metadata=metadata)
            size = path.stat().st_size
        except Exception as exc:  # full disk, file-size limit, read-only folder, a tensor safetensors refuses
            self._warn_once("write", f"disk cache {self.root}: cannot store a result ({_reason(exc)}); the run goes "
                                     "on without storing it", warn)
            return False
        self._account(size)
        return True

    # ------------------------------------------------------------------ facts

    def get_facts(self, key: str) -> dict[str, Any] | None:
        """The manifest facts recorded with a node's result (kept even for results not storable). Which keys
        have facts is listed once per process, so asking for the many keys that have none costs no file
        access."""
        with self._lock:
            if self._with_facts is None:
                self._listed_at = time.time()
                self._with_facts = {p.name[:64] for p, _, _ in self.entries() if p.name.endswith(".facts.json")}
            if key not in self._with_facts:
                return None
        try:
            with open_regular(self._path(key).with_suffix(".facts.json")) as handle:
                facts = json.loads(handle.read().decode("utf-8"))
        except (OSError, ValueError, RecursionError):
            return None
        if not isinstance(facts, dict):
            return None
        self._touch(key)
        return facts

    def put_facts(self, key: str, facts: dict[str, Any], warn: Callable[[str], None] | None = None) -> None:
        path = self._path(key).with_suffix(".facts.json")
        try:
            self._prepare_folder(path.parent)
            write_text_atomic(path, json.dumps(facts, default=str))
            size = path.stat().st_size
            with self._lock:
                if self._with_facts is not None:
                    self._with_facts.add(key)
        except Exception as exc:  # as in put: a cache that cannot be written never stops a run
            self._warn_once("write", f"disk cache {self.root}: cannot store a result ({_reason(exc)}); the run goes "
                                     "on without storing it", warn)
            return
        self._account(size)

    # ------------------------------------------------------------------ size

    def _prepare_folder(self, folder: Path) -> None:
        if not self.root.exists():
            self.root.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(OSError):  # https://bford.info/cachedir/: backup tools skip the folder
                (self.root / "CACHEDIR.TAG").write_text("Signature: 8a477f597d28d172789f06886806bc55\n"
                                                        "# nodegraph's cache of node results\n")
        clean_stale_temps(self.root, depth=1)

    def _account(self, size: int) -> None:
        with self._lock:
            self._unseen += size
            # Other processes (batch workers, a server) write into the same folder unseen: the folder is
            # counted again after every twentieth of the limit written here, so together they keep to it.
            if self._used is None or self._unseen > self.max_bytes // 20:
                self._used, self._unseen = sum(s for _, s, _ in self.entries()), 0
            else:
                self._used += size
            if self._used > self.max_bytes:
                self._used = self._evict(int(self.max_bytes * 0.9))

    def entries(self) -> list[tuple[Path, int, float]]:
        """(path, bytes, last use) of every entry file."""
        found = []
        try:
            folders = [p for p in self.root.iterdir() if len(p.name) == 2 and p.is_dir()]
        except OSError:
            return []
        for folder in folders:
            with contextlib.suppress(OSError), os.scandir(folder) as it:
                for entry in it:
                    if ENTRY.match(entry.name):
                        with contextlib.suppress(OSError):
                            info = entry.stat()
                            found.append((Path(entry.path), info.st_size, info.st_mtime))
        return found

    def _evict(self, target: int) -> int:
        """Remove least recently used entries (a result and its facts together) until at most ``target`` bytes
        remain; returns what remains."""
        by_key: dict[str, list] = {}
        for path, size, used in self.entries():
            by_key.setdefault(path.name[:64], []).append((path, size, used))
        total = sum(size for files in by_key.values() for _, size, _ in files)
        for key, files in sorted(by_key.items(), key=lambda item: max(used for _, _, used in item[1])):
            if total <= target:
                break
            for path, size, _ in files:
                with contextlib.suppress(OSError):
                    path.unlink()
                    total -= size
            if self._with_facts is not None:
                self._with_facts.discard(key)
        return total

    def info(self) -> dict[str, Any]:
        entries = self.entries()
        return {"folder": str(self.root), "entries": sum(1 for p, _, _ in entries if p.suffix == ".safetensors"),
                "bytes": sum(size for _, size, _ in entries), "limit_bytes": self.max_bytes}

    def prune(self, max_bytes: int | None = None) -> int:
        """Evict down to ``max_bytes`` (default: the limit); returns the bytes removed."""
        with self._lock:
            before = sum(size for _, size, _ in self.entries())
            self._used = self._evict(self.max_bytes if max_bytes is None else max_bytes)
            return before - self._used

    def clear(self) -> int:
        """Remove every entry and temporary file (nothing else in the folder); returns the files removed."""
        removed = 0
        with self._lock:
            for path, _, _ in self.entries():
                with contextlib.suppress(OSError):
                    path.unlink()
                    removed += 1
            self._with_facts = set()
            for tmp in self.root.glob(f"*/*{TEMP_SUFFIX}"):
                with contextlib.suppress(OSError):
                    tmp.unlink()
            self._used = 0
        return removed

    def _warn_once(self, kind: str, message: str, warn: Callable[[str], None] | None = None) -> None:
        with self._lock:
            if kind in self._warned:
                return
            self._warned.add(kind)
        if warn is not None:
            warn(message)
        else:
            warnings.warn(message, UserWarning, stacklevel=3)


def _reason(exc: Exception) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return f"{type(exc).__name__}: {exc}"


class Facts:
    """Manifest facts (seeds, model ids) recorded by nodes, by cache key, so that results served from a
    cache, and the ancestors they cut off, still report them."""

    def __init__(self, disk: DiskCache | None = None):
        self.disk = disk
        self.memory: OrderedDict[str, dict] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> dict | None:
        with self._lock:
            facts = self.memory.get(key)
        if facts is None and self.disk is not None:
            facts = self.disk.get_facts(key)
        return facts

    def put(self, key: str, facts: dict, warn: Callable[[str], None] | None = None) -> None:
        self.remember(key, facts)
        if self.disk is not None:
            self.disk.put_facts(key, facts, warn)

    def remember(self, key: str, facts: dict) -> None:
        """Keep facts in this process only (for a result put in the memory cache alone)."""
        with self._lock:
            self.memory[key] = facts
            self.memory.move_to_end(key)
            while len(self.memory) > _FACTS_KEPT:
                self.memory.popitem(last=False)
