"""One test per validation error code: node id, field and code reported, all at once."""
import pytest

from nodegraph.api import Engine
from nodegraph.errors import WorkflowInvalid
from nodegraph.workflow import loads_workflow


def wf(**nodes):
    return {"format": "nodegraph/1", "nodes": nodes}


SINK = {"type": "StubSink", "inputs": {"a": "s.x"}}
SRC = {"type": "StubSource"}


def problems(registry, workflow, **kw):
    return Engine(registry=registry).validate(workflow, **kw)


def only(registry, workflow, **kw):
    issues = problems(registry, workflow, **kw)
    assert len(issues) == 1, issues
    return issues[0]


def test_valid_workflow_has_no_problems(stub_registry):
    assert problems(stub_registry, wf(s=SRC, o=SINK)) == []


@pytest.mark.parametrize("workflow, code, node_id, field", [
    (wf(s={"type": "StubSorce"}, o=SINK), "unknown_type", "s", "type"),
    (wf(s={"type": "StubSource", "inputs": {"nope": "s.x"}}, o=SINK), "unknown_input", "s", "nope"),
    (wf(s={"type": "StubSource", "params": {"nope": 1}}, o=SINK), "unknown_param", "s", "nope"),
    (wf(s=SRC, o={"type": "StubSink"}), "missing_input", "o", "a"),
    (wf(s=SRC, o={"type": "StubSink", "inputs": {"a": "ghost.x"}}), "missing_node", "o", "a"),
    (wf(s=SRC, o={"type": "StubSink", "inputs": {"a": "s.y"}}), "unknown_output", "o", "a"),
    (wf(s=SRC, o={"type": "StubSink", "inputs": {"a": "sx"}}), "bad_link", "o", "a"),
    (wf(s=SRC, f={"type": "Float", "params": {"value": 1.0}}, o={"type": "StubSink", "inputs": {"a": "f.value"}}),
     "type_mismatch", "o", "a"),
    (wf(s=SRC, f={"type": "Float", "params": {"value": 1.0}},
        a={"type": "StubAdd", "inputs": {"a": "s.x", "amount": "f.value"}, "params": {"amount": 2.0}},
        o={"type": "StubSink", "inputs": {"a": "a.x"}}), "link_and_literal", "a", "amount"),
    (wf(s=SRC, o={"type": "StubSink", "params": {"a": [1, 2]}}), "literal_socket", "o", "a"),
    (wf(s={"type": "StubSource", "params": {"value": "3"}}, o=SINK), "invalid_param", "s", "value"),
    (wf(s={"type": "StubSource", "params": {"value": 5000}}, o=SINK), "invalid_param", "s", "value"),
    (wf(s={"type": "StubEven", "params": {"value": 3}}, o=SINK), "invalid_param", "s", "value"),
    (wf(s={"type": "StubReadFile", "params": {"path": "no/such/file.txt"}}, o=SINK), "missing_file", "s", "path"),
    (wf(s=SRC, o={"type": "StubAdd", "inputs": {"a": "s.x"}}), "no_output", None, None),
])
def test_each_error_code(stub_registry, workflow, code, node_id, field):
    issue = only(stub_registry, workflow)
    assert (issue.code, issue.node_id, issue.field) == (code, node_id, field)
    if node_id is not None and code != "unknown_type":
        assert issue.node_type == workflow["nodes"][node_id]["type"]
    assert str(issue).startswith(f"node '{node_id}'" if node_id else "")


def test_message_format_names_node_type_field_and_value(stub_registry):
    issue = only(stub_registry, wf(s={"type": "StubSource", "params": {"value": -3000}}, o=SINK))
    assert str(issue) == "node 's' (StubSource): param 'value' = -3000: Input should be greater than or equal to -1000"


def test_unknown_type_suggests_close_names(stub_registry):
    issue = only(stub_registry, wf(s={"type": "StubSorce"}, o=SINK))
    assert "did you mean StubSource" in issue.message


def test_cycle_names_the_nodes_on_it(stub_registry):
    issues = problems(stub_registry, wf(
        s=SRC,
        a={"type": "StubAdd", "inputs": {"a": "c.x"}},
        b={"type": "StubAdd", "inputs": {"a": "a.x"}},
        c={"type": "StubAdd", "inputs": {"a": "b.x"}},
        o=SINK))
    assert [i.code for i in issues] == ["cycle"]
    assert issues[0].node_id == "a"
    for name in "abc":
        assert f"{name} ->" in issues[0].message or f"-> {name}" in issues[0].message


def test_self_loop_is_a_cycle(stub_registry):
    issue = only(stub_registry, wf(s=SRC, a={"type": "StubAdd", "inputs": {"a": "a.x"}}, o=SINK))
    assert issue.code == "cycle" and issue.node_id == "a"


def test_ambiguous_type_after_a_clash(stub_registry):
    from nodegraph.definitions import build_node_def

    def other_source(value: float = 1.0) -> float:
        """Another plugin's StubSource."""
        return value

    clone = build_node_def(other_source, "StubSource", 1, "x", {"x": "NUMBER"}, True, False, None, None)
    stub_registry.add(clone, origin="plugin 'other'")
    issue = only(stub_registry, wf(s=SRC, o=SINK))
    assert issue.code == "ambiguous_type" and "plugin 'other'" in issue.message


