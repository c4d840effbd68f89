"""Hostile and careless input: every problem is an exit 2 naming the node and field, never a traceback,
never a silent success, never a hang."""
import json
import os
import subprocess
import sys

import pytest

from nodegraph.api import Engine
from nodegraph.errors import WorkflowInvalid
from nodegraph.workflow import loads_workflow

from .conftest import REPO, STUB_PLUGINS

SINK_OF = {"o": {"type": "StubSink", "inputs": {"a": "s.x"}}}


def cli(*args, cwd=None, timeout=120, env=None):
    env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run([sys.executable, "-m", "nodegraph.cli", *args, "--plugins", str(STUB_PLUGINS)],
                          capture_output=True, text=True, cwd=cwd, timeout=timeout, env=env)


def write(tmp_path, text, name="wf.json"):
    path = tmp_path / name
    path.write_text(text if isinstance(text, str) else json.dumps(text))
    return path


def issues_of(stub_registry, text):
    workflow = loads_workflow(text, strict=False)
    return Engine(registry=stub_registry, cache_dir=False).validate(workflow)


def test_json_nested_thousands_deep_is_exit_2_without_traceback(tmp_path):
    deep = '{"format": "nodegraph/1", "nodes": {"s": {"type": "StubSource", "params": {"value": ' + "[" * 5000 + \
        "]" * 5000 + "}}}}"
    shallow_but_deep = '{"format": "nodegraph/1", "nodes": {"s": {"type": "StubSource", "params": {"value": ' + \
        "[" * 200 + "]" * 200 + '}}, "o": {"type": "StubSink", "inputs": {"a": "s.x"}}}}'
    for text in (deep, shallow_but_deep):
        done = cli("validate", str(write(tmp_path, text)))
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert "nested too deeply" in cli("validate", str(write(tmp_path, deep))).stderr
    assert "node 's' (StubSource): param 'value'" in done.stderr


def test_text_that_is_not_utf_8_is_refused_not_guessed_at(tmp_path):
    text = json.dumps({"format": "nodegraph/1", "nodes": {
        "s": {"type": "StubSource"}, "o": {"type": "StubWrite", "inputs": {"a": "s.x"}, "params": {"name": "r\u00e9sum\u00e9.txt"}}}},
        ensure_ascii=False)
    latin1 = tmp_path / "latin1.json"
    latin1.write_bytes(text.encode("latin-1"))  # an editor set to another encoding: the name must not be mangled
    done = cli("run", str(latin1), "--out", str(tmp_path / "out"))
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert "line 1" in done.stderr and "not UTF-8" in done.stderr
    assert not (tmp_path / "out").exists()
    utf16 = tmp_path / "utf16.json"
    utf16.write_bytes(text.encode("utf-16"))  # what some Windows shells write
    done = cli("validate", str(utf16))
    assert done.returncode == 2 and "UTF-16" in done.stderr and "save it as UTF-8" in done.stderr
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(b"\xff\xd8\xff\xe0" + bytes(100))  # an image other than a PNG: not text at all
    done = cli("run", str(photo))
    assert done.returncode == 2 and "is a JPEG image, which carries no workflow" in done.stderr
    assert "UTF-8" not in done.stderr
    binary = tmp_path / "data.bin"
    binary.write_bytes(b"\x80\x81" + bytes(100))  # no image either: not text at all
    done = cli("run", str(binary))
    assert done.returncode == 2 and "is not a workflow" in done.stderr and "UTF-8" not in done.stderr
    bom = tmp_path / "bom.json"
    bom.write_bytes(b"\xef\xbb\xbf" + text.encode())  # UTF-8 with a byte order mark: still UTF-8
    done = cli("run", str(bom), "--out", str(tmp_path / "out"))
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "out" / "r\u00e9sum\u00e9.txt").exists()


def test_a_path_no_file_system_can_name_is_reported_on_its_field(tmp_path, stub_registry):
    # "\ud800" is valid JSON, but a lone surrogate is no character: no file name can hold it
    text = '{"format": "nodegraph/1", "nodes": {"s": {"type": "StubReadFile", "params": {"path": "x\\ud800.txt"}}, ' \
           '"o": {"type": "StubSink", "inputs": {"a": "s.x"}}}}'
    (issue,) = issues_of(stub_registry, text)
    assert (issue.code, issue.node_id, issue.field) == ("bad_file", "s", "path")
    done = cli("run", str(write(tmp_path, text)))
    assert done.returncode == 2 and "Traceback" not in done.stderr and "node 's' (StubReadFile)" in done.stderr


