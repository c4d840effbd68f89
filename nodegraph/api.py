"""The Python API: load, validate and run workflows without the CLI.

    from nodegraph.api import Engine
    engine = Engine(cache_dir="~/.cache/nodegraph")      # cache_dir optional
    result = engine.run("workflows/outpaint_telea.json", overrides={"load.path": "me.png"}, out_dir="out")
    result.status            # {"load": "ran", ...}
    result.outputs["save"]   # output values of output nodes (or targets)

One Engine keeps its memory cache between runs, so a rerun recomputes only what changed.
"""
from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

from .cache import DEFAULT_MEMORY_BUDGET, DiskCache, MemoryCache
from .context import InterruptFlag, ProgressListener, RunContext
from .errors import Issue, NodegraphError, WorkflowInvalid
from .executor import Facts, RunResult, execute
from .gcpause import gc_paused
from .groups import GROUP_INPUT
from .registry import Registry, default_registry
from .validate import Graph, build_graph
from .workflow import Workflow, load_workflow

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
CACHE_DIR_ENV = "NODEGRAPH_CACHE_DIR"
VALIDATED_GRAPHS = 16  # how many validated workflows an engine remembers


def resolve_device(name: str | torch.device | None) -> torch.device:
    """'auto' picks CUDA when present; 'cuda' without a GPU is a usage error."""
    if isinstance(name, torch.device):
        return name
    name = name or "auto"
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise NodegraphError("--device cuda: no CUDA GPU is available to torch; use --device cpu")
    try:
        return torch.device(name)
    except RuntimeError as exc:
        raise NodegraphError(f"--device {name}: {exc}") from None


def resolve_dtype(name: str | torch.dtype | None) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if (name or "float32") not in DTYPES:
        raise NodegraphError(f"--dtype {name}: choose one of {', '.join(DTYPES)}")
    return DTYPES[name or "float32"]


class Engine:
    """Node registry + caches; runs any number of workflows."""

    def __init__(
        self,
        registry: Registry | None = None,
        plugin_dirs: list[str] | None = None,
        cache_dir: str | Path | None = None,
        memory_budget: int = DEFAULT_MEMORY_BUDGET,
    ):
        self.registry = registry or default_registry(plugin_dirs)
        cache_dir = cache_dir if cache_dir is not None else os.environ.get(CACHE_DIR_ENV) or None
        self.disk = DiskCache(cache_dir) if cache_dir else None
        self.memory = MemoryCache(memory_budget)
        self.facts = Facts(self.disk)
        self._graphs: OrderedDict[str, Graph] = OrderedDict()  # validated workflows, by content

    def load(self, source: str | Path | Workflow | dict) -> Workflow:
        """A Workflow from a path (JSON, or a PNG that SaveImage wrote), a dict or a Workflow."""
        if isinstance(source, Workflow):
            return source
        if isinstance(source, dict):
            from .workflow import parse_workflow

            return parse_workflow(source, base_dir=Path.cwd())
        return load_workflow(source)

    def compile(self, source, overrides: dict[str, Any] | None = None, targets: list[str] | None = None) -> Graph:
        """Load, apply overrides and validate; raises WorkflowInvalid listing every problem.

        A workflow already validated by this engine (same content, folder and targets, its
        files still there) is not validated again: a server or notebook rerunning one
        workflow pays for its checks once.
        """
        with gc_paused():
            workflow = self.load(source)
            if overrides:
                workflow = workflow.with_overrides(overrides)
            digest = hashlib.sha256(
                f"{workflow.base_dir}|{targets}|{workflow.model_dump_json(fallback=_tagged)}".encode()).hexdigest()
            graph = self._graphs.get(digest)
            if graph is not None and all(Path(p).exists() for n in graph.nodes.values() for p in n.paths.values()):
                self._graphs.move_to_end(digest)
                return graph
            graph = build_graph(workflow, self.registry, targets)
            self._graphs[digest] = graph
            while len(self._graphs) > VALIDATED_GRAPHS:
                self._graphs.popitem(last=False)
            return graph

    def validate(self, source, overrides: dict[str, Any] | None = None, targets: list[str] | None = None) -> list[Issue]:
        """Every problem in the workflow; an empty list means it is valid."""
        try:
            self.compile(source, overrides, targets)
        except WorkflowInvalid as exc:
            return exc.issues
        return []

    def run(
        self,
        source,
        overrides: dict[str, Any] | None = None,
        out_dir: str | Path = "output",
        targets: list[str] | None = None,
        device: str | torch.device | None = "cpu",
        dtype: str | torch.dtype | None = "float32",
        progress: ProgressListener | list[ProgressListener] | None = None,
        interrupt: InterruptFlag | None = None,
    ) -> RunResult:
        """Validate, then run the output nodes (or ``targets``) and what they need.

        Raises WorkflowInvalid before anything runs, NodeFailed when a node raises
        (finished nodes stay cached), Interrupted when ``interrupt`` is set.
        """
        graph = self.compile(source, overrides, targets)
        listeners = progress if isinstance(progress, list) else [progress] if progress else []
        base_dir = graph.workflow.base_dir or Path.cwd()
        ctx = RunContext(
            device=resolve_device(device),
            dtype=resolve_dtype(dtype),
            out_dir=Path(out_dir),
            workflow_dir=base_dir,
            workflow_factory=lambda: workflow_as_run(graph),
            node_versions={n.definition.type_name: n.definition.version for n in graph.nodes.values()},
            interrupt=interrupt or InterruptFlag(),
            listeners=listeners,
        )
        return execute(graph, ctx, self.memory, self.disk, self.facts)


def _tagged(value: Any) -> str:
    """A non-JSON value in the content digest, kept apart from any string."""
    return f"<{type(value).__qualname__}:{value!r}>"


def workflow_as_run(graph: Graph) -> dict:
    """The workflow with overrides applied and file params made absolute, to embed in outputs."""
    data = graph.workflow.model_dump(mode="json", exclude_none=True)
    for node_id, node in graph.nodes.items():
        origin = graph.origins.get(node_id)
        for name, path in node.paths.items():
            spec = data["groups"][origin.group]["nodes"][origin.inner] if origin else data["nodes"][node_id]
            source, _, port = spec.get("inputs", {}).get(name, "").partition(".")
            if origin and source == GROUP_INPUT:  # the path is a literal on the group instance
                spec = data["nodes"][origin.instance]
                name = port
            spec.setdefault("params", {})[name] = path
    return data
