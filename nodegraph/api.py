"""The Python API: load, validate and run workflows without the CLI (see docs/api.md).

    from nodegraph.api import Engine
    engine = Engine()                                        # built-ins + installed plugins, disk cache on
    result = engine.run("workflows/outpaint_telea.json", overrides={"load.path": "me.png"}, out_dir="out")
    result.status            # {"load": "ran", ...}
    result.outputs["save"]   # output values of output nodes (or targets)

One Engine keeps its caches and loaded models between runs, so a rerun recomputes only what
changed; several threads may run workflows on one Engine at once.
"""
from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable

from .allocator import keep_freed_memory
from .cache import (DEFAULT_MEMORY_BUDGET, DiskCache, Facts, MemoryCache, default_cache_dir, default_cache_size,
                    parse_size)
from .confine import Confinement
from .context import InterruptFlag, ProgressListener, RunConfig, default_temp_dir
from .devices import resolve_device, resolve_dtype
from .errors import Issue, NodegraphError, WorkflowInvalid
from .executor import RunResult, execute
from .gcpause import gc_paused
from .groups import flat_params_owner
from .limits import Limits
from .model_folders import ModelRoots
from .registry import Registry
from .validate import Graph, build_graph
from .files import check_path, folder_problem
from .workflow import Workflow, load_workflow, read_workflow, read_workflow_file

VALIDATED_GRAPHS = 16  # how many validated workflows an engine remembers


class Engine:
    """Node registry + caches; runs any number of workflows, from any number of threads.

    ``cache_dir``: the disk cache folder; None uses $NODEGRAPH_CACHE_DIR or the user's cache folder,
    False turns the disk cache off. ``cache_size``: its limit in bytes (or "10GiB"); least recently used
    results go first. ``limits``: bounds on what one workflow may ask for (nodes, pixels). ``vram``: how loaded
    models share the GPU ("auto", "high", "normal", "low", "sequential"; docs/models.md), ``vram_budget``: the
    bytes (or "12GiB") they may take there; ``compile`` / ``channels_last``: UNets and ControlNets compiled with
    torch.compile (once per model per process) / in the channels-last format on the GPU; all apply to the whole
    process. ``models``: models roots searched for names in file params, before $NODEGRAPH_MODELS and the model
    paths file (``model_paths``: a file, None for $NODEGRAPH_MODEL_PATHS or the user's one, False for none); a
    ``ModelRoots`` is used as it is."""

    def __init__(
        self,
        registry: Registry | None = None,
        plugin_dirs: list[str] | None = None,
        cache_dir: str | Path | None | bool = None,
        memory_budget: int = DEFAULT_MEMORY_BUDGET,
        cache_size: int | str | None = None,
        limits: Limits | None = None,
        models: list[str | Path] | ModelRoots | None = None,
        model_paths: str | Path | bool | None = None,
        vram: str | None = None,
        vram_budget: int | str | None = None,
        compile: bool = False,
        channels_last: bool = False,
        confine: Confinement | None = None,
    ):
        keep_freed_memory()  # before any model loads: it applies to what is allocated after it
        if registry is None:
            from .plugins import default_registry

            registry = default_registry(plugin_dirs)
        self.registry = registry
        if cache_dir is None or cache_dir is True:
            cache_dir = default_cache_dir()
        self.disk = None
        if cache_dir not in (False, "", None):  # the size is read only for a cache that is on
            size = parse_size(cache_size) if cache_size is not None else default_cache_size()
            self.disk = DiskCache(cache_dir, size)
        self.memory = MemoryCache(memory_budget)
        self.facts = Facts(self.disk)
        self.limits = limits or Limits()
        if vram is not None or vram_budget is not None or compile or channels_last:
            from .nodes._memory import MANAGER  # the loaded models are the process's: so is their budget

            budget = parse_size(vram_budget, "VRAM budget") if vram_budget is not None else None
            MANAGER.configure(vram or "auto", budget, compile=compile, channels_last=channels_last)
        if isinstance(models, (str, Path)):
            models = [models]
        self.models = models if isinstance(models, ModelRoots) else ModelRoots.gather(
            models or (), model_paths, origin="Engine(models=...)")
        self.confine = confine  # served mode: the folders file params must stay in (nodegraph.confine)
        self._graphs: OrderedDict[str, Graph] = OrderedDict()  # validated workflows, by content
        self._lock = threading.Lock()

    def load(self, source: str | Path | Workflow | dict, raw: bytes | None = None) -> Workflow:
        """A Workflow from a path (JSON, or a PNG that SaveImage wrote), a dict or a Workflow. Structural
        problems are kept in ``workflow.problems`` and reported by validation with the rest. A ComfyUI workflow
        (API or editor format, or a PNG that ComfyUI wrote) is imported (docs/comfy.md); what cannot be
        imported raises WorkflowInvalid, each issue naming the ComfyUI id and class_type."""
        if isinstance(source, Workflow):
            return source
        if isinstance(source, dict):
            return read_workflow(source, base_dir=Path.cwd())
        return load_workflow(source, strict=False, raw=raw)

    def compile(self, source, overrides: dict[str, Any] | None = None, targets: list[str] | None = None) -> Graph:
        """Load, apply overrides and validate; raises WorkflowInvalid listing every problem.

        A workflow already validated by this engine (same content, overrides, folder and targets, its
        files still there and still regular files) is not validated again: a server or notebook rerunning
        one workflow pays for its checks once."""
        with gc_paused():
            raw = read_workflow_file(source) if isinstance(source, (str, Path)) else None  # read once
            digest = _digest(source, raw, overrides, targets)
            graph = self._remembered(digest)
            if graph is None:
                workflow = self.load(source, raw)
                if overrides:
                    workflow = workflow.with_overrides(overrides, strict=False)
                # the same content reached another way (an override that changes nothing, say)
                content = _workflow_digest(workflow, targets)
                graph = self._remembered(content)
                if graph is None:
                    graph = build_graph(workflow, self.registry, targets, self.limits, self.models, self.confine)
                self._remember(content, graph)
            self._remember(digest, graph)
            return graph

    def _remembered(self, digest: str | None) -> Graph | None:
        if digest is None:
            return None
        with self._lock:
            graph = self._graphs.get(digest)
            if graph is not None:
                self._graphs.move_to_end(digest)
        if graph is not None and all(check_path(p, "any") is None for n in graph.nodes.values()
                                     for p in (*n.paths.values(), *n.implied.values())) and (
                self.confine is None or all(self.confine.resolved_problem(p) is None for n in graph.nodes.values()
                                            for p in n.paths.values() if Path(p).is_absolute())):
            return graph
        return None  # a file is gone, is no longer a regular file or now leads out: validate again, which says so

    def _remember(self, digest: str | None, graph: Graph) -> None:
        if digest is None:
            return
        with self._lock:
            self._graphs[digest] = graph
            while len(self._graphs) > VALIDATED_GRAPHS:
                self._graphs.popitem(last=False)

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
        device: Any = "auto",
        dtype: Any = "float32",
        progress: ProgressListener | list[ProgressListener] | None = None,
        interrupt: InterruptFlag | None = None,
        temp_dir: str | Path | None = None,
        events: Callable[[str, str | None, Any], None] | None = None,
    ) -> RunResult:
        """Validate, then run the output nodes (or ``targets``) and what they need.

        Raises WorkflowInvalid before anything runs, NodeFailed when a node raises (finished nodes stay
        cached), Interrupted when ``interrupt`` is set; both carry the partial result as ``.result``.
        ``events``: told which nodes are cached, and when each node starts and is done (RunConfig.events)."""
        graph = self.compile(source, overrides, targets)
        for folder, what in ((out_dir, "output folder"), (temp_dir, "temp folder")):
            problem = folder_problem(folder, what) if folder is not None else None
            if problem:
                raise NodegraphError(problem)
        listeners = progress if isinstance(progress, list) else [progress] if progress else []
        config = RunConfig(
            device=resolve_device(device),
            dtype=resolve_dtype(dtype),
            out_dir=Path(out_dir),
            temp_dir=Path(temp_dir) if temp_dir is not None else default_temp_dir(),
            workflow_dir=graph.workflow.base_dir or Path.cwd(),
            node_versions={n.definition.type_name: n.definition.version for n in graph.nodes.values()},
            interrupt=interrupt or InterruptFlag(),
            listeners=tuple(listeners),
            limits=self.limits,
            workflow_factory=lambda drawn=None: workflow_as_run(graph, drawn),
            events=events,
        )
        return execute(graph, config, self.memory, self.disk, self.facts)


