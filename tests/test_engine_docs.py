"""docs/nodes.md is generated from the registry; it must match the nodes as they are."""

from pathlib import Path

from nodegraph.docs import nodes_markdown
from nodegraph.registry import Registry

REPO = Path(__file__).resolve().parent.parent


def test_node_reference_is_current():
    registry = Registry()
    registry.load_builtins()
    expected = nodes_markdown(registry)
    current = (REPO / "docs" / "nodes.md").read_text()
    assert current == expected, "docs/nodes.md is stale: run `nodegraph nodes --markdown > docs/nodes.md`"


def test_every_builtin_param_is_explained_and_every_node_names_its_reference():
    """The reference is read by people choosing values: each param has a description or is named in the
    node's docstring, and each node says which independent implementation it matches."""
    registry = Registry()
    registry.load_builtins()
    unexplained = [f"{d.type_name}.{s.name}" for d in registry.types.values() for s in d.inputs.values()
                   if not s.is_socket and not s.description and f"`{s.name}`" not in d.doc]
    assert unexplained == []
    assert [d.type_name for d in registry.types.values() if not d.reference] == []
