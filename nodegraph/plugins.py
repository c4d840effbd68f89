"""Plugin discovery: the `nodegraph.nodes` entry-point group and plugin folders.

A plugin that fails to import is recorded in ``registry.problems`` by name, with its
error, and every other plugin still loads.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
from importlib.metadata import entry_points
from pathlib import Path

from .errors import PluginError
from .registry import Registry

ENTRY_POINT_GROUP = "nodegraph.nodes"
PLUGIN_PATH_ENV = "NODEGRAPH_PLUGINS"


def plugin_dirs_from_env() -> list[str]:
    """Folders listed in $NODEGRAPH_PLUGINS (separated like PATH)."""
    value = os.environ.get(PLUGIN_PATH_ENV, "")
    return [part for part in value.split(os.pathsep) if part]


def load_entry_point_plugins(registry: Registry) -> None:
    """Each entry point names a module (imported; its @node functions register) or a
    callable taking the registry."""
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        origin = f"plugin '{ep.name}' ({ep.value}, distribution {ep.dist.name if ep.dist else '?'})"
        try:
            module_name, _, attr = ep.value.partition(":")
            if attr:
                hook = ep.load()
                registry.add_module(module_name, origin)
                if callable(hook):
                    hook(registry)
            else:
                registry.add_module(module_name, origin)
        except Exception as exc:  # any import-time failure of third-party code
            registry.problems.append(PluginError(f"{origin} failed to load: {type(exc).__name__}: {exc}"))


def load_plugin_dirs(registry: Registry, folders: list[str | Path]) -> None:
    """Every `*.py` file and package (folder with __init__.py) in each folder is a plugin."""
    for folder in folders:
        folder = Path(folder).expanduser()
        if not folder.is_dir():
            registry.problems.append(PluginError(f"plugin folder '{folder}' does not exist"))
            continue
        for path in sorted(folder.iterdir()):
            if path.name.startswith(("_", ".")):
                continue
            if path.suffix == ".py":
                _load_file_plugin(registry, path.stem, path, path)
            elif (path / "__init__.py").is_file():
                _load_file_plugin(registry, path.name, path / "__init__.py", path)


def _load_file_plugin(registry: Registry, name: str, init_file: Path, shown: Path) -> None:
    origin = f"plugin '{name}' ({shown})"
    # Two folders may both hold a util.py: the module name carries the path's hash.
    module_name = f"nodegraph_plugins.{name}_{hashlib.sha256(str(shown.resolve()).encode()).hexdigest()[:8]}"
    if module_name in sys.modules:  # the same folder loaded again into a new registry
        registry.add_module(module_name, origin)
        return
    locations = [str(init_file.parent)] if init_file.name == "__init__.py" else None
    spec = importlib.util.spec_from_file_location(module_name, init_file, submodule_search_locations=locations)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # a broken plugin must not stop the others
        sys.modules.pop(module_name, None)
        registry.problems.append(PluginError(f"{origin} failed to load: {type(exc).__name__}: {exc}"))
        return
    registry.add_module(module_name, origin)
