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


def test_every_builtin_node_is_documented():
    registry = Registry()
    registry.load_builtins()
    for definition in registry.types.values():
        assert len(definition.doc.splitlines()) >= 1 and definition.description, definition.type_name
        for spec in definition.inputs.values():
            assert spec.name.isidentifier()
