"""Runs a validated graph: only what the outputs need, each node at most once,
with results from the memory or disk cache wherever the cache key matches.

Planning walks the needed nodes backwards: a node whose key is cached is served
from the cache and its ancestors are not needed at all ("skipped"); otherwise it
runs and its inputs become needed. Everything is iterative, so a chain of any
length works, and the cost per node is constant. A node's outputs are let go as
soon as the last node that needs them has run (the memory cache keeps what fits
its budget). A run never reports success after an interrupt.
"""
from __future__ import annotations

import secrets
import time
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from pydantic import ValidationError

from .cache import DiskCache, Facts, MemoryCache
from .context import RunConfig, RunContext, RunRecord
from .errors import Interrupted, Issue, NodeError, NodeFailed, WorkflowInvalid
from .files import identity, path_fingerprint
from .groups import param_owner
from .gcpause import gc_frozen, gc_paused
from .keys import canonical_params, node_key, output_salt, run_salt
from .limits import limits_in_force
from .definitions import InputChanged, ParamProblem
from .validate import Graph, GraphNode

RAN, CACHED, SKIPPED, FAILED, INTERRUPTED = "ran", "cached", "skipped", "failed", "interrupted"
RANDOM_SEEDS = "random"  # manifest section for params drawn at random


class NodeStatus(NamedTuple):
    """What happened to one node. During the node loop a run keeps each status as a plain tuple (which the
    collector stops tracking at its first look, so full collections do not rescan a million of them) and
    makes the NodeStatus objects at the end, with the collector paused."""

    status: str
    seconds: float = 0.0
    error: str | None = None


_SKIPPED, _CACHED = NodeStatus(SKIPPED), NodeStatus(CACHED)


class _TypeNames:
    """Node id -> type name, read from the graph when asked (a run does not copy it)."""

    def __init__(self, graph: Graph):
        self._nodes = graph.nodes

    def get(self, node_id: str, default: str | None = None) -> str | None:
        node = self._nodes.get(node_id)
        return node.definition.type_name if node is not None else default

    def __getitem__(self, node_id: str) -> str:
        return self._nodes[node_id].definition.type_name


@dataclass
class RunResult:
    """What a run did: per-node status and seconds, output values, files written, manifest facts, warnings."""

    nodes: dict[str, NodeStatus] = field(default_factory=dict)
    outputs: dict[str, dict[str, Any]] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)
    node_types: Any = field(default_factory=dict)  # node id -> type name
    seconds: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    interrupted: bool = False

    @property
    def status(self) -> dict[str, str]:
        return {node_id: s.status for node_id, s in self.nodes.items()}

    def ran(self) -> set[str]:
        return {node_id for node_id, s in self.nodes.items() if s.status == RAN}

    @property
    def ok(self) -> bool:
        """Every needed node ran or came from a cache, and nobody asked the run to stop."""
        return not self.interrupted and all(s.status in (RAN, CACHED, SKIPPED) for s in self.nodes.values())

    def to_dict(self) -> dict:
        return {
            "ok": self.ok,
            "seconds": round(self.seconds, 4),
            "nodes": {
                node_id: {"type": self.node_types.get(node_id), "status": s.status, "seconds": round(s.seconds, 4),
                          **({"error": s.error} if s.error else {})}
                for node_id, s in self.nodes.items()
            },
            "files": [str(f) for f in self.files],
            "info": self.info,
            "warnings": list(self.warnings),
        }


