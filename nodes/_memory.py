"""A device-memory budget for loaded models: they live on the CPU and move to the compute device when a node
needs them; when the next one would not fit, the least recently used go back to the CPU.

Modes (``--vram``), as ComfyUI's and diffusers' offloading offer them:

- ``high``: every model stays on the device once it is there (the fastest; no budget);
- ``normal``: models stay on the device while they fit the budget, least recently used leave first;
- ``low``: a model is on the device only while a node uses it (diffusers' ``enable_model_cpu_offload``);
- ``sequential``: a model's layers visit the device one at a time during its forward pass (accelerate's
  ``cpu_offload``, diffusers' ``enable_sequential_cpu_offload``): the least memory, the slowest.

One manager serves the process (loaded models are shared by every Engine). Moving a module never changes
its arithmetic, so results with offloading are those without. Modules a node is using are pinned: never
moved away under it, even when another thread needs room (the budget may then be exceeded, and that is
recorded).
"""
from __future__ import annotations

import contextlib
import threading
import weakref
from dataclasses import dataclass, field
from typing import Any, Iterator

from nodegraph.errors import NodegraphError

MODES = ("high", "normal", "low", "sequential")


def module_bytes(module) -> int:
    """Bytes of a module's parameters and buffers."""
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


@dataclass
class Accounting:
    """What the manager did, for tests and benchmarks: bytes on the device now and at most, and each move."""

    on_device: int = 0
    peak: int = 0
    over_budget: int = 0  # times pinned modules alone exceeded the budget
    moves: list[tuple[str, str, int]] = field(default_factory=list)  # (module name, "in" | "out", bytes)


class ModelManager:
    def __init__(self) -> None:
        self.mode = "high"
        self.budget: int | None = None
        self._lock = threading.RLock()
        self._resident: "weakref.WeakKeyDictionary[Any, int]" = weakref.WeakKeyDictionary()  # module -> bytes
        self._order: list[weakref.ref] = []  # least recently used first
        self._pins: "weakref.WeakKeyDictionary[Any, int]" = weakref.WeakKeyDictionary()
        self._names: "weakref.WeakKeyDictionary[Any, str]" = weakref.WeakKeyDictionary()
        self._sequential: "weakref.WeakSet[Any]" = weakref.WeakSet()
        self.accounting = Accounting()

    def configure(self, mode: str = "high", budget: int | None = None) -> None:
        if mode not in MODES:
            raise NodegraphError(f"--vram {mode}: choose one of {', '.join(MODES)}")
        with self._lock:
            self.mode, self.budget = mode, budget

    @property
    def offloads(self) -> bool:
        """Whether loaders should leave new models on the CPU (they come to the device when used)."""
        return self.mode != "high"

    @contextlib.contextmanager
    def use(self, device, *modules: tuple[str, Any]) -> Iterator[None]:
        """Have ``modules`` (name, module) on ``device`` for the block; pinned while it runs."""
        modules = tuple((name, m) for name, m in modules if m is not None)
        with self._lock:
            for name, module in modules:
                self._names[module] = name
                self._pins[module] = self._pins.get(module, 0) + 1
            for _, module in modules:
                self._bring(module, device)
        try:
            yield
        finally:
            with self._lock:
                for _, module in modules:
                    self._pins[module] -= 1
                    if self.mode == "low" and self._pins[module] == 0:
                        self._send_away(module)

    def _bring(self, module, device) -> None:
        if self.mode == "sequential" and str(device) != "cpu":
            if module not in self._sequential:
                from accelerate import cpu_offload

                cpu_offload(module, execution_device=device)
                self._sequential.add(module)
            return
        if module in self._resident:
            self._touch(module)
            return
        size = module_bytes(module)
        if self.budget is not None and self.mode in ("normal", "low"):
            for victim in self._least_recent_first():
                if self.accounting.on_device + size <= self.budget:
                    break
                if not self._pins.get(victim):
                    self._send_away(victim)
            if self.accounting.on_device + size > self.budget:
                self.accounting.over_budget += 1
        module.to(device)
        self._resident[module] = size
        self._order.append(weakref.ref(module))
        self.accounting.on_device += size
        self.accounting.peak = max(self.accounting.peak, self.accounting.on_device)
        self.accounting.moves.append((self._names.get(module, "?"), "in", size))

    def _send_away(self, module) -> None:
        size = self._resident.pop(module, None)
        if size is None:
            return
        module.to("cpu")
        self._order = [ref for ref in self._order if ref() is not None and ref() is not module]
        self.accounting.on_device -= size
        self.accounting.moves.append((self._names.get(module, "?"), "out", size))

    def _touch(self, module) -> None:
        self._order = [ref for ref in self._order if ref() is not None and ref() is not module]
        self._order.append(weakref.ref(module))

    def _least_recent_first(self) -> list:
        return [m for m in (ref() for ref in self._order) if m is not None]

    def reset_accounting(self) -> None:
        with self._lock:
            self.accounting = Accounting(on_device=sum(self._resident.values()))


MANAGER = ModelManager()
