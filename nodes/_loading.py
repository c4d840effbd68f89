"""What the model loaders share: one load per process, file identities, safetensors headers."""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Callable, Iterable

from nodegraph.errors import NodeError


class LoadedOnce:
    """Loaded models by identity: one load per process, shared by every node that asks."""

    def __init__(self) -> None:
        self._items: dict[tuple, Any] = {}
        self.lock = threading.RLock()

    def get(self, key: tuple, load: Callable[[], Any]) -> Any:
        with self.lock:
            if key not in self._items:
                self._items[key] = load()
            return self._items[key]

    def clear(self) -> None:
        with self.lock:
            self._items.clear()


def files_identity(paths: Iterable[Path]) -> tuple:
    """The resolved files with their sizes and modification times: an edited file is another load."""
    identity = []
    for path in paths:
        stat = path.stat()
        identity.append((str(path.resolve()), stat.st_size, stat.st_mtime_ns))
    return tuple(identity)


def safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape from a .safetensors header, without reading the weights."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}
    except Exception as exc:  # safetensors raises its own error types for a damaged header
        raise NodeError(f"cannot read '{path}' as safetensors: {exc}") from None