@dataclass
class _KeyPlan:
    """The cache keys of a graph's needed nodes for one device, dtype and output folder: the same for every
    run, so they are made once and kept in ``graph.memo``, as long as the files they hash are unchanged.
    ``volatile`` nodes (never cached, params drawn at random, and every node after them) get new keys each run."""

    order: list[str]
    keys: dict[str, str]
    identities: dict[str, dict[str, tuple]]  # node id -> param -> identity of the file when it was hashed
    files: dict[str, dict[str, str]]  # node id -> param -> content fingerprint
    salt: str
    out_salt: str  # output nodes write into the run's folder: another folder is other work
    volatile: list[str]
    repeated: set[str] = field(default_factory=set)

    def key(self, node: GraphNode, canonical: str, keys: dict[str, str]) -> str:
        definition = node.definition
        links = [(name, keys[src], output) for name, (src, output) in node.links.items()]
        return node_key(definition.type_name, definition.version, definition.code, canonical, links,
                        self.out_salt if definition.output else self.salt, self.files.get(node.node_id, {}))

    def files_unchanged(self, graph: Graph) -> bool:
        for node_id, files in self.identities.items():
            for name, before in files.items():
                try:
                    node = graph.nodes[node_id]
                    if identity({**node.paths, **node.implied}[name]) != before:
                        return False
                except OSError:
                    return False
        return True


@dataclass
class _Plan:
    order: list[str]
    keys: dict[str, str]
    params: dict[str, dict]  # node id -> params of this run, where they differ from the graph's ("random")
    identities: dict[str, dict[str, tuple]]
    repeated: set[str]  # keys of more than one node: the later ones are served what the first made


KEY_PLANS_KEPT = 4  # per graph: a few device / dtype / output folder combinations


def execute(graph: Graph, config: RunConfig, memory: MemoryCache, disk: DiskCache | None = None,
            facts: Facts | None = None) -> RunResult:
    """Run ``graph`` with ``config``; raises NodeFailed or Interrupted carrying the partial result."""
    run = _Run(graph, config, memory, disk, facts or Facts(disk))
    start = time.perf_counter()
    try:
        with limits_in_force(config.limits):
            run.plan()
            run.run_nodes()
    finally:
        run.result.seconds = time.perf_counter() - start
        # dependency order; cut-off nodes are "skipped", nodes a failure kept from running are left out
        with gc_paused():
            order = _needed_in_order(graph)
            if len(run.statuses) == len(run.to_run) == len(order):  # every needed node ran: already in order
                nodes = run.statuses
                for node_id, status in nodes.items():
                    if type(status) is tuple:  # plain tuples during the loop (see NodeStatus)
                        nodes[node_id] = NodeStatus._make(status)
            else:
                nodes = dict.fromkeys(order, _SKIPPED)  # in C: a cached rerun loops over nothing
                nodes.update(run.statuses)
                for node_id in run.to_run:  # only these have plain-tuple statuses
                    status = run.statuses.get(node_id)
                    if status is None:
                        del nodes[node_id]
                    elif type(status) is tuple:
                        nodes[node_id] = NodeStatus._make(status)
            run.result.nodes = nodes
    return run.result


