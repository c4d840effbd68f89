"""The table of node types a run can use: built-ins, entry-point plugins, plugin folders."""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field, replace

from .errors import PluginError
from .keys import code_fingerprint
from .definitions import DEFINED, NodeDef

BUILTIN_PACKAGE = "nodegraph.nodes"


@dataclass
class Registry:
    """Node types by name, where each came from, and what went wrong loading plugins."""

    types: dict[str, NodeDef] = field(default_factory=dict)
    clashes: dict[str, list[str]] = field(default_factory=dict)
    problems: list[PluginError] = field(default_factory=list)
    loaded_modules: set[str] = field(default_factory=set)

    def __contains__(self, type_name: str) -> bool:
        return type_name in self.types

    def get(self, type_name: str) -> NodeDef | None:
        return self.types.get(type_name)

    def add(self, definition: NodeDef, origin: str | None = None) -> None:
        """Register a node type; a second origin for the same name is recorded as a clash."""
        definition = replace(definition, origin=origin or definition.origin,
                             code=definition.code or code_fingerprint(definition.fn.__module__))
        existing = self.types.get(definition.type_name)
        if existing is not None and existing.fn is not definition.fn:
            origins = self.clashes.setdefault(definition.type_name, [existing.origin])
            origins.append(definition.origin)
            self.problems.append(
                PluginError(
                    f"node type '{definition.type_name}' is registered twice: by {existing.origin} and by "
                    f"{definition.origin}; rename one of them (the second was not loaded)"
                )
            )
            return
        self.types[definition.type_name] = definition

    def add_module(self, module_name: str, origin: str) -> None:
        """Import a module (or package) and register every node defined in it or below it."""
        importlib.import_module(module_name)
        prefix = module_name + "."
        for defined_in, definitions in list(DEFINED.items()):
            if defined_in == module_name or defined_in.startswith(prefix):
                if defined_in in self.loaded_modules:
                    continue
                self.loaded_modules.add(defined_in)
                for definition in definitions:
                    self.add(definition, origin)

    def load_builtins(self) -> None:
        """Every module of the built-in node library (`nodes/`)."""
        package = importlib.import_module(BUILTIN_PACKAGE)
        for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda i: i.name):
            if not info.name.startswith("_"):
                self.add_module(f"{BUILTIN_PACKAGE}.{info.name}", "builtin")

    def sorted_types(self) -> list[NodeDef]:
        return sorted(self.types.values(), key=lambda d: (d.category, d.type_name))