def test_integers_of_thousands_of_digits_in_the_file_and_through_set(tmp_path, stub_registry):
    text = json.dumps({"format": "nodegraph/1", "nodes": {"s": {"type": "StubEven", "params": {"value": 1}},
                                                          **SINK_OF}}).replace('"value": 1', '"value": ' + "7" * 5000)
    (issue,) = issues_of(stub_registry, text)
    assert (issue.code, issue.node_id, issue.field) == ("invalid_param", "s", "value")
    assert "5000 digits" in issue.message
    wf = write(tmp_path, text)
    done = cli("validate", str(wf))
    assert done.returncode == 2 and "Traceback" not in done.stderr and "node 's'" in done.stderr
    ok = write(tmp_path, {"format": "nodegraph/1", "nodes": {"s": {"type": "StubEven"}, **SINK_OF}}, "ok.json")
    done = cli("validate", str(ok), "--set", "s.value=" + "9" * 5000)
    assert done.returncode == 2 and "Traceback" not in done.stderr and "s.value" in done.stderr
    # 30 digits parse, but do not fit in 64 bits: refused at validation, naming the field
    (issue,) = Engine(registry=stub_registry, cache_dir=False).validate(ok, overrides={"s.value": 10**30})
    assert (issue.node_id, issue.field) == ("s", "value") and "64 bits" in issue.message


def test_file_names_over_the_os_limit(tmp_path, stub_registry):
    wf = {"format": "nodegraph/1", "nodes": {"s": {"type": "StubReadFile", "params": {"path": "x" * 300}},
                                             **SINK_OF}}
    (issue,) = Engine(registry=stub_registry, cache_dir=False).validate(wf)
    assert (issue.code, issue.node_id, issue.field) == ("bad_file", "s", "path") and "too long" in issue.message
    done = cli("run", str(tmp_path / ("y" * 300 + ".json")))
    assert done.returncode == 2 and "Traceback" not in done.stderr and "cannot read workflow file" in done.stderr


def test_duplicate_keys_are_reported_where_they_are(stub_registry):
    text = ('{"format": "nodegraph/1", "nodes": {"s": {"type": "StubEven", "params": {"value": 2, "value": 3}}, '
            '"o": {"type": "StubSink", "inputs": {"a": "s.x"}}, "o": {"type": "StubSink"}}}')
    found = {(i.code, i.node_id, i.field) for i in issues_of(stub_registry, text)}
    assert ("duplicate_key", "s", "value") in found and ("duplicate_key", "o", None) in found


def test_node_ids_are_matched_whole(stub_registry):
    text = json.dumps({"format": "nodegraph/1", "nodes": {"s\n": {"type": "StubSource"}, **SINK_OF}})
    found = [(i.code, i.node_id) for i in issues_of(stub_registry, text)]
    assert ("bad_node_id", "s\\n") in found


def test_a_structural_error_does_not_hide_the_others(stub_registry):
    text = json.dumps({"format": "nodegraph/1", "colour": "red", "nodes": {
        "bad id": {"type": "StubSource"},
        "x": {"type": "StubSource", "parms": {}},
        "s": {"type": "StubSource", "params": {"value": 5000}},
        "o": {"type": "StubSink", "inputs": {"a": "s.x"}}}})
    found = {(i.code, i.node_id, i.field) for i in issues_of(stub_registry, text)}
    assert found == {("bad_structure", None, None), ("bad_node_id", "bad id", None),
                     ("bad_structure", "x", "parms"), ("invalid_param", "s", "value")}


@pytest.mark.parametrize("make", ["fifo", "device", "proc", "link_to_proc", "fifo_in_folder", "link_to_proc_in_folder",
                                  "link_to_sys_folder_in_folder"])
