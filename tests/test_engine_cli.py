"""The CLI: exit codes, --json results, --set, the disk cache across processes, Ctrl-C."""
import json
import os
import signal
import stat
import subprocess
import sys
import time

import pytest

from nodegraph.cli import parse_set

from .conftest import REPO, STUB_PLUGINS


def write(tmp_path, nodes, name="wf.json"):
    path = tmp_path / name
    path.write_text(json.dumps({"format": "nodegraph/1", "nodes": nodes}, indent=2))
    return path


CHAIN = {
    "src": {"type": "StubSource", "params": {"value": 2}},
    "add": {"type": "StubAdd", "inputs": {"a": "src.x"}},
    "steps": {"type": "StubSteps", "inputs": {"a": "add.x"}, "params": {"steps": 3}},
    "write": {"type": "StubWrite", "inputs": {"a": "steps.x"}},
}


def cli(*args, cwd=None):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "nodegraph.cli", *args, "--plugins", str(STUB_PLUGINS)],
                          capture_output=True, text=True, env=env, cwd=cwd, timeout=120)


def test_set_values_parse_as_json_where_they_can():
    assert parse_set(["a.x=7", "a.y=0.5", "a.z=true", "a.l=[1,2]", "a.s=hello world", "a.n=null"]) == {
        "a.x": 7, "a.y": 0.5, "a.z": True, "a.l": [1, 2], "a.s": "hello world", "a.n": None}


def test_run_json_result_and_exit_0(tmp_path):
    done = cli("run", str(write(tmp_path, CHAIN)), "--out", str(tmp_path / "out"), "--json", "--device", "cpu")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["ok"] and result["exit"] == 0
    assert {k: v["status"] for k, v in result["nodes"].items()} == {
        "src": "ran", "add": "ran", "steps": "ran", "write": "ran"}
    assert result["nodes"]["steps"]["type"] == "StubSteps" and result["nodes"]["steps"]["seconds"] >= 0
    assert result["files"] == [str(tmp_path / "out" / "result.txt")]
    assert (tmp_path / "out" / "result.txt").read_text() == "6.0 6.0"


def test_progress_bar_on_stderr_without_json(tmp_path):
    done = cli("run", str(write(tmp_path, CHAIN)), "--out", str(tmp_path / "out"))
    assert done.returncode == 0
    assert "steps (StubSteps)" in done.stderr and "3/3" in done.stderr
    assert done.stdout.strip() == str(tmp_path / "out" / "result.txt")


def test_two_processes_share_a_cache_dir(tmp_path):
    wf = write(tmp_path, CHAIN)
    cache = tmp_path / "cache"
    first = json.loads(cli("run", str(wf), "--cache-dir", str(cache), "--out", str(tmp_path / "a"), "--json").stdout)
    assert all(n["status"] == "ran" for n in first["nodes"].values())
    second = json.loads(cli("run", str(wf), "--cache-dir", str(cache), "--out", str(tmp_path / "b"), "--json").stdout)
    statuses = {k: v["status"] for k, v in second["nodes"].items()}
    # The output node writes into the new folder; everything it needs comes from the first process's work.
    assert statuses == {"steps": "cached", "write": "ran", "add": "skipped", "src": "skipped"}
    assert (tmp_path / "b" / "result.txt").read_text() == "6.0 6.0"
    third = json.loads(cli("run", str(wf), "--no-cache", "--out", str(tmp_path / "c"), "--json").stdout)
    assert all(n["status"] == "ran" for n in third["nodes"].values())


def test_invalid_workflow_exits_2_with_every_error_and_no_traceback(tmp_path):
    wf = write(tmp_path, {"src": {"type": "StubSource", "params": {"value": "x"}},
                          "add": {"type": "StubAdd", "inputs": {"a": "src.x"}, "params": {"amount": -1}},
                          "write": {"type": "StubWrite", "inputs": {"a": "add.x"}}})
    for command in ("validate", "run"):
        done = cli(command, str(wf))
        assert done.returncode == 2
        assert "workflow is invalid (2 problems)" in done.stderr
        assert "node 'src' (StubSource): param 'value' = 'x': Input should be a valid number" in done.stderr
        assert "node 'add' (StubAdd): param 'amount' = -1" in done.stderr
        assert "Traceback" not in done.stderr
    result = json.loads(cli("validate", str(wf), "--json").stdout)
    assert result["exit"] == 2 and {e["code"] for e in result["errors"]} == {"invalid_param"}
    assert {(e["node_id"], e["field"]) for e in result["errors"]} == {("src", "value"), ("add", "amount")}


def test_validate_ok_and_usage_errors(tmp_path):
    wf = write(tmp_path, CHAIN)
    assert cli("validate", str(wf)).returncode == 0
    assert cli("validate", str(wf), "--set", "noequals").returncode == 2
    assert cli("run", str(wf), "--dtype", "float64").returncode == 2
    missing = cli("run", str(tmp_path / "nope.json"))
    assert missing.returncode == 2 and "cannot read workflow file" in missing.stderr


def test_a_bad_size_names_the_option_it_came_from(tmp_path):
    wf = write(tmp_path, CHAIN)
    vram = cli("run", str(wf), "--vram-budget", "lots", "--out", str(tmp_path / "out"))
    assert vram.returncode == 2 and "VRAM budget 'lots'" in vram.stderr and "cache size" not in vram.stderr
    cache = cli("run", str(wf), "--cache-size", "lots", "--cache-dir", str(tmp_path / "c"),
                "--out", str(tmp_path / "out"))
    assert cache.returncode == 2 and "cache size 'lots'" in cache.stderr


