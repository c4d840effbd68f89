import os
import sys
from pathlib import Path

import pytest

# The disk cache is on by default in the user's cache folder; tests (and the CLI processes they start)
# use it only where they name a folder, so results never leak from one test or test run into another.
os.environ["NODEGRAPH_CACHE_DIR"] = "off"
# Likewise no models roots but those a test names: not the user's model_paths.yaml, not $NODEGRAPH_MODELS.
os.environ["NODEGRAPH_MODEL_PATHS"] = "off"
os.environ.pop("NODEGRAPH_MODELS", None)

REPO = Path(__file__).resolve().parent.parent
STUB_PLUGINS = REPO / "tests" / "stub_plugins"


def stub_module():
    """The loaded stub plugin module (its name carries a hash of its path)."""
    return next(m for name, m in sys.modules.items() if name.startswith("nodegraph_plugins.stub_nodes_"))


@pytest.fixture
def stub_registry():
    """The built-in nodes plus the stub nodes, with call counters reset."""
    from nodegraph.plugins import load_plugin_dirs
    from nodegraph.registry import Registry

    registry = Registry()
    registry.load_builtins()
    load_plugin_dirs(registry, [STUB_PLUGINS])
    assert not registry.problems, registry.problems
    stubs = stub_module()
    stubs.CALLS.clear()
    stubs.SUNK.clear()
    return registry


@pytest.fixture
def calls(stub_registry):
    return stub_module().CALLS


# Tiny randomly initialised checkpoints, built offline once per test session.

@pytest.fixture(scope="session")
def tiny():
    from tests.tiny_models import build_tiny_models

    return build_tiny_models()


@pytest.fixture(scope="session")
def sd(tiny):
    from nodegraph.nodes.models import inspect_checkpoint, load_checkpoint

    return load_checkpoint(inspect_checkpoint(str(tiny.sd15)))


@pytest.fixture(scope="session")
def sd_inpaint(tiny):
    from nodegraph.nodes.models import inspect_checkpoint, load_checkpoint

    return load_checkpoint(inspect_checkpoint(str(tiny.sd15_inpaint)))


@pytest.fixture(scope="session")
def tiny_xl():
    from tests.tiny_sdxl import build_tiny_sdxl_set

    return build_tiny_sdxl_set()


@pytest.fixture(scope="session")
def xl(tiny_xl):
    from nodegraph.nodes.models import inspect_checkpoint, load_checkpoint

    return load_checkpoint(inspect_checkpoint(str(tiny_xl.base)))


@pytest.fixture(scope="session")
def xl_inpaint(tiny_xl):
    from nodegraph.nodes.models import inspect_checkpoint, load_checkpoint

    return load_checkpoint(inspect_checkpoint(str(tiny_xl.inpaint)))


@pytest.fixture(scope="session")
def refiner(tiny_xl):
    from nodegraph.nodes.models import inspect_checkpoint, load_checkpoint

    return load_checkpoint(inspect_checkpoint(str(tiny_xl.refiner)))


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray cluster of 2 CPUs for one test module (the Ray tests skip where ray is not installed)."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()
