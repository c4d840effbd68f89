"""Runs a validated graph: only what the outputs need, each node at most once,
with results from the memory or disk cache wherever the cache key matches.

Planning walks the needed nodes backwards: a node whose key is cached is served
from the cache and its ancestors are not needed at all ("skipped"); otherwise it
runs and its inputs become needed. Everything is iterative, so a chain of any
length works, and the cost per node is constant.
"""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from .cache import DiskCache, MemoryCache
from .context import RunContext
from .errors import Interrupted, NodeError, NodeFailed
from .gcpause import gc_paused, gc_resumed
from .keys import library_versions, node_key, path_fingerprint
from .validate import Graph, GraphNode

RAN, CACHED, SKIPPED, FAILED, INTERRUPTED = "ran", "cached", "skipped", "failed", "interrupted"


@dataclass
class NodeStatus:
    status: str
    seconds: float = 0.0
    error: str | None = None


@dataclass
class RunResult:
    """What a run did: per-node status and seconds, output values and files written."""

    nodes: dict[str, NodeStatus] = field(default_factory=dict)
    outputs: dict[str, dict[str, Any]] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)
    node_types: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def status(self) -> dict[str, str]:
        return {node_id: s.status for node_id, s in self.nodes.items()}

    def ran(self) -> set[str]:
        return {node_id for node_id, s in self.nodes.items() if s.status == RAN}

    def to_dict(self) -> dict:
        return {
            "ok": all(s.status in (RAN, CACHED, SKIPPED) for s in self.nodes.values()),
            "seconds": round(self.seconds, 4),
            "nodes": {
                node_id: {"type": self.node_types.get(node_id), "status": s.status, "seconds": round(s.seconds, 4),
                          **({"error": s.error} if s.error else {})}
                for node_id, s in self.nodes.items()
            },
            "files": [str(f) for f in self.files],
        }


class Facts:
    """Manifest facts (seeds, model ids) recorded by nodes, by cache key, so that results
    served from a cache, and the ancestors they cut off, still report them."""

    def __init__(self, disk: DiskCache | None = None):
        self.disk = disk
        self.memory: dict[str, dict] = {}

    def get(self, key: str) -> dict | None:
        facts = self.memory.get(key)
        if facts is None and self.disk is not None:
            facts = self.disk.get_facts(key)
        return facts

    def put(self, key: str, facts: dict) -> None:
        self.memory[key] = facts
        if self.disk is not None:
            self.disk.put_facts(key, facts)


def execute(graph: Graph, ctx: RunContext, memory: MemoryCache, disk: DiskCache | None = None,
            facts: Facts | None = None) -> RunResult:
    with gc_paused():
        return _execute(graph, ctx, memory, disk, facts or Facts(disk))


def _execute(graph: Graph, ctx: RunContext, memory: MemoryCache, disk: DiskCache | None, facts: Facts) -> RunResult:
    start = time.perf_counter()
    result = RunResult(node_types={i: n.definition.type_name for i, n in graph.nodes.items()})
    order = _needed_in_order(graph)
    keys = _keys(graph, order, ctx)
    values, to_run = _plan(graph, order, keys, memory, disk, ctx, result)
    if facts.memory or facts.disk is not None:
        for node_id in order:  # what the cached and cut-off nodes recorded when they ran
            if node_id not in to_run and (known := facts.get(keys[node_id])):
                ctx.node_id = node_id
                ctx.replay(known)
    ctx.files = result.files
    try:
        for node_id in order:
            if node_id not in to_run:
                continue
            ctx.check_interrupt()
            node = graph.nodes[node_id]
            twin = memory.get(keys[node_id]) if node.definition.cacheable else None
            if twin is not None:  # an identical node (same key) already ran earlier in this run
                values[node_id] = twin
                result.nodes[node_id] = NodeStatus(CACHED)
                if known := facts.get(keys[node_id]):
                    ctx.replay(known)
                continue
            outputs = _run_node(node, values, ctx, result)
            values[node_id] = outputs
            own = ctx.recorded.pop(node_id, None)
            if own and node.definition.cacheable:
                facts.put(keys[node_id], own)
            if node.definition.cacheable:
                memory.put(keys[node_id], outputs)
                if disk is not None and not node.definition.output:
                    disk.put(keys[node_id], outputs)
    except Interrupted as exc:
        exc.result = result
        raise
    finally:
        result.seconds = time.perf_counter() - start
        result.nodes = {n: result.nodes[n] for n in order if n in result.nodes}  # dependency order
    result.outputs = {node_id: values[node_id] for node_id in graph.outputs if node_id in values}
    return result


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


def _keys(graph: Graph, order: list[str], ctx: RunContext) -> dict[str, str]:
    salt = f"{ctx.device}|{ctx.dtype}|{library_versions()}"
    keys: dict[str, str] = {}
    for node_id in order:
        node = graph.nodes[node_id]
        definition = node.definition
        if not definition.cacheable:
            keys[node_id] = uuid.uuid4().hex  # fresh every run, so everything after it reruns too
            continue
        files = {name: path_fingerprint(path) for name, path in node.paths.items()}
        # Output nodes write into the run's folder: the same node into another folder is other work.
        run_salt = f"{salt}|{ctx.out_dir.resolve()}" if definition.output else salt
        keys[node_id] = node_key(node, {src: keys[src] for src, _ in node.links.values()}, run_salt, files)
    return keys


def _plan(graph, order, keys, memory, disk, ctx, result) -> tuple[dict[str, dict], set[str]]:
    """Decide, from the outputs backwards, what comes from a cache and what must run."""
    demanded = set(graph.outputs)
    values: dict[str, dict] = {}
    to_run: set[str] = set()
    for node_id in reversed(order):
        node = graph.nodes[node_id]
        if node_id not in demanded:
            result.nodes[node_id] = NodeStatus(SKIPPED)
            continue
        cached = None
        if node.definition.cacheable:
            cached = memory.get(keys[node_id])
            if cached is None and disk is not None and not node.definition.output:
                cached = disk.get(keys[node_id], ctx.device)
                if cached is not None:
                    memory.put(keys[node_id], cached)
        if cached is not None:
            values[node_id] = cached
            result.nodes[node_id] = NodeStatus(CACHED)
        else:
            to_run.add(node_id)
            demanded.update(src for src, _ in node.links.values())
    return values, to_run


def _run_node(node: GraphNode, values: dict[str, dict], ctx: RunContext, result: RunResult) -> dict[str, Any]:
    definition = node.definition
    ctx.node_id, ctx.node_type = node.node_id, definition.type_name
    started = time.perf_counter()
    try:
        kwargs = dict(node.params)
        for name, (src, output) in node.links.items():
            value = values[src][output]
            spec = definition.inputs[name]
            if not spec.is_socket:
                value = _check_linked_param(node, name, value)
            kwargs[name] = value
        with gc_resumed():
            outputs = definition.call(kwargs, ctx)
    except Interrupted:
        result.nodes[node.node_id] = NodeStatus(INTERRUPTED, time.perf_counter() - started)
        raise
    except KeyboardInterrupt:
        result.nodes[node.node_id] = NodeStatus(INTERRUPTED, time.perf_counter() - started)
        raise Interrupted(f"interrupted in node '{node.node_id}' ({definition.type_name})", result) from None
    except Exception as exc:  # a node's failure of any kind is reported with its id and type
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
        reason = "; ".join(e["msg"] for e in exc.errors()) if isinstance(exc, ValidationError) else str(exc)
        raise NodeError(f"param '{name}' = {value!r} (linked): {reason}") from None
    return value