def test_a_bad_cache_size_variable_is_named(monkeypatch):
    from nodegraph.cache import default_cache_size
    from nodegraph.errors import NodegraphError

    monkeypatch.setenv("NODEGRAPH_CACHE_SIZE", "lots")
    with pytest.raises(NodegraphError, match=r"^\$NODEGRAPH_CACHE_SIZE 'lots'"):
        default_cache_size()


def test_a_malformed_set_is_reported_with_every_other_problem(tmp_path):
    wf = write(tmp_path, {**CHAIN, "src": {"type": "StubSource", "params": {"value": "x"}}})
    done = cli("validate", str(wf), "--set", "add.amount", "--set", "noequals=1", "--json")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    found = {(e["code"], e["node_id"], e["field"]) for e in json.loads(done.stdout)["errors"]}
    assert ("invalid_param", "src", "value") in found  # the workflow's own problem is not hidden
    assert sum(e["code"] == "bad_override" for e in json.loads(done.stdout)["errors"]) == 2
    assert "'add.amount'" in done.stderr and "'noequals=1'" in done.stderr


def test_node_failure_exits_1_naming_the_node(tmp_path):
    nodes = {"src": {"type": "StubSource"}, "fail": {"type": "StubFail", "inputs": {"a": "src.x"}},
             "write": {"type": "StubWrite", "inputs": {"a": "fail.x"}}}
    wf = write(tmp_path, nodes)
    done = cli("run", str(wf), "--out", str(tmp_path / "out"))
    assert done.returncode == 1
    assert "node 'fail' (StubFail) failed: ValueError: stub failure as asked" in done.stderr
    assert "Traceback" not in done.stderr
    result = json.loads(cli("run", str(wf), "--json").stdout)
    assert result["exit"] == 1 and result["nodes"]["fail"]["status"] == "failed"
    assert "stub failure" in result["nodes"]["fail"]["error"]
    assert "Traceback" in cli("--debug", "run", str(wf)).stderr


def test_ctrl_c_stops_between_steps_and_leaves_no_output(tmp_path):
    nodes = {**CHAIN, "steps": {**CHAIN["steps"], "params": {"steps": 200, "delay": 0.05}}}
    wf = write(tmp_path, nodes)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "nodegraph.cli", "run", str(wf), "--out", str(tmp_path / "out"),
                             "--plugins", str(STUB_PLUGINS)], stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 60
    seen = ""
    while "steps (StubSteps)" not in seen and time.time() < deadline:
        seen += proc.stderr.read(1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert "interrupted in node 'steps' (StubSteps)" in err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_atomic_writes_never_replace_what_is_not_a_regular_file(tmp_path):
    from nodegraph.workflow import WorkflowBuilder

    fifo, folder = tmp_path / "pipe", tmp_path / "folder"
    os.mkfifo(fifo)  # a reader's pipe (or a device): renaming a file over it would break it for everyone
    folder.mkdir()
    for target in (fifo, folder):
        with pytest.raises(OSError, match="not a regular file"):
            WorkflowBuilder("x").save(target)
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode) and folder.is_dir() and not any(folder.iterdir())
    # a link like /dev/stdout: with stdout sent to a file it leads to a regular file, but the rename would
    # replace the link itself (run as root, the system's /dev/stdout)
    link = tmp_path / "stdout"
    link.symlink_to("/proc/self/fd/1")
    source = REPO / "tests" / "data" / "comfy" / "txt2img_api.json"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with open(tmp_path / "out.txt", "w") as out:
        done = subprocess.run([sys.executable, "-m", "nodegraph.cli", "import", str(source), "-o", str(link)],
                              stdout=out, stderr=subprocess.PIPE, text=True, env=env, timeout=120)
    assert done.returncode == 1 and "Traceback" not in done.stderr and "not a regular file" in done.stderr
    assert link.is_symlink()
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".ngtmp")] == []


@pytest.mark.parametrize("args", [["nodes"], ["nodes", "--json"], ["schema"]])
def test_output_that_cannot_be_written_whole_is_a_failure(tmp_path, args):
    # stdout to a file on a disk that fills up: a cut listing or JSON document must not look like success
    import resource

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with open(tmp_path / "stdout.txt", "w") as stdout:
        done = subprocess.run([sys.executable, "-m", "nodegraph.cli", *args, "--plugins", str(STUB_PLUGINS)],
                              stdout=stdout, stderr=subprocess.PIPE, text=True, env=env, preexec_fn=limit, timeout=120)
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr and "cannot write to standard output" in done.stderr


def test_a_closed_stdout(tmp_path):
    # started with stdout closed (`>&-`): a plain run works as before; --json cannot give its document
    wf = write(tmp_path, CHAIN)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for extra, code in (([], 0), (["--json"], 1)):
        done = subprocess.run([sys.executable, "-m", "nodegraph.cli", "run", str(wf), "--out", str(tmp_path / "out"),
                               *extra, "--plugins", str(STUB_PLUGINS)], stderr=subprocess.PIPE, text=True, env=env,
                              preexec_fn=lambda: os.close(1), timeout=120)
        assert done.returncode == code and "Traceback" not in done.stderr, done.stderr
    assert "cannot write to standard output" in done.stderr


@pytest.mark.parametrize("command", ["nodes", "schema"])
def test_listing_commands(command):
    done = cli(command)
    assert done.returncode == 0
    if command == "schema":
        schema = json.loads(done.stdout)
        assert "StubSource" in schema["$defs"]["node"]["properties"]["type"]["anyOf"][0]["enum"]
    else:
        assert "StubSource v1" in done.stdout and "param  value: FLOAT (default 1.0, >= -1000, <= 1000)" in done.stdout
