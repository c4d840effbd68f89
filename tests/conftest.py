import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
STUB_PLUGINS = REPO / "tests" / "stub_plugins"


@pytest.fixture
def stub_registry():
    """The built-in nodes plus the stub nodes, with call counters reset."""
    from nodegraph.plugins import load_plugin_dirs
    from nodegraph.registry import Registry

    registry = Registry()
    registry.load_builtins()
    load_plugin_dirs(registry, [STUB_PLUGINS])
    assert not registry.problems, registry.problems
    stubs = sys.modules["nodegraph_plugins.stub_nodes"]
    stubs.CALLS.clear()
    stubs.SUNK.clear()
    return registry


@pytest.fixture
def calls(stub_registry):
    return sys.modules["nodegraph_plugins.stub_nodes"].CALLS