def _digest(source, raw: bytes | None, overrides, targets) -> str | None:
    """A content digest of what compile() is given (a file's bytes, not its parse); None when there is
    nothing stable to hash."""
    if raw is not None:
        content, where = raw, str(Path(source).resolve().parent)
    elif isinstance(source, dict):
        content, where = repr(source).encode(), str(Path.cwd())
    elif isinstance(source, Workflow):
        content, where = repr(source.model_dump(mode="python", by_alias=True)).encode(), str(source.base_dir)
    else:
        return None
    digest = hashlib.sha256(content)
    digest.update(f"|{where}|{targets!r}|{sorted((overrides or {}).items(), key=lambda kv: kv[0])!r}".encode())
    return digest.hexdigest()


def _workflow_digest(workflow: Workflow, targets) -> str:
    """The content of a loaded workflow (repr keeps NaN, inf and -inf apart), its folder and targets. The
    nodes are hashed one by one: a copy of a large workflow would be fresh memory, which the system hands
    out page by page at a cost that outweighs the hashing."""
    digest = hashlib.sha256(repr((workflow.model_dump(mode="python", by_alias=True, exclude={"nodes"}),
                                  str(workflow.base_dir), targets, [str(i) for i in workflow.problems])).encode())
    for node_id, spec in workflow.nodes.items():
        digest.update(repr((node_id, spec.__dict__)).encode())  # every field of the node, by name
    return digest.hexdigest()


def workflow_as_run(graph: Graph, drawn: dict[str, dict] | None = None) -> dict:
    """The workflow with overrides applied, file params made absolute and params drawn at random given
    their values, to embed in outputs (rerunning it makes the same result)."""
    data = graph.workflow.model_dump(mode="json", by_alias=True, exclude_none=True)
    for node_id, node in graph.nodes.items():
        origin = graph.origins.get(node_id)
        for name, path in node.paths.items():
            spec, param = flat_params_owner(data, origin, node_id, name)
            spec.setdefault("params", {})[param] = path
        for name, value in (drawn or {}).get(node_id, {}).items():
            spec, param = flat_params_owner(data, origin, node_id, name)
            spec.setdefault("params", {})[param] = value
    return data
