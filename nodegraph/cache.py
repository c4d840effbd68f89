"""Where node outputs are kept between runs: an LRU memory cache and a disk cache.

Both are keyed by content (see keys.py), never by node id. The memory cache keeps
values as they are, so tensors stay on the device they were made on (latents made
on the GPU stay there). The disk cache stores safetensors files, written atomically.
"""
from __future__ import annotations

import json
import os
import tempfile
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from safetensors import safe_open

from .errors import NodegraphError
from .serialize import NotStorable, flatten, from_metadata, to_metadata, unflatten
from .workflow import write_text_atomic

DEFAULT_MEMORY_BUDGET = 8 * 1024**3


def value_nbytes(value: Any) -> int:
    """Approximate memory held by a node output: its tensors, not the weights of models it refers to."""
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
    """Least-recently-used cache of node outputs with a byte budget."""

    def __init__(self, budget_bytes: int = DEFAULT_MEMORY_BUDGET):
        self.budget_bytes = budget_bytes
        self._items: OrderedDict[str, tuple[dict[str, Any], int]] = OrderedDict()
        self.used_bytes = 0

    def __contains__(self, key: str) -> bool:
        return key in self._items

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: str) -> dict[str, Any] | None:
        entry = self._items.get(key)
        if entry is None:
            return None
        self._items.move_to_end(key)
        return entry[0]

    def put(self, key: str, outputs: dict[str, Any]) -> None:
        size = value_nbytes(outputs)
        if size > self.budget_bytes:
            return
        old = self._items.pop(key, None)
        if old is not None:
            self.used_bytes -= old[1]
        self._items[key] = (outputs, size)
        self.used_bytes += size
        while self.used_bytes > self.budget_bytes and self._items:
            _, (_, evicted) = self._items.popitem(last=False)
            self.used_bytes -= evicted

    def clear(self) -> None:
        self._items.clear()
        self.used_bytes = 0


class DiskCache:
    """Node outputs as safetensors files under ``root``; unreadable entries count as misses."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser()
        if self.root.exists() and not self.root.is_dir():
            raise NodegraphError(f"--cache-dir {self.root}: that is a file, not a folder; name a folder")
        self.write_error: OSError | None = None  # the first failure to write; later writes are skipped

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.safetensors"

    def get_facts(self, key: str) -> dict[str, Any] | None:
        """The manifest facts recorded with a node's result (kept even for results not storable)."""
        try:
            return json.loads(self._path(key).with_suffix(".facts.json").read_text())
        except (OSError, ValueError):
            return None

    def put_facts(self, key: str, facts: dict[str, Any]) -> None:
        if self.write_error is not None:
            return
        try:
            write_text_atomic(self._path(key).with_suffix(".facts.json"), json.dumps(facts, default=str))
        except OSError as exc:
            self.write_error = exc

    def get(self, key: str, device: torch.device | str = "cpu") -> dict[str, Any] | None:
        path = self._path(key)
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as handle:
                structure = from_metadata(handle.metadata())
            tensors = load_file(str(path), device=str(device))
            value = unflatten(structure, tensors)
        except Exception:  # corrupt, truncated or foreign file: recompute and overwrite
            return None
        return value if isinstance(value, dict) else None

    def put(self, key: str, outputs: dict[str, Any]) -> bool:
        """Store outputs; returns False (and stores nothing) if they hold a non-storable value."""
        try:
            structure, tensors = flatten(outputs)
        except NotStorable:
            return False
        if self.write_error is not None:
            return False
        # clone: views of one storage (batch slices) cannot be saved side by side
        tensors = {name: t.cpu().clone() for name, t in tensors.items()}
        path = self._path(key)
        tmp = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".safetensors")
            os.close(fd)
            save_file(tensors, tmp, metadata=to_metadata(structure))
            os.replace(tmp, path)
        except OSError as exc:  # full disk, read-only folder: the run goes on without storing
            self.write_error = exc
            warnings.warn(f"disk cache {self.root}: cannot write ({exc.strerror or exc}); "
                          "results of this run are not stored", UserWarning, stacklevel=2)
            return False
        finally:
            if tmp is not None:  # gone after a successful replace; a leftover after any failure
                Path(tmp).unlink(missing_ok=True)
        return True
