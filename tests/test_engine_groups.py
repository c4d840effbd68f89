"""Node groups with `repeat`: expansion, feedback, validation inside groups, caching per repetition."""

from nodegraph.api import Engine

GROUP = {
    "description": "add the step, then double",
    "inputs": {"x": "NUMBER", "step": "FLOAT"},
    "outputs": {"x": "double.x"},
    "feedback": {"x": "x"},
    "nodes": {
        "add": {"type": "StubAdd", "inputs": {"a": "in.x", "amount": "in.step"}},
        "double": {"type": "StubSteps", "inputs": {"a": "add.x"}, "params": {"steps": 1}},
    },
}


def workflow(repeat=2, group=None, instance=None):
    return {"format": "nodegraph/1", "groups": {"grow": group or GROUP}, "nodes": {
        "src": {"type": "StubSource", "params": {"value": 1}},
        "loop": instance or {"type": "group:grow", "inputs": {"x": "src.x"}, "params": {"step": 1.0, "repeat": repeat}},
        "out": {"type": "StubSink", "inputs": {"a": "loop.x"}},
    }}


def test_repeat_feeds_each_output_into_the_next_repetition(stub_registry, calls):
    result = Engine(registry=stub_registry).run(workflow(repeat=3))
    # ((1 + 1) * 2 + 1) * 2 = 10; then (10 + 1) * 2 = 22
    assert result.outputs["out"]["x"].tolist() == [22.0, 22.0]
    assert {"loop[1]/add", "loop[2]/double", "loop[3]/double"} <= result.ran()
    assert calls["StubAdd"] == 3


def test_longer_repeat_reuses_the_cached_repetitions(stub_registry, calls):
    engine = Engine(registry=stub_registry)
    engine.run(workflow(repeat=2))
    result = engine.run(workflow(), overrides={"loop.repeat": 3})
    assert result.ran() == {"loop[3]/add", "loop[3]/double", "out"}
    assert result.status["loop[2]/double"] == "cached"


def test_iteration_number_is_an_input(stub_registry, calls):
    group = {**GROUP, "nodes": {**GROUP["nodes"], "add": {"type": "StubAdd", "inputs": {"a": "in.x", "amount": "in.iteration"}}}}
    result = Engine(registry=stub_registry).run(workflow(repeat=2, group=group))
    assert result.outputs["out"]["x"].tolist() == [12.0, 12.0]  # ((1+1)*2 + 2) * 2


def test_errors_inside_a_group_name_the_instance_and_inner_node_once(stub_registry):
    group = {**GROUP, "nodes": {**GROUP["nodes"], "double": {"type": "StubSteps", "inputs": {"a": "add.x"},
                                                             "params": {"steps": 0}}}}
    issues = Engine(registry=stub_registry).validate(workflow(repeat=3, group=group))
    assert [(i.code, i.node_id, i.field) for i in issues] == [("invalid_param", "loop[1]/double", "steps")]
    assert str(issues[0]).startswith("node 'loop[1]/double' (StubSteps): param 'steps' = 0")


def test_group_mistakes(stub_registry):
    engine = Engine(registry=stub_registry)
    bad_repeat = engine.validate(workflow(repeat=0))
    assert [(i.code, i.node_id, i.field) for i in bad_repeat] == [("bad_repeat", "loop", "repeat")]
    missing_output = workflow()
    missing_output["nodes"]["out"]["inputs"]["a"] = "loop.nope"
    assert [(i.code, i.node_id, i.field) for i in engine.validate(missing_output)] == [
        ("unknown_group_output", "out", "a")]
    bad_feedback = workflow(group={**GROUP, "feedback": {"y": "x"}})
    assert [(i.code, i.node_id) for i in engine.validate(bad_feedback)] == [("unknown_group_output", "group:grow")]
    unknown = workflow(instance={"type": "group:nope", "inputs": {"x": "src.x"}})
    assert [i.code for i in engine.validate(unknown)] == ["unknown_group"]
    missing_input = workflow(instance={"type": "group:grow", "inputs": {"x": "src.x"}, "params": {"colour": 1}})
    assert sorted((i.code, i.field) for i in engine.validate(missing_input)) == [
        ("missing_input", "step"), ("unknown_param", "colour")]


def test_group_shows_in_schema_and_round_trips(stub_registry, tmp_path):
    import jsonschema

    from nodegraph.schema import workflow_schema
    from nodegraph.workflow import loads_workflow

    data = workflow()
    jsonschema.validate(data, workflow_schema(stub_registry))
    text = loads_workflow(__import__("json").dumps(data)).to_json()
    assert loads_workflow(text).groups["grow"].feedback == {"x": "x"}


