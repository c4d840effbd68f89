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
from typing import Any

from pydantic import ValidationError

from .cache import DiskCache, Facts, MemoryCache
from .context import RunConfig, RunContext, RunRecord
from .errors import Interrupted, NodeError, NodeFailed
from .files import identity, path_fingerprint
from .gcpause import gc_paused, gc_resumed
from .keys import canonical_params, node_key, output_salt, run_salt
from .limits import limits_in_force
from .definitions import ParamProblem
from .validate import Graph, GraphNode

RAN, CACHED, SKIPPED, FAILED, INTERRUPTED = "ran", "cached", "skipped", "failed", "interrupted"
RANDOM_SEEDS = "random"  # manifest section for params drawn at random


@dataclass
class NodeStatus:
    status: str
    seconds: float = 0.0
    error: str | None = None


@dataclass
class RunResult:
    """What a run did: per-node status and seconds, output values, files written, manifest facts, warnings."""

    nodes: dict[str, NodeStatus] = field(default_factory=dict)
    outputs: dict[str, dict[str, Any]] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)
    node_types: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    @property
    def status(self) -> dict[str, str]:
        return {node_id: s.status for node_id, s in self.nodes.items()}

    def ran(self) -> set[str]:
        return {node_id for node_id, s in self.nodes.items() if s.status == RAN}

    @property
    def ok(self) -> bool:
        return all(s.status in (RAN, CACHED, SKIPPED) for s in self.nodes.values())

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
class _Plan:
    order: list[str]
    keys: dict[str, str]
    params: dict[str, dict]  # node id -> params of this run, where they differ from the graph's ("random")
    identities: dict[str, dict[str, tuple]]  # node id -> param -> identity of the file when it was hashed


def execute(graph: Graph, config: RunConfig, memory: MemoryCache, disk: DiskCache | None = None,
            facts: Facts | None = None) -> RunResult:
    """Run ``graph`` with ``config``; raises NodeFailed or Interrupted carrying the partial result."""
    facts = facts or Facts(disk)
    record = RunRecord()
    result = RunResult(node_types={i: n.definition.type_name for i, n in graph.nodes.items()},
                       files=record.files, info=record.info, warnings=record.warnings)
    start = time.perf_counter()
    try:
        with limits_in_force(config.limits):
            _execute(graph, config, record, result, memory, disk, facts)
    finally:
        result.seconds = time.perf_counter() - start
        order = {node_id: i for i, node_id in enumerate(graph.order)}
        result.nodes = dict(sorted(result.nodes.items(), key=lambda item: order.get(item[0], 0)))
    return result


def _execute(graph, config: RunConfig, record: RunRecord, result: RunResult, memory, disk, facts) -> None:
    with gc_paused():
        plan = _plan_keys(graph, config, record)
        values, to_run = _plan(graph, plan, memory, disk, config, result)
        if facts.memory or facts.disk is not None:
            for node_id in plan.order:  # what the cached and cut-off nodes recorded when they ran
                if node_id not in to_run and (known := facts.get(plan.keys[node_id])):
                    RunContext(config, record, node_id).replay(known)
        uses = _uses(graph, to_run)
    keep = set(graph.outputs)
    tainted: set[str] = set()
    try:
        for node_id in plan.order:
            if node_id not in to_run:
                continue
            _check_interrupt(config, node_id, graph)
            node = graph.nodes[node_id]
            key = plan.keys[node_id]
            cacheable = node.definition.cacheable
            twin = memory.get(key) if cacheable else None
            if twin is not None:  # an identical node (same key) already ran earlier in this run
                values[node_id] = twin
                result.nodes[node_id] = NodeStatus(CACHED)
                if known := facts.get(key):
                    RunContext(config, record, node_id).replay(known)
            else:
                params = plan.params.get(node_id, node.params)
                values[node_id] = outputs = _run_node(node, params, values, config, record, result)
                if _changed_while_read(node, plan, tainted):
                    tainted.add(node_id)
                own = record.recorded.pop(node_id, None)
                if cacheable and node_id not in tainted:
                    if own:
                        facts.put(key, own)
                    memory.put(key, outputs)
                    if disk is not None and not node.definition.output:
                        disk.put(key, outputs)
            for src in {src for src, _ in node.links.values()}:
                uses[src] -= 1
                if uses[src] == 0 and src not in keep:
                    values.pop(src, None)  # nothing later needs it: free it now
        _check_interrupt(config, None, graph)  # a stop asked for during the last node is still a stop
    except Interrupted as exc:
        exc.result = result
        raise
    result.outputs = {node_id: values[node_id] for node_id in graph.outputs if node_id in values}


def _check_interrupt(config: RunConfig, node_id: str | None, graph: Graph) -> None:
    if config.interrupt.is_set():
        where = f" before node '{node_id}' ({graph.nodes[node_id].definition.type_name})" if node_id else ""
        raise Interrupted(f"interrupted{where}")


