"""What a running node may ask of the engine: device, dtype, folders, limits, progress, interrupts.

A run has three parts, so that runs sharing one Engine in several threads share no mutable state:

- ``RunConfig``: the fixed configuration of one run (device, dtype, folders, listeners, limits);
- ``RunRecord``: what the run did (files written, manifest facts, warnings), one per run;
- ``RunContext``: the fresh per-node view a node function receives (``ctx: RunContext``).
"""
from __future__ import annotations

import dataclasses
import tempfile
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .errors import Interrupted
from .limits import Limits


@dataclass(frozen=True)
class ProgressEvent:
    """A step report from a long-running node (a sampler step, say)."""

    node_id: str
    node_type: str
    step: int
    total: int
    description: str = ""


ProgressListener = Callable[[ProgressEvent], None]


class NodeWarning(UserWarning):
    """A warning about one node's work (a truncated prompt, say); its text names the node."""


class InterruptFlag:
    """Set from a signal handler or another thread; checked between nodes and steps."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.running = False  # whether a run is under way to honour it (else a stop is immediate)
        self.raised = 0  # stops raised as KeyboardInterrupt into running code (a second Ctrl-C)

    def set(self) -> None:
        self._event.set()

    def clear(self) -> None:
        self._event.clear()

    def is_set(self) -> bool:
        return self._event.is_set()


def _default_device():
    import torch

    return torch.device("cpu")


def _default_dtype():
    import torch

    return torch.float32


def default_temp_dir() -> Path:
    return Path(tempfile.gettempdir()) / "nodegraph-preview"


@dataclass(frozen=True)
class RunConfig:
    """The fixed configuration of one run."""

    device: Any = field(default_factory=_default_device)  # torch.device
    dtype: Any = field(default_factory=_default_dtype)  # torch.dtype
    out_dir: Path = field(default_factory=lambda: Path("output"))
    temp_dir: Path = field(default_factory=default_temp_dir)  # previews
    workflow_dir: Path = field(default_factory=Path.cwd)
    workflow_factory: Callable[..., dict] | None = None  # the workflow as run, built on first use
    node_versions: dict[str, int] = field(default_factory=dict)  # node type -> version, for run manifests
    interrupt: InterruptFlag = field(default_factory=InterruptFlag)
    listeners: tuple[ProgressListener, ...] = ()
    limits: Limits = field(default_factory=Limits)
    # Told what the run does, node by node (a server's messages): ("cached", None, [node ids served from a
    # cache or not needed]) once planned, then ("start", node id, None) and ("done", node id, [files written]).
    events: Callable[[str, str | None, Any], None] | None = None


@dataclass
class RunRecord:
    """What one run did, filled in by its nodes."""

    files: list[Path] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)  # manifest facts by section, then node id
    recorded: dict[str, dict[str, Any]] = field(default_factory=dict)  # node id -> facts it recorded itself
    warnings: list[str] = field(default_factory=list)
    drawn: dict[str, dict[str, int]] = field(default_factory=dict)  # node id -> params drawn at random
    _workflow: dict | None = field(default=None, repr=False)

    def workflow(self, config: RunConfig) -> dict | None:
        """The workflow as run; the factory is told the values drawn for "random" params, if any."""
        if self._workflow is None and config.workflow_factory is not None:
            factory = config.workflow_factory
            self._workflow = factory(drawn=self.drawn) if self.drawn else factory()
        return self._workflow


_CONFIG_FIELDS = {f.name for f in dataclasses.fields(RunConfig)}
_RECORD_FIELDS = {f.name for f in dataclasses.fields(RunRecord) if not f.name.startswith("_")}


class RunContext:
    """Handed to a node that declares a ``RunContext`` parameter: one per node call.

    Outside the engine (tests, notebooks) ``RunContext(out_dir=..., node_id=...)`` makes a standalone
    one; any RunConfig or RunRecord field may be given by name."""

    __slots__ = ("config", "run", "node_id", "node_type")

    def __init__(self, config: RunConfig | None = None, run: RunRecord | None = None, node_id: str = "",
                 node_type: str = "", **fields: Any):
        unknown = set(fields) - _CONFIG_FIELDS - _RECORD_FIELDS
        if unknown:
            raise TypeError(f"RunContext got unknown fields {sorted(unknown)}")
        if "listeners" in fields:
            fields["listeners"] = tuple(fields["listeners"])
        self.config = config or RunConfig(**{k: v for k, v in fields.items() if k in _CONFIG_FIELDS})
        self.run = run or RunRecord(**{k: v for k, v in fields.items() if k in _RECORD_FIELDS})
        self.node_id, self.node_type = node_id, node_type

    # the run's configuration
    device = property(lambda self: self.config.device)
    dtype = property(lambda self: self.config.dtype)
    out_dir = property(lambda self: self.config.out_dir)
    temp_dir = property(lambda self: self.config.temp_dir)
    workflow_dir = property(lambda self: self.config.workflow_dir)
    node_versions = property(lambda self: self.config.node_versions)
    limits = property(lambda self: self.config.limits)
    interrupt = property(lambda self: self.config.interrupt)
    # the run's record
    files = property(lambda self: self.run.files)
    info = property(lambda self: self.run.info)

    @property
    def workflow(self) -> dict | None:
        """The workflow as run (overrides applied, file paths absolute), for embedding in outputs."""
        return self.run.workflow(self.config)

    def check_interrupt(self) -> None:
        """Raise `Interrupted` if the user asked to stop; call it between steps."""
        if self.config.interrupt.is_set():
            raise Interrupted(f"interrupted in node '{self.node_id}' ({self.node_type})")

    def progress(self, step: int, total: int, description: str = "") -> None:
        """Report that ``step`` of ``total`` is done, then honour a pending interrupt."""
        event = ProgressEvent(self.node_id, self.node_type, step, total, description)
        for listener in self.config.listeners:
            listener(event)
        self.check_interrupt()

    def record(self, section: str, value: Any) -> None:
        """A fact about this node's work for the run manifest (a seed, a model id): shown in
        ``info[section][node id]``, and remembered with the node's cached result so that a
        rerun served from the cache still reports it."""
        self.run.info.setdefault(section, {})[self.node_id] = value
        self.run.recorded.setdefault(self.node_id, {})[section] = value

    def replay(self, facts: dict[str, Any]) -> None:
        """Facts recorded when a cached result was made, shown under the current node id."""
        for section, value in facts.items():
            self.run.info.setdefault(section, {})[self.node_id] = value

    def record_file(self, path: Path) -> None:
        """Note a file this run wrote, for the run result."""
        self.run.files.append(Path(path))

    def warn(self, message: str) -> None:
        """A user-facing warning, one line that names the node (a ``NodeWarning``)."""
        text = f"node '{self.node_id}' ({self.node_type}): {message}"
        self.run.warnings.append(text)
        warnings.warn(NodeWarning(text), stacklevel=2)

    def resolve_path(self, path: str | Path) -> Path:
        """A path from a param, relative to the workflow file's folder."""
        path = Path(path).expanduser()
        return path if path.is_absolute() else self.workflow_dir / path
