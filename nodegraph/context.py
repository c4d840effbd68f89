"""What a running node may ask of the engine: device, dtype, folders, progress, interrupts."""
from __future__ import annotations

import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from .errors import Interrupted


@dataclass(frozen=True)
class ProgressEvent:
    """A step report from a long-running node (a sampler step, say)."""

    node_id: str
    node_type: str
    step: int
    total: int
    description: str = ""


ProgressListener = Callable[[ProgressEvent], None]


class InterruptFlag:
    """Set from a signal handler or another thread; checked between nodes and steps."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def set(self) -> None:
        self._event.set()

    def clear(self) -> None:
        self._event.clear()

    def is_set(self) -> bool:
        return self._event.is_set()


@dataclass
class RunContext:
    """Handed to a node that declares a ``RunContext`` parameter."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32
    out_dir: Path = field(default_factory=lambda: Path("output"))
    workflow_dir: Path = field(default_factory=Path.cwd)
    workflow_factory: Callable[[], dict] | None = None  # built on first use: most runs never need it
    node_versions: dict[str, int] = field(default_factory=dict)  # node type -> version, for run manifests
    interrupt: InterruptFlag = field(default_factory=InterruptFlag)
    listeners: list[ProgressListener] = field(default_factory=list)
    node_id: str = ""
    node_type: str = ""
    files: list[Path] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)  # per-run facts nodes add to (seeds, model ids)
    recorded: dict[str, dict[str, Any]] = field(default_factory=dict)  # node id -> facts of this run
    _workflow: dict | None = field(default=None, repr=False)

    @property
    def workflow(self) -> dict | None:
        """The workflow as run (overrides applied, file paths absolute), for embedding in outputs."""
        if self._workflow is None and self.workflow_factory is not None:
            self._workflow = self.workflow_factory()
        return self._workflow

    def check_interrupt(self) -> None:
        """Raise `Interrupted` if the user asked to stop; call it between steps."""
        if self.interrupt.is_set():
            raise Interrupted(f"interrupted in node '{self.node_id}' ({self.node_type})")

    def progress(self, step: int, total: int, description: str = "") -> None:
        """Report that ``step`` of ``total`` is done, then honour a pending interrupt."""
        event = ProgressEvent(self.node_id, self.node_type, step, total, description)
        for listener in self.listeners:
            listener(event)
        self.check_interrupt()

    def record(self, section: str, value: Any) -> None:
        """A fact about this node's work for the run manifest (a seed, a model id): shown in
        ``info[section][node id]``, and remembered with the node's cached result so that a
        rerun served from the cache still reports it."""
        self.info.setdefault(section, {})[self.node_id] = value
        self.recorded.setdefault(self.node_id, {})[section] = value

    def replay(self, facts: dict[str, Any]) -> None:
        """Facts recorded when a cached result was made, shown under the current node id."""
        for section, value in facts.items():
            self.info.setdefault(section, {})[self.node_id] = value

    def record_file(self, path: Path) -> None:
        """Note a file this run wrote, for the run result."""
        self.files.append(Path(path))

    def warn(self, message: str) -> None:
        """A user-facing warning that names the node."""
        warnings.warn(f"node '{self.node_id}' ({self.node_type}): {message}", UserWarning, stacklevel=2)

    def resolve_path(self, path: str | Path) -> Path:
        """A path from a param, relative to the workflow file's folder."""
        path = Path(path).expanduser()
        return path if path.is_absolute() else self.workflow_dir / path