class _Run:
    """The state of one run: what it planned, the values it holds, what it did."""

    def __init__(self, graph: Graph, config: RunConfig, memory: MemoryCache, disk: DiskCache | None, facts: Facts):
        self.graph, self.config, self.memory, self.disk, self.facts = graph, config, memory, disk, facts
        self.record = RunRecord()
        self.result = RunResult(node_types=_TypeNames(graph), files=self.record.files, info=self.record.info,
                                warnings=self.record.warnings)
        self.statuses: dict[str, NodeStatus] = {}
        self.to_run: set[str] = set()
        self.values: dict[str, dict] = {}
        self.uses: dict[str, int] = {}
        self.tainted: set[str] = set()  # made from a file that changed while the run read it: not cached
        self.keep = set(graph.outputs)

    def warn(self, text: str) -> None:
        """The engine's own warnings: in the result, and as Python warnings."""
        self.record.warnings.append(text)
        warnings.warn(text, UserWarning, stacklevel=3)

    def plan(self) -> None:
        with gc_paused():
            self.keys = _plan_keys(self.graph, self.config, self.record)
            self.values = _plan(self.graph, self.keys, self.memory, self.disk, self.config, self.statuses, self.to_run)
            if self.facts.memory or self.facts.disk is not None:
                for node_id in self.keys.order:  # what the cached and cut-off nodes recorded when they ran
                    if node_id not in self.to_run and (known := self.facts.get(self.keys.keys[node_id])):
                        RunContext(self.config, self.record, node_id).replay(known)
            self.uses = _uses(self.graph, self.keys.order, self.to_run)
        if self.config.events is not None:
            self.config.events("cached", None, [n for n in self.keys.order if n not in self.to_run])

    def run_nodes(self) -> None:
        try:
            with gc_frozen():
                everything = len(self.to_run) == len(self.keys.order)  # then no lookup per node
                for node_id in self.keys.order:
                    if everything or node_id in self.to_run:
                        self.run_one(node_id)
                _check_interrupt(self.config, None, self.graph)  # a stop during the last node is still a stop
        except Interrupted as exc:
            self.result.interrupted = True
            exc.result = self.result
            raise
        self.result.outputs = {n: self.values[n] for n in self.graph.outputs if n in self.values}

    def run_one(self, node_id: str) -> None:
        """Run one node (or take what an identical node made earlier in this run), cache what it made, and
        let go of the values nothing later needs."""
        _check_interrupt(self.config, node_id, self.graph)
        events, written = self.config.events, len(self.record.files)
        if events is not None:
            events("start", node_id, None)
        node, plan = self.graph.nodes[node_id], self.keys
        key = plan.keys[node_id]
        cacheable = node.definition.cacheable
        twin = self.memory.get(key) if cacheable and key in plan.repeated else None
        if twin is not None:  # an identical node (same key) already ran earlier in this run
            self.values[node_id] = twin
            self.statuses[node_id] = _CACHED
            if known := self.facts.get(key):
                RunContext(self.config, self.record, node_id).replay(known)
        else:
            params = plan.params.get(node_id, node.params)
            raised = getattr(self.config.interrupt, "raised", 0)
            try:
                self.values[node_id] = outputs = _run_node(node, params, self.values, self.config, self.record,
                                                           self.statuses, self.result)
            except NodeFailed as exc:
                if isinstance(exc.__cause__, InputChanged):  # the changed values must not be served again
                    for name in exc.__cause__.names:
                        if name in node.links:
                            self.memory.discard(plan.keys[node.links[name][0]])
                raise
            if _changed_while_read(node, plan, self.tainted, self.warn):
                self.tainted.add(node_id)
            own = self.record.recorded.pop(node_id, None)
            # A Ctrl-C raised into the node and caught there (as some libraries' loops do) may have cut its
            # work short: what it made is not cached. A stop it merely outlived leaves finished work, kept.
            if cacheable and node_id not in self.tainted and getattr(self.config.interrupt, "raised", 0) == raised:
                if own:
                    self.facts.put(key, own, self.warn)
                self.memory.put(key, outputs)
                if self.disk is not None and not node.definition.output:
                    self.disk.put(key, outputs, self.warn)
        for src in _sources(node):
            left = self.uses[src] = self.uses[src] - 1
            if left == 0 and src not in self.keep:
                self.values.pop(src, None)  # nothing later needs it: free it now
        if events is not None:
            events("done", node_id, self.record.files[written:])


def _check_interrupt(config: RunConfig, node_id: str | None, graph: Graph) -> None:
    if config.interrupt.is_set():
        where = f" before node '{node_id}' ({graph.nodes[node_id].definition.type_name})" if node_id else ""
        raise Interrupted(f"interrupted{where}")


def _needed_in_order(graph: Graph) -> list[str]:
    """The output nodes and their ancestors, in dependency order (worked out once per graph)."""
    order = graph.memo.get("needed")
    if order is not None:
        return order
    needed = set(graph.outputs)
    stack = list(graph.outputs)
    while stack:
        for src, _ in graph.nodes[stack.pop()].links.values():
            if src not in needed:
                needed.add(src)
                stack.append(src)
    order = graph.order if len(needed) == len(graph.order) else [n for n in graph.order if n in needed]
    graph.memo["needed"] = order
    return order


