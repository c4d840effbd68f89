"""Node outputs to and from safetensors files, without pickle.

A value is flattened into tensors (stored in the safetensors body) and a JSON
description of its structure (stored in the file's metadata). Only tensors,
JSON scalars, lists, tuples, str-keyed dicts and dataclasses registered with
``@disk_cacheable`` are storable; anything else (a loaded model) stays in memory.
"""
from __future__ import annotations

from .lazy import lazy

import dataclasses
import json
from typing import Any

torch = lazy("torch")

_VALUE_TYPES: dict[str, type] = {}


class NotStorable(Exception):
    """The value holds something that cannot go to the disk cache."""


def disk_cacheable(cls: type) -> type:
    """Class decorator: let instances of this dataclass be stored in the disk cache."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"@disk_cacheable needs a dataclass, got {cls.__name__}")
    _VALUE_TYPES[f"{cls.__module__}.{cls.__qualname__}"] = cls
    return cls


def flatten(value: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    """Split a value into a JSON-able structure and its tensors."""
    tensors: dict[str, torch.Tensor] = {}
    # Explicit stack instead of recursion: values can nest arbitrarily deep.
    root: list[Any] = [None]
    stack: list[tuple[Any, list | dict, Any]] = [(value, root, 0)]
    while stack:
        item, parent, slot = stack.pop()
        if isinstance(item, torch.Tensor):
            name = str(len(tensors))
            tensors[name] = item.detach().contiguous()
            parent[slot] = {"$t": name}
        elif item is None or type(item) in (bool, int, float, str):  # exact types: an IntEnum would come back an int
            parent[slot] = item
        elif type(item) in (list, tuple):  # a NamedTuple would come back a plain tuple: kept in memory only
            items: list[Any] = [None] * len(item)
            parent[slot] = {"$l": items} if isinstance(item, list) else {"$tu": items}
            stack.extend((child, items, i) for i, child in enumerate(item))
        elif type(item) is dict and all(type(k) is str for k in item):
            fields: dict[str, Any] = {}
            parent[slot] = {"$d": fields}
            stack.extend((child, fields, key) for key, child in item.items())
        elif dataclasses.is_dataclass(item) and not isinstance(item, type):
            name = f"{type(item).__module__}.{type(item).__qualname__}"
            if _VALUE_TYPES.get(name) is not type(item):
                raise NotStorable(f"{name} is not @disk_cacheable")
            fields = {}
            parent[slot] = {"$c": name, "f": fields}
            stack.extend((getattr(item, f.name), fields, f.name) for f in dataclasses.fields(item))
        else:
            raise NotStorable(f"cannot store a {type(item).__name__}")
    return root[0], tensors


def unflatten(structure: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Rebuild a value from ``flatten``'s output."""

    def build(node: Any) -> Any:
        # Depth is bounded by the value's own nesting, which flatten produced.
        if not isinstance(node, dict):
            return node
        if "$t" in node:
            return tensors[node["$t"]]
        if "$l" in node:
            return [build(x) for x in node["$l"]]
        if "$tu" in node:
            return tuple(build(x) for x in node["$tu"])
        if "$d" in node:
            return {k: build(v) for k, v in node["$d"].items()}
        if "$c" in node:
            cls = _VALUE_TYPES.get(node["$c"])
            if cls is None:
                raise NotStorable(f"unknown stored type {node['$c']}")
            return cls(**{k: build(v) for k, v in node["f"].items()})
        raise NotStorable(f"malformed stored value: {sorted(node)}")

    return build(structure)


def to_metadata(structure: Any) -> dict[str, str]:
    return {"nodegraph": json.dumps(structure, separators=(",", ":"))}


def from_metadata(metadata: dict[str, str] | None) -> Any:
    if not metadata or "nodegraph" not in metadata:
        raise NotStorable("no nodegraph metadata in the file")
    return json.loads(metadata["nodegraph"])