def test_special_files_are_refused_at_validation_never_opened(tmp_path, stub_registry, make):
    target = tmp_path / "thing"
    param, kind = "path", "StubReadFile"
    if make == "fifo":
        os.mkfifo(target)
    elif make == "device":
        target = "/dev/zero"
    elif make == "proc":
        target = "/proc/self/environ"
    elif make == "link_to_proc":
        target.symlink_to("/proc/self/status")
    else:
        folder = tmp_path / "model"
        folder.mkdir()
        if make == "fifo_in_folder":
            os.mkfifo(folder / "weights.safetensors")
        elif make == "link_to_proc_in_folder":
            (folder / "weights.safetensors").symlink_to("/proc/self/status")
        else:  # a sub-folder that is a link to a special file system: its files resolve there too
            (folder / "unet").symlink_to("/sys/kernel")
        target, param, kind = folder, "folder", "StubReadFolder"
    wf = {"format": "nodegraph/1", "nodes": {"s": {"type": kind, "params": {param: str(target)}}, **SINK_OF}}
    issues = Engine(registry=stub_registry, cache_dir=False).validate(wf)  # a FIFO read would block here
    assert [(i.code, i.node_id, i.field) for i in issues] == [("bad_file", "s", param)], issues
    assert any(word in issues[0].message for word in ("FIFO", "device", "/proc", "special"))


def test_newer_format_nan_and_schema_messages(stub_registry, tmp_path):
    with pytest.raises(WorkflowInvalid) as info:
        loads_workflow('{"format": "nodegraph/7", "nodes": {}}')
    (issue,) = info.value.issues
    assert issue.code == "newer_format" and "nodegraph/7" in issue.message and "nodegraph/1" in issue.message
    for value in ("NaN", "Infinity", "-Infinity"):
        text = '{"format": "nodegraph/1", "nodes": {"s": {"type": "StubSource", "params": {"value": %s}}, ' \
               '"o": {"type": "StubSink", "inputs": {"a": "s.x"}}}}' % value
        (issue,) = issues_of(stub_registry, text)
        assert (issue.node_id, issue.field) == ("s", "value") and "must be a finite number" in issue.message
    with_schema = {"$schema": "https://example.org/nodegraph.schema.json", "format": "nodegraph/1",
                   "nodes": {"s": {"type": "StubSource"}, **SINK_OF}}
    assert Engine(registry=stub_registry, cache_dir=False).validate(with_schema) == []


def test_schema_and_validate_agree_on_what_is_required(stub_registry):
    import jsonschema

    from nodegraph.schema import workflow_schema

    schema = workflow_schema(stub_registry)
    engine = Engine(registry=stub_registry, cache_dir=False)
    good = {"$schema": "x", "format": "nodegraph/1", "nodes": {"s": {"type": "StubSource"}, **SINK_OF}}
    for drop in (None, "format", "nodes"):
        data = {k: v for k, v in good.items() if k != drop}
        schema_ok = not list(jsonschema.Draft202012Validator(schema).iter_errors(data))
        engine_ok = not engine.validate(data) if drop != "nodes" else False
        assert schema_ok == engine_ok == (drop is None), drop
        if drop:
            assert any(drop in i.message for i in engine.validate(data))
    # a required param missing, a file param linked, a group without nodes: both refuse each
    for bad in ({**good, "nodes": {"r": {"type": "StubReadFile"}, **SINK_OF}},
                {**good, "nodes": {"s": {"type": "StubSource"}, "r": {"type": "StubReadFile", "inputs": {"path": "s.x"}},
                                   **SINK_OF}},
                {**good, "groups": {"g": {"inputs": {}}}}):
        assert list(jsonschema.Draft202012Validator(schema).iter_errors(bad)), bad
        assert engine.validate(bad), bad


def test_prompt_truncation_style_warning_is_one_line_naming_the_node(tmp_path):
    from nodegraph.context import NodeWarning, RunContext

    with pytest.warns(NodeWarning, match=r"^node 'pos' \(CLIPEncode\): the prompt was cut$"):
        RunContext(node_id="pos", node_type="CLIPEncode").warn("the prompt was cut")
    wf = write(tmp_path, {"format": "nodegraph/1", "nodes": {"s": {"type": "StubWarn"}, **SINK_OF}})
    done = cli("run", str(wf), "--out", str(tmp_path / "out"))
    lines = [line for line in done.stderr.splitlines() if "warning" in line]
    assert done.returncode == 0 and lines == ["nodegraph: warning: node 's' (StubWarn): careful now"], done.stderr