def _plan_keys(graph: Graph, config: RunConfig, record: RunRecord) -> _Plan:
    salt = run_salt(config.device, config.dtype)
    memo_key = ("keys", salt, str(Path(config.out_dir).resolve()))
    key_plan = graph.memo.get(memo_key)
    if key_plan is None or not key_plan.files_unchanged(graph):
        key_plan = _key_plan(graph, salt, output_salt(salt, config.out_dir))
        kept = [k for k in graph.memo if isinstance(k, tuple) and k[0] == "keys"]
        for old in kept[:max(0, len(kept) - KEY_PLANS_KEPT + 1)]:
            graph.memo.pop(old, None)
        graph.memo[memo_key] = key_plan
    keys, params = key_plan.keys, {}
    if key_plan.volatile:
        keys = dict(keys)
        draws: dict[tuple, int] = {}  # one draw per place "random" is written (shared by a group's repetitions)
        for node_id in key_plan.volatile:
            node = graph.nodes[node_id]
            if not node.definition.cacheable:
                keys[node_id] = uuid.uuid4().hex  # fresh every run, so everything after it reruns too
                continue
            canonical = node.canonical
            if node.randomized:
                drawn = {name: draws.setdefault(param_owner(graph.workflow, graph.origins.get(node_id), node_id, name),
                                                secrets.randbelow(2**63)) for name in node.randomized}
                params[node_id] = {**node.params, **drawn}
                canonical = canonical_params({**_canonical_values(node), **drawn})
                record.drawn[node_id] = drawn
                RunContext(config, record, node_id).record(RANDOM_SEEDS, drawn)
            keys[node_id] = key_plan.key(node, canonical, keys)
    repeated = key_plan.repeated if not key_plan.volatile else _repeated(keys.values())
    return _Plan(key_plan.order, keys, params, key_plan.identities, repeated)


def stable_keys(graph: Graph, device: Any, dtype: Any) -> dict[str, str]:
    """The cache keys a run on ``device`` / ``dtype`` gives the graph's needed nodes, except output nodes and
    volatile ones (never cached, params drawn at random, or after such a node), whose keys change per run."""
    plan = _key_plan(graph, run_salt(device, dtype), "")
    return {node_id: key for node_id, key in plan.keys.items() if not graph.nodes[node_id].definition.output}


def _repeated(keys) -> set[str]:
    seen: set[str] = set()
    return {key for key in keys if key in seen or seen.add(key)}


def _key_plan(graph: Graph, salt: str, out_salt: str) -> _KeyPlan:
    order = _needed_in_order(graph)
    plan = _KeyPlan(order, {}, {}, {}, salt, out_salt, [])
    moving: set[str] = set()
    for node_id in order:
        node = graph.nodes[node_id]
        if node.paths:
            read = {**node.paths, **node.implied}
            try:
                plan.identities[node_id] = {name: identity(path) for name, path in read.items()
                                            if Path(path).exists()}
                plan.files[node_id] = {name: path_fingerprint(path) for name, path in read.items()}
            except OSError as exc:  # gone, or swapped for a FIFO or a device, since validation
                raise WorkflowInvalid([Issue("bad_file", f"cannot be read any more: {exc}", node_id=node_id,
                                             node_type=node.definition.type_name,
                                             field=next(iter(node.paths)), kind="param")]) from None
        if (not node.definition.cacheable or node.randomized
                or any(src in moving for src, _ in node.links.values())):
            moving.add(node_id)
            plan.volatile.append(node_id)
        else:
            plan.keys[node_id] = plan.key(node, node.canonical, plan.keys)
    plan.repeated = _repeated(plan.keys.values())
    return plan


def _canonical_values(node: GraphNode) -> dict:
    """A node's literal params with defaults filled in, as in its canonical text."""
    values = {name: spec.default for name, spec in node.definition.inputs.items()
              if not spec.is_socket and name not in node.links}
    values.update(node.params)
    return values


def _changed_while_read(node: GraphNode, plan: _Plan, tainted: set[str], warn) -> bool:
    """Whether a file the node read changed after it was hashed (its result must not be cached under the
    old content's key), or the node used such a result."""
    if tainted and any(src in tainted for src, _ in node.links.values()):
        return True
    if not node.paths:
        return False
    read = {**node.paths, **node.implied}
    for name, before in plan.identities.get(node.node_id, {}).items():
        try:
            now = identity(read[name])
        except OSError:
            now = None
        if now != before:
            warn(f"node '{node.node_id}' ({node.definition.type_name}): '{read[name]}' changed while the run read "
                 "it; results made from it are not cached")
            return True
    return False


