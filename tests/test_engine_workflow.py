"""The workflow model: builder round trip, JSON Schema, workflows embedded in PNGs."""
import json
from pathlib import Path

import jsonschema
import pytest
from PIL import Image, PngImagePlugin

from nodegraph.api import Engine
from nodegraph.errors import WorkflowInvalid
from nodegraph.schema import workflow_schema
from nodegraph.workflow import WorkflowBuilder, load_workflow

REPO = Path(__file__).resolve().parent.parent


def test_builder_round_trip(tmp_path, stub_registry):
    b = WorkflowBuilder("two nodes")
    src = b.add("StubSource", id="src", value=2.0)
    b.add("StubSink", id="out", a=src["x"], title="keep it")
    path = b.save(tmp_path / "wf.json")
    data = json.loads(path.read_text())
    assert data == {"format": "nodegraph/1", "description": "two nodes", "nodes": {
        "src": {"type": "StubSource", "params": {"value": 2.0}},
        "out": {"type": "StubSink", "inputs": {"a": "src.x"}, "title": "keep it"}}}
    assert load_workflow(path).nodes == b.build().nodes
    assert Engine(registry=stub_registry).run(path).outputs["out"]["x"].tolist() == [2.0, 2.0]


def test_schema_accepts_shipped_workflows_and_rejects_mistakes(stub_registry):
    schema = workflow_schema(stub_registry)
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    shipped = sorted((REPO / "workflows").glob("*.json"))
    for path in shipped:
        errors = list(validator.iter_errors(json.loads(path.read_text())))
        assert not errors, (path.name, [e.message for e in errors])
    good = {"format": "nodegraph/1", "nodes": {"s": {"type": "StubSource", "params": {"value": 1}},
                                               "o": {"type": "StubSink", "inputs": {"a": "s.x"}}}}
    assert not list(validator.iter_errors(good))
    for bad in (
        {"format": "nodegraph/1", "nodes": {"s": {"type": "StubSorce"}}},
        {"format": "nodegraph/1", "nodes": {"s": {"type": "StubSource", "params": {"value": 5000}}}},
        {"format": "nodegraph/1", "nodes": {"s": {"type": "StubSource", "params": {"colour": 1}}}},
        {"format": "nodegraph/1", "nodes": {"o": {"type": "StubSink", "inputs": {"a": "no-dot"}}}},
        {"format": "nodegraph/1", "nodes": {"o": {"type": "StubSink"}}},
    ):
        assert list(validator.iter_errors(bad)), bad


def test_workflow_embedded_in_a_png_reruns(tmp_path, stub_registry):
    workflow = {"format": "nodegraph/1", "nodes": {"s": {"type": "StubSource", "params": {"value": 3}},
                                                   "o": {"type": "StubSink", "inputs": {"a": "s.x"}}}}
    info = PngImagePlugin.PngInfo()
    info.add_text("nodegraph.workflow", json.dumps(workflow))
    Image.new("RGB", (4, 4)).save(tmp_path / "img.png", pnginfo=info)
    assert Engine(registry=stub_registry).run(tmp_path / "img.png").outputs["o"]["x"].tolist() == [3.0, 3.0]
    Image.new("RGB", (4, 4)).save(tmp_path / "plain.png")
    with pytest.raises(WorkflowInvalid) as error:
        load_workflow(tmp_path / "plain.png")
    assert error.value.issues[0].code == "no_workflow"