def test_malformed_json_gives_line_and_column():
    with pytest.raises(WorkflowInvalid) as info:
        loads_workflow('{"format": "nodegraph/1",\n "nodes": {\n  "a": {"type": "X",}\n }\n}', source="wf.json")
    (issue,) = info.value.issues
    assert issue.code == "bad_json"
    assert "wf.json: line 3, column 21" in issue.message


def test_bad_structure_and_bad_node_id():
    with pytest.raises(WorkflowInvalid) as info:
        loads_workflow('{"format": "nodegraph/1", "extra": 0, "nodes": {"a": {"type": "X", "extra": 1}}}')
    codes = {(i.code, i.node_id, i.field) for i in info.value.issues}
    assert ("bad_structure", None, None) in codes and ("bad_structure", "a", "extra") in codes
    with pytest.raises(WorkflowInvalid) as info:
        loads_workflow('{"format": "nodegraph/1", "nodes": {"a b": {"type": "X"}}}')
    assert [(i.code, i.node_id) for i in info.value.issues] == [("bad_node_id", "a b")]


def test_unknown_target_and_bad_override(stub_registry):
    issue = only(stub_registry, wf(s=SRC, o=SINK), targets=["ghost"])
    assert (issue.code, issue.node_id) == ("unknown_target", "ghost")
    with pytest.raises(WorkflowInvalid) as info:
        Engine(registry=stub_registry).compile(wf(s=SRC, o=SINK), overrides={"ghost.value": 1})
    assert info.value.issues[0].code == "bad_override"


def test_several_mistakes_are_all_reported(stub_registry):
    issues = problems(stub_registry, wf(
        s={"type": "StubSource", "params": {"value": "x", "colour": "red"}},
        t={"type": "Nope"},
        a={"type": "StubAdd", "inputs": {"a": "s.y"}, "params": {"amount": -1}},
        o={"type": "StubSink"}))
    found = {(i.code, i.node_id, i.field) for i in issues}
    assert found == {
        ("invalid_param", "s", "value"),
        ("unknown_param", "s", "colour"),
        ("unknown_type", "t", "type"),
        ("unknown_output", "a", "a"),
        ("invalid_param", "a", "amount"),
        ("missing_input", "o", "a"),
    }


def test_run_refuses_an_invalid_workflow_before_running_anything(stub_registry, calls):
    with pytest.raises(WorkflowInvalid):
        Engine(registry=stub_registry).run(wf(s=SRC, a={"type": "StubAdd", "inputs": {"a": "s.x"}, "params": {"amount": -1}},
                                              o={"type": "StubSink", "inputs": {"a": "a.x"}}))
    assert sum(calls.values()) == 0


def test_an_engine_validates_a_workflow_once_but_notices_missing_files(stub_registry, tmp_path):
    from nodegraph.errors import WorkflowInvalid

    (tmp_path / "n.txt").write_text("1")
    path = tmp_path / "wf.json"
    path.write_text('{"format": "nodegraph/1", "nodes": {"r": {"type": "StubReadFile", "params": {"path": "n.txt"}},'
                    ' "o": {"type": "StubSink", "inputs": {"a": "r.x"}}}}')
    engine = Engine(registry=stub_registry)
    first = engine.compile(path)
    assert engine.compile(path) is first
    assert engine.compile(path, overrides={"r.path": "n.txt"}) is first  # same content after the override
    (tmp_path / "n.txt").unlink()
    with pytest.raises(WorkflowInvalid) as info:
        engine.compile(path)
    assert info.value.issues[0].code == "missing_file"


def test_cross_field_checks_see_defaults_but_not_linked_params(stub_registry):
    from nodegraph.workflow import WorkflowBuilder

    b = WorkflowBuilder()
    img = b.add("LoadImage", id="s", path="nowhere.png")
    b.add("ImageResize", id="r", image=img["image"])  # all sizes 0 by default: refused
    assert [(i.code, i.node_id, i.field) for i in Engine(registry=stub_registry).validate(b.build(), targets=["r"])
            if i.code == "invalid_param"] == [("invalid_param", "r", "width")]
    wf = {"format": "nodegraph/1", "nodes": {
        "size": {"type": "Int", "params": {"value": 4096}},
        "e": {"type": "ExpandCanvas", "inputs": {"image": "x.image", "max_size": "size.value"},
              "params": {"expand_pixels": 2000}},
        "x": {"type": "LoadImage", "params": {"path": "nowhere.png"}}}}
    issues = Engine(registry=stub_registry).validate(wf, targets=["e"])
    assert [(i.code, i.node_id) for i in issues] == [("missing_file", "x")]  # no false max_size complaint


def test_file_params_cannot_be_linked(stub_registry):
    issue = only(stub_registry, wf(p={"type": "String", "params": {"value": "n.txt"}},
                                   s={"type": "StubReadFile", "inputs": {"path": "p.value"}}, o=SINK))
    assert (issue.code, issue.node_id, issue.field) == ("linked_path", "s", "path")


def test_python_values_that_are_not_json_are_reported(stub_registry, tmp_path):
    import datetime

    issue = only(stub_registry, wf(s={"type": "StubSource", "params": {"value": datetime.date(2026, 1, 1)}}, o=SINK))
    assert (issue.code, issue.field) == ("invalid_param", "value") and "date is not a JSON value" in issue.message
    (tmp_path / "n.txt").write_text("1")
    workflow = wf(s={"type": "StubReadFile", "params": {"path": "x"}}, o=SINK)
    assert problems(stub_registry, workflow, overrides={"s.path": tmp_path / "n.txt"}) == []