def _needed_in_order(graph: Graph) -> list[str]:
    """The output nodes and their ancestors, in dependency order."""
    needed = set(graph.outputs)
    stack = list(graph.outputs)
    while stack:
        for src, _ in graph.nodes[stack.pop()].links.values():
            if src not in needed:
                needed.add(src)
                stack.append(src)
    if len(needed) == len(graph.order):
        return graph.order
    return [node_id for node_id in graph.order if node_id in needed]


def _plan_keys(graph: Graph, config: RunConfig, record: RunRecord) -> _Plan:
    order = _needed_in_order(graph)
    salt = run_salt(config.device, config.dtype)
    keys: dict[str, str] = {}
    params: dict[str, dict] = {}
    identities: dict[str, dict[str, tuple]] = {}
    for node_id in order:
        node = graph.nodes[node_id]
        definition = node.definition
        if not definition.cacheable:
            keys[node_id] = uuid.uuid4().hex  # fresh every run, so everything after it reruns too
            continue
        canonical = node.canonical
        if node.randomized:
            drawn = {name: secrets.randbelow(2**63) for name in node.randomized}
            params[node_id] = {**node.params, **drawn}
            canonical = canonical_params({**_canonical_values(node), **drawn})
            record.drawn[node_id] = drawn
            RunContext(config, record, node_id).record(RANDOM_SEEDS, drawn)
        files = {}
        if node.paths:
            identities[node_id] = {name: identity(path) for name, path in node.paths.items() if Path(path).exists()}
            files = {name: path_fingerprint(path) for name, path in node.paths.items()}
        node_salt = output_salt(salt, config.out_dir) if definition.output else salt
        links = [(name, keys[src], output) for name, (src, output) in node.links.items()]
        keys[node_id] = node_key(definition.type_name, definition.version, definition.code, canonical, links,
                                 node_salt, files)
    return _Plan(order, keys, params, identities)


def _canonical_values(node: GraphNode) -> dict:
    """A node's literal params with defaults filled in, as in its canonical text."""
    values = {name: spec.default for name, spec in node.definition.inputs.items()
              if not spec.is_socket and name not in node.links}
    values.update(node.params)
    return values


def _changed_while_read(node: GraphNode, plan: _Plan, tainted: set[str]) -> bool:
    """Whether a file the node read changed after it was hashed (its result must not be cached under the
    old content's key), or the node used such a result."""
    if any(src in tainted for src, _ in node.links.values()):
        return True
    for name, before in plan.identities.get(node.node_id, {}).items():
        try:
            now = identity(node.paths[name])
        except OSError:
            now = None
        if now != before:
            warnings.warn(f"node '{node.node_id}' ({node.definition.type_name}): '{node.paths[name]}' changed while "
                          "the run read it; results made from it are not cached", UserWarning, stacklevel=2)
            return True
    return False


def _plan(graph: Graph, plan: _Plan, memory, disk, config: RunConfig, result: RunResult):
    """Decide, from the outputs backwards, what comes from a cache and what must run."""
    demanded = set(graph.outputs)
    values: dict[str, dict] = {}
    to_run: set[str] = set()
    for node_id in reversed(plan.order):
        node = graph.nodes[node_id]
        if node_id not in demanded:
            result.nodes[node_id] = NodeStatus(SKIPPED)
            continue
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
            result.nodes[node_id] = NodeStatus(CACHED)
        else:
            to_run.add(node_id)
            demanded.update(src for src, _ in node.links.values())
    return values, to_run


def _uses(graph: Graph, to_run: set[str]) -> dict[str, int]:
    """How many nodes that will run read each node's outputs."""
    uses: dict[str, int] = {}
    for node_id in to_run:
        for src in {src for src, _ in graph.nodes[node_id].links.values()}:
            uses[src] = uses.get(src, 0) + 1
    return uses


def _run_node(node: GraphNode, params: dict, values: dict[str, dict], config: RunConfig, record: RunRecord,
              result: RunResult) -> dict[str, Any]:
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
        with gc_resumed():
            outputs = definition.call(kwargs, ctx)
    except Interrupted:
        result.nodes[node.node_id] = NodeStatus(INTERRUPTED, time.perf_counter() - started)
        raise
    except KeyboardInterrupt:
        result.nodes[node.node_id] = NodeStatus(INTERRUPTED, time.perf_counter() - started)
        raise Interrupted(f"interrupted in node '{node.node_id}' ({definition.type_name})", result) from None
    except BaseException as exc:  # any failure of a node, sys.exit() included, is reported with its id and type
        failure = NodeFailed(node.node_id, definition.type_name, exc, result)
        result.nodes[node.node_id] = NodeStatus(FAILED, time.perf_counter() - started, str(failure))
        raise failure from exc
    result.nodes[node.node_id] = NodeStatus(RAN, time.perf_counter() - started)
    return outputs


def _check_linked_param(node: GraphNode, name: str, value: Any) -> Any:
    spec = node.definition.inputs[name]
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
