"""A device-memory budget for loaded models: they live on the CPU and move to the compute device when a node
needs them; when the next one would not fit, the least recently used go back to the CPU.

Modes (``--vram``), as ComfyUI's and diffusers' offloading offer them:

- ``auto`` (the default): ``normal`` within 90 % of a GPU's memory; ``high`` on the CPU;
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

MODES = ("auto", "high", "normal", "low", "sequential")
AUTO_SHARE = 0.9  # "auto" on a GPU: "normal" within this share of its memory
DENOISERS = ("unet", "controlnet")  # what --compile and --channels-last apply to


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
        self.mode = "auto"
        self.budget: int | None = None
        self.compile = self.channels_last = False
        self._prepared: "weakref.WeakSet[Any]" = weakref.WeakSet()  # denoisers already compiled / reformatted
        self._lock = threading.RLock()
        self._resident: "weakref.WeakKeyDictionary[Any, int]" = weakref.WeakKeyDictionary()  # module -> bytes
        self._order: list[weakref.ref] = []  # least recently used first
        self._pins: "weakref.WeakKeyDictionary[Any, int]" = weakref.WeakKeyDictionary()
        self._names: "weakref.WeakKeyDictionary[Any, str]" = weakref.WeakKeyDictionary()
        self._sequential: "weakref.WeakSet[Any]" = weakref.WeakSet()
        self.accounting = Accounting()

    def configure(self, mode: str = "auto", budget: int | None = None, compile: bool = False,
                  channels_last: bool = False) -> None:
        """``compile``: torch.compile each denoiser (UNet, ControlNet) once, the first time it comes to a GPU;
        ``channels_last``: denoisers in the channels-last memory format there (often faster convolutions on tensor
        cores)."""
        if mode not in MODES:
            raise NodegraphError(f"--vram {mode}: choose one of {', '.join(MODES)}")
        with self._lock:
            self.mode, self.budget = mode, budget
            self.compile, self.channels_last = compile, channels_last

    @property
    def offloads(self) -> bool:
        """Whether loaders should leave new models on the CPU (they come to the device when used)."""
        return self.mode not in ("high", "auto")

    def _resolve_auto(self, device) -> None:
        if self.mode != "auto" or str(device) == "cpu":
            return
        import torch

        free, total = torch.cuda.mem_get_info(torch.device(device))
        self.mode, self.budget = "normal", self.budget or int(total * AUTO_SHARE)

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
        self._resolve_auto(device)
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
        self.accounting.on_device = sum(self._resident.values())  # modules deleted meanwhile freed theirs
        if self.budget is not None and self.mode in ("normal", "low"):
            for victim in self._least_recent_first():
                if self.accounting.on_device + size <= self.budget:
                    break
                if not self._pins.get(victim):
                    self._send_away(victim)
            if self.accounting.on_device + size > self.budget:
                self.accounting.over_budget += 1
        module.to(device)
        self._prepare_denoiser(module, device)
        self._resident[module] = size
        self._order.append(weakref.ref(module))
        self.accounting.on_device += size
        self.accounting.peak = max(self.accounting.peak, self.accounting.on_device)
        self.accounting.moves.append((self._names.get(module, "?"), "in", size))

    def _prepare_denoiser(self, module, device) -> None:
        # the ControlNet runs beside the UNet at every step: left eager, it would cost a compiled run its gain
        if str(device) == "cpu" or module in self._prepared or self._names.get(module) not in DENOISERS:
            return
        if self.channels_last:
            import torch

            module.to(memory_format=torch.channels_last)
        if self.compile:
            module.compile()  # in place: the handle, its locks and patches keep the same module
        self._prepared.add(module)

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

    def unload_all(self) -> None:
        """Send every module not in use back to the CPU (a server's "free memory" request, a clean start)."""
        with self._lock:
            for module in self._least_recent_first():
                if not self._pins.get(module):
                    self._send_away(module)

    def reset_accounting(self) -> None:
        with self._lock:
            self.accounting = Accounting(on_device=sum(self._resident.values()))


MANAGER = ModelManager()


def compute_device(module):
    """The device ``module`` computes on. Its weights' device, except under sequential offload: there the weights
    wait on the meta device and accelerate's hooks bring each layer to the execution device for its call, so
    inputs must go there (as diffusers' pipelines find it through ``_execution_device``)."""
    if module in MANAGER._sequential:
        for sub in module.modules():
            device = getattr(getattr(sub, "_hf_hook", None), "execution_device", None)
            if device is not None:
                import torch

                return torch.device(device)
    # the first weight's device, as diffusers' ``.device`` finds it after scanning every submodule for group
    # offloading hooks (not used here), which costs a millisecond on each call for a UNet
    for tensor in module.parameters():
        return tensor.device
    return module.device


def on_device(ctx, *modules: tuple[str, Any]) -> contextlib.AbstractContextManager:
    """The modules a node is about to run, on the run's device for the block (per the process's mode and
    budget); without a run context (a node function called directly) they stay where they are."""
    if ctx is None:
        return contextlib.nullcontext()
    return MANAGER.use(ctx.device, *modules)


VAE_TILE_PIXELS = 4096 * 4096  # images above this many pixels (x batch) go through the VAE in tiles
_TILING = threading.Lock()


@contextlib.contextmanager
def tiled(vae_module, pixels: int) -> Iterator[None]:
    """Above VAE_TILE_PIXELS, diffusers' own VAE tiling and slicing for the block (``enable_tiling``,
    ``enable_slicing``): a bounded activation memory instead of one that grows with the image, at the price of
    slightly different pixels along tile seams. The VAE is shared, so the switch is held under a lock."""
    if pixels <= VAE_TILE_PIXELS or not hasattr(vae_module, "enable_tiling"):
        yield
        return
    with _TILING:
        vae_module.enable_tiling()
        vae_module.enable_slicing()
        try:
            yield
        finally:
            vae_module.disable_tiling()
            vae_module.disable_slicing()