def test_set_reaches_nodes_inside_a_group(stub_registry, calls):
    engine = Engine(registry=stub_registry)
    result = engine.run(workflow(repeat=2), overrides={"group:grow/double.steps": 2})
    assert result.outputs["out"]["x"].tolist() == [10.0, 10.0]  # StubSteps doubles once whatever its steps
    assert calls["StubSteps"] == 2
    from nodegraph.errors import WorkflowInvalid
    import pytest

    with pytest.raises(WorkflowInvalid) as info:
        engine.compile(workflow(), overrides={"group:grow/ghost.steps": 2})
    assert "no node 'group:grow/ghost'" in str(info.value)


def test_repeat_has_an_upper_bound(stub_registry):
    issues = Engine(registry=stub_registry).validate(workflow(repeat=100_000))
    assert [(i.code, i.field) for i in issues] == [("bad_repeat", "repeat")] and "1 to 1000" in issues[0].message


def test_embedded_workflow_keeps_file_paths_given_to_a_group_instance(stub_registry, tmp_path):
    from nodegraph.api import workflow_as_run

    (tmp_path / "n.txt").write_text("2")
    data = {"format": "nodegraph/1", "groups": {"read": {
        "inputs": {"file": "STRING"}, "outputs": {"x": "r.x"},
        "nodes": {"r": {"type": "StubReadFile", "inputs": {"path": "in.file"}}}}},
        "nodes": {"g": {"type": "group:read", "params": {"file": "n.txt"}},
                  "o": {"type": "StubSink", "inputs": {"a": "g.x"}}}}
    path = tmp_path / "wf.json"
    path.write_text(__import__("json").dumps(data))
    engine = Engine(registry=stub_registry)
    as_run = workflow_as_run(engine.compile(path))
    assert as_run["nodes"]["g"]["params"]["file"] == str((tmp_path / "n.txt").resolve())
    assert not as_run["groups"]["read"]["nodes"]["r"]["params"]
    from nodegraph.workflow import parse_workflow

    elsewhere = parse_workflow(as_run, base_dir=tmp_path / "other")
    assert engine.run(elsewhere).outputs["o"]["x"].tolist() == [2.0, 2.0]


def test_a_target_naming_a_group_instance_says_which_node_to_name(stub_registry):
    issues = Engine(registry=stub_registry, cache_dir=False).validate(workflow(repeat=3), targets=["loop"])
    (issue,) = issues
    assert (issue.code, issue.node_id) == ("unknown_target", "loop")
    assert "is not a node" not in issue.message  # it is one, in the file: a group instance
    assert "group instance" in issue.message and "'loop[3]/double'" in issue.message


def test_a_group_input_named_iteration_is_refused_not_ignored(stub_registry):
    # "in.iteration" is the repetition number: a declared input of that name could never be read
    add = {"type": "StubAdd", "inputs": {"a": "in.x", "amount": "in.iteration"}}
    group = {**GROUP, "inputs": {**GROUP["inputs"], "iteration": "FLOAT"}, "nodes": {**GROUP["nodes"], "add": add}}
    instance = {"type": "group:grow", "inputs": {"x": "src.x"}, "params": {"step": 1.0, "iteration": 5.0, "repeat": 2}}
    issues = Engine(registry=stub_registry, cache_dir=False).validate(workflow(group=group, instance=instance))
    assert [(i.code, i.node_id, i.field) for i in issues] == [("bad_group", "group:grow", "inputs.iteration")]


def test_an_inner_param_linked_to_a_group_input_and_given_a_literal_is_refused_not_overridden(stub_registry, calls):
    # the instance's literal (or the repetition number) would silently replace the inner literal
    engine = Engine(registry=stub_registry, cache_dir=False)
    for link in ("in.step", "in.iteration"):
        add = {"type": "StubAdd", "inputs": {"a": "in.x", "amount": link}, "params": {"amount": 5.0}}
        issues = engine.validate(workflow(group={**GROUP, "nodes": {**GROUP["nodes"], "add": add}}))
        assert [(i.code, i.node_id, i.field) for i in issues] == [
            ("link_and_literal", "group:grow", "nodes.add.amount")]
        assert f"'{link}'" in issues[0].message
    assert calls["StubAdd"] == 0
