"""Plugin discovery: the `nodegraph.nodes` entry-point group and plugin folders.

A plugin that fails to import is recorded in ``registry.problems`` by name, with its
error, and every other plugin still loads.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import threading
from importlib.metadata import entry_points
from pathlib import Path

from .definitions import DEFINED
from .errors import PluginError
from .registry import Registry

ENTRY_POINT_GROUP = "nodegraph.nodes"
PLUGIN_PATH_ENV = "NODEGRAPH_PLUGINS"


def plugin_dirs_from_env() -> list[str]:
    """Folders listed in $NODEGRAPH_PLUGINS (separated like PATH)."""
    value = os.environ.get(PLUGIN_PATH_ENV, "")
    return [part for part in value.split(os.pathsep) if part]


def default_registry(plugin_dirs: list[str] | None = None, entry_points: bool = True) -> Registry:
    """Built-ins, installed entry-point plugins and the plugin folders given (and in $NODEGRAPH_PLUGINS)."""
    registry = Registry()
    registry.load_builtins()
    if entry_points:
        load_entry_point_plugins(registry)
    load_plugin_dirs(registry, [*plugin_dirs_from_env(), *(plugin_dirs or [])])
    return registry


def _failed(origin: str, exc: BaseException) -> PluginError:
    """A plugin that raised while loading. An Exception is a broken plugin (the others still load); sys.exit()
    or another BaseException means it tried to end the process, so nothing may run (``fatal``)."""
    if isinstance(exc, SystemExit):
        return PluginError(f"{origin} called sys.exit({exc.code!r}) while loading; fix or remove it", fatal=True)
    if not isinstance(exc, Exception):
        return PluginError(f"{origin} raised {type(exc).__name__} while loading; fix or remove it", fatal=True)
    return PluginError(f"{origin} failed to load: {type(exc).__name__}: {exc}")


def _forget(module_name: str) -> None:
    """Drop the nodes a failed import declared before it raised: Python forgets the module, and a later
    import of it (once it works) would otherwise find them as a second plugin of the same names."""
    if module_name in sys.modules:  # it imported; what failed came after (an entry point's hook)
        return
    prefix = module_name + "."
    for defined_in in [m for m in DEFINED if m == module_name or m.startswith(prefix)]:
        if defined_in not in sys.modules:
            del DEFINED[defined_in]


class PluginInterrupted(KeyboardInterrupt):
    """Ctrl-C (or a plugin raising KeyboardInterrupt) while a plugin was loading; names the plugin."""


_FOUND: dict[tuple, tuple] = {}


def _path_state() -> tuple:
    """sys.path with each folder's modification time: installing or removing a distribution in a folder changes it."""
    state = []
    for entry in sys.path:
        try:
            state.append((entry, os.stat(entry or ".").st_mtime_ns))
        except OSError:
            state.append((entry, None))
    return tuple(state)


def _group_entry_points() -> tuple:
    """The group's entry points, looked up again only when sys.path or a folder on it changed: the lookup reads
    every installed distribution's metadata, milliseconds that each new Engine would otherwise pay."""
    state = _path_state()
    if state not in _FOUND:
        _FOUND.clear()
        _FOUND[state] = tuple(entry_points(group=ENTRY_POINT_GROUP))
    return _FOUND[state]


def load_entry_point_plugins(registry: Registry) -> None:
    """Each entry point names a module (imported; its @node functions register) or a
    callable taking the registry."""
    for ep in _group_entry_points():
        origin = f"plugin '{ep.name}' ({ep.value}, distribution {ep.dist.name if ep.dist else '?'})"
        module_name, _, attr = ep.value.partition(":")
        try:
            if attr:
                hook = ep.load()
                registry.add_module(module_name, origin)
                if callable(hook):
                    hook(registry)
            else:
                registry.add_module(module_name, origin)
        except KeyboardInterrupt:
            _forget(module_name)
            raise PluginInterrupted(f"interrupted while loading {origin}") from None
        except BaseException as exc:  # any import-time failure of third-party code, sys.exit() included
            _forget(module_name)
            registry.problems.append(_failed(origin, exc))


def load_plugin_dirs(registry: Registry, folders: list[str | Path]) -> None:
    """Every `*.py` file and package (folder with __init__.py) in each folder is a plugin."""
    for folder in folders:
        if not str(folder):  # Path("") is ".": every script in the current folder would run as a plugin
            registry.problems.append(PluginError("an empty plugin folder name was given (a shell variable that is "
                                                 "not set?); no folder was searched for it"))
            continue
        folder = Path(folder).expanduser()
        try:
            is_folder = folder.is_dir()
        except OSError as exc:  # a name too long for the file system, say
            registry.problems.append(PluginError(f"plugin folder '{str(folder)[:80]}...' cannot be read: "
                                                 f"{exc.strerror or exc}"))
            continue
        if not is_folder:
            # a plugin file given in place of its folder is there: "does not exist" would send the user looking
            what = "is a file, not a folder; name the folder that holds it" if folder.exists() else "does not exist"
            registry.problems.append(PluginError(f"plugin folder '{folder}' {what}"))
            continue
        for path in sorted(folder.iterdir()):
            if path.name.startswith(("_", ".")):
                continue
            if path.suffix == ".py":
                _load_file_plugin(registry, path.stem, path, path)
            elif (path / "__init__.py").is_file():
                _load_file_plugin(registry, path.name, path / "__init__.py", path)


# A plugin file is run here, not by the import system, so nothing else keeps a second thread from taking the
# module from sys.modules while the first still runs it (and so from missing the nodes it has yet to declare).
_FILE_PLUGINS = threading.RLock()


def _load_file_plugin(registry: Registry, name: str, init_file: Path, shown: Path) -> None:
    with _FILE_PLUGINS:
        _load_file_plugin_locked(registry, name, init_file, shown)


def _load_file_plugin_locked(registry: Registry, name: str, init_file: Path, shown: Path) -> None:
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
    except KeyboardInterrupt:
        sys.modules.pop(module_name, None)
        _forget(module_name)
        raise PluginInterrupted(f"interrupted while loading {origin}") from None
    except BaseException as exc:  # a broken plugin must not stop the others
        sys.modules.pop(module_name, None)
        _forget(module_name)
        registry.problems.append(_failed(origin, exc))
        return
    registry.add_module(module_name, origin)