def _plan(graph: Graph, plan: _Plan, memory, disk, config: RunConfig, statuses: dict, to_run: set[str]):
    """Decide, from the outputs backwards, what comes from a cache and what must run (``to_run``; the rest is
    skipped); returns the cached values."""
    values: dict[str, dict] = {}
    stack = list(reversed(graph.outputs))
    seen = set(stack)
    while stack:
        node_id = stack.pop()
        node = graph.nodes[node_id]
        cached = None
        key = plan.keys[node_id]
        if node.definition.cacheable:
            cached = memory.get(key)
            if cached is None and disk is not None and not node.definition.output:
                cached = disk.get(key, config.device)
                if cached is not None:
                    memory.put(key, cached)
        if cached is not None:
            values[node_id] = cached
            statuses[node_id] = _CACHED
            continue
        to_run.add(node_id)
        for src, _ in node.links.values():
            if src not in seen:
                seen.add(src)
                stack.append(src)
    return values


def _uses(graph: Graph, order: list[str], to_run: set[str]) -> dict[str, int]:
    """How many nodes that will run read each node's outputs (for a run of every needed node, counted once
    per graph)."""
    everything = len(to_run) == len(order)
    if everything and "uses" in graph.memo:
        return dict(graph.memo["uses"])
    uses: dict[str, int] = {}
    for node_id in order:
        if everything or node_id in to_run:
            for src in _sources(graph.nodes[node_id]):
                uses[src] = uses.get(src, 0) + 1
    if everything:
        graph.memo["uses"] = dict(uses)
    return uses


def _sources(node: GraphNode) -> tuple[str, ...] | set[str]:
    """The nodes a node reads from, each once."""
    links = node.links
    if len(links) == 1:
        return (next(iter(links.values()))[0],)
    return {src for src, _ in links.values()}


def _run_node(node: GraphNode, params: dict, values: dict[str, dict], config: RunConfig, record: RunRecord,
              statuses: dict, result: RunResult) -> dict[str, Any]:
    definition = node.definition
    started = time.perf_counter()
    try:
        kwargs = dict(params)
        for name, (src, output) in node.links.items():
            value = values[src][output]
            if not definition.inputs[name].is_socket:
                value = _check_linked_param(node, name, value)
            kwargs[name] = value
        ctx = RunContext(config, record, node.node_id, definition.type_name) if definition.ctx_arg else None
        outputs = definition.call(kwargs, ctx)
    except Interrupted:
        statuses[node.node_id] = (INTERRUPTED, time.perf_counter() - started, None)
        raise
    except KeyboardInterrupt:
        statuses[node.node_id] = (INTERRUPTED, time.perf_counter() - started, None)
        raise Interrupted(f"interrupted in node '{node.node_id}' ({definition.type_name})", result) from None
    except BaseException as exc:  # any failure of a node, sys.exit() included, is reported with its id and type
        failure = NodeFailed(node.node_id, definition.type_name, exc, result)
        statuses[node.node_id] = (FAILED, time.perf_counter() - started, str(failure))
        raise failure from exc
    statuses[node.node_id] = (RAN, time.perf_counter() - started, None)  # plain: see NodeStatus
    return outputs


def _check_linked_param(node: GraphNode, name: str, value: Any) -> Any:
    spec = node.definition.inputs[name]
    if spec.randomizable and value == "random":
        raise NodeError(f"param '{name}' = 'random' (linked): \"random\" is drawn only where it is written as a "
                        "literal; give it in this node's params, or link a number")
    try:
        value = spec.validate(value)
    except (ValidationError, TypeError, ValueError) as exc:
        if isinstance(exc, ValidationError):
            reason = "; ".join(e["msg"] for e in exc.errors())
        else:
            reason = str(exc) if isinstance(exc, ParamProblem) else f"{type(exc).__name__}: {exc}"
        from .errors import short_repr

        raise NodeError(f"param '{name}' = {short_repr(value)} (linked): {reason}") from None
    return value
