"""Faults while running: misbehaving plugins and nodes, signals, --json in every outcome, memory,
limits and concurrent runs on one Engine."""
import gc
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from nodegraph.api import Engine
from nodegraph.errors import NodeFailed, WorkflowInvalid
from nodegraph.limits import Limits

from .conftest import REPO, STUB_PLUGINS, stub_module
from .test_hardening_input import cli, write

SRC = {"type": "StubSource", "params": {"value": 2}}


def wf(**nodes):
    return {"format": "nodegraph/1", "nodes": nodes}


def one_document(done):
    """The whole stdout is one JSON document."""
    return json.loads(done.stdout)


@pytest.mark.parametrize("body, code, words", [
    ("import sys\nsys.exit(0)\n", 2, "called sys.exit(0)"),
    ("raise GeneratorExit('x')\n", 2, "raised GeneratorExit"),
    ("raise KeyboardInterrupt\n", 130, "interrupted while loading plugin 'evil'"),
])
def test_a_plugin_that_ends_the_process_at_import_is_named_and_fails(tmp_path, body, code, words):
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "evil.py").write_text(body)
    workflow = write(tmp_path, wf(s=SRC, o={"type": "StubSink", "inputs": {"a": "s.x"}}))
    done = cli("run", str(workflow), "--json", "--plugins", str(plugins))
    assert done.returncode == code and words in done.stderr and "Traceback" not in done.stderr, done.stderr
    document = one_document(done)
    assert document["exit"] == code and not document["ok"] and words in document["error"]


@pytest.mark.parametrize("how, code", [("exit", 1), ("base", 1), ("keyboard", 130)])
def test_a_node_that_ends_the_process_is_named_and_fails(tmp_path, how, code):
    workflow = write(tmp_path, wf(m={"type": "StubMisbehave", "params": {"how": how}},
                                  o={"type": "StubSink", "inputs": {"a": "m.x"}}))
    done = cli("run", str(workflow), "--json", "--out", str(tmp_path / "out"))
    assert done.returncode == code and "Traceback" not in done.stderr, done.stderr
    document = one_document(done)
    assert document["exit"] == code and not document["ok"] and "node 'm' (StubMisbehave)" in document["error"]
    assert document["nodes"]["m"]["status"] == ("interrupted" if how == "keyboard" else "failed")


def test_a_node_returning_the_wrong_thing_is_blamed_itself(stub_registry):
    engine = Engine(registry=stub_registry, cache_dir=False)
    with pytest.raises(NodeFailed) as info:
        engine.run(wf(m={"type": "StubMisbehave", "params": {"how": "string"}},
                      o={"type": "StubAdd", "inputs": {"a": "m.x"}}), targets=["o"])
    assert info.value.node_id == "m" and "returned output 'x' as a str" in str(info.value)
    with pytest.raises(NodeFailed) as info:
        engine.run(wf(s=SRC, t={"type": "StubTwoOut", "inputs": {"a": "s.x"}},
                      o={"type": "StubSink", "inputs": {"a": "t.low"}}))
    assert info.value.node_id == "t" and "'top'" in str(info.value) and "'high'" in str(info.value)


def test_json_is_one_document_in_every_outcome(tmp_path):
    workflow = write(tmp_path, wf(m={"type": "StubMisbehave", "params": {"how": "print"}},
                                  o={"type": "StubSink", "inputs": {"a": "m.x"}}))
    (tmp_path / "afile").write_text("")
    cases = {
        "prints": (["run", str(workflow)], 0),
        "usage": (["run", str(workflow), "--no-such-option"], 2),
        "device": (["run", str(workflow), "--device", "cuda"], 2),
        "cache is a file": (["run", str(workflow), "--cache-dir", str(tmp_path / "afile")], 2),
        "missing workflow": (["validate", str(tmp_path / "none.json")], 2),
    }
    for name, (args, code) in cases.items():
        done = cli(*args, "--json", "--out", str(tmp_path / "out")) if args[0] == "run" else cli(*args, "--json")
        assert done.returncode == code, (name, done.stderr)
        document = one_document(done)
        assert document["exit"] == code and document["ok"] == (code == 0), name
        assert "Traceback" not in done.stderr, name
    assert "STUB SAYS HELLO" in cli("run", str(workflow), "--json", "--out", str(tmp_path / "o2")).stderr


def test_bare_command_version_and_one_node():
    from nodegraph import __version__

    bare = subprocess.run([sys.executable, "-m", "nodegraph.cli"], capture_output=True, text=True, timeout=60)
    assert bare.returncode == 0 and "usage: nodegraph" in bare.stdout and "run" in bare.stdout
    version = subprocess.run([sys.executable, "-m", "nodegraph.cli", "--version"], capture_output=True, text=True)
    assert version.stdout.strip() == f"nodegraph {__version__}"
    one = cli("nodes", "MaskBlur")
    assert one.returncode == 0 and one.stdout.startswith("MaskBlur v") and "MaskGrow" not in one.stdout
    typo = cli("nodes", "MaskBlurr")
    assert typo.returncode == 2 and "did you mean MaskBlur" in typo.stderr


def _start(tmp_path, workflow, extra_env=None):
    env = {**os.environ, "PYTHONPATH": str(REPO), **(extra_env or {})}
    return subprocess.Popen([sys.executable, "-m", "nodegraph.cli", "run", str(workflow), "--json", "--out",
                             str(tmp_path / "out"), "--plugins", str(STUB_PLUGINS)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _wait_for(path, proc, seconds=60):
    deadline = time.time() + seconds
    while not path.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert path.exists(), proc.communicate()[1]


def test_sigterm_is_handled_like_ctrl_c(tmp_path):
    steps = {"type": "StubSteps", "inputs": {"a": "s.x"}, "params": {"steps": 400, "delay": 0.05}}
    workflow = write(tmp_path, wf(s=SRC, steps=steps, o={"type": "StubWrite", "inputs": {"a": "steps.x"}}))
    proc = _start(tmp_path, workflow)
    deadline = time.time() + 60
    while not (tmp_path / "out").exists() and time.time() < deadline:
        time.sleep(0.2)
        if proc.poll() is not None:
            break
        if time.time() > deadline - 55:  # give imports a head start, then stop it
            proc.send_signal(signal.SIGTERM)
            break
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert json.loads(out)["exit"] == 130 and "SIGTERM" in err and "Traceback" not in err
    assert not (tmp_path / "out" / "result.txt").exists()


def test_a_second_ctrl_c_during_a_long_node_is_not_lost(tmp_path):
    started = tmp_path / "started"
    workflow = write(tmp_path, wf(s=SRC, slow={"type": "StubStubborn", "inputs": {"a": "s.x"},
                                               "params": {"seconds": 3}},
                                  o={"type": "StubWrite", "inputs": {"a": "slow.x"}}))
    proc = _start(tmp_path, workflow, {"STUB_STARTED": str(started)})
    _wait_for(started, proc)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)  # swallowed by the node, which then finishes
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    document = json.loads(out)
    assert not document["ok"] and document["exit"] == 130
    assert not (tmp_path / "out" / "result.txt").exists()  # the output node after it never ran


COUNTER = """
import os, pathlib, time
import torch
from nodegraph import node

@node("Count", category="test", outputs={"x": "NUMBER"})
def count(n: int = 100) -> torch.Tensor:
    \"\"\"Counts to n slowly; a Ctrl-C ends the count early, as some libraries' loops do.\"\"\"
    pathlib.Path(os.environ["COUNT_STARTED"]).write_text("x")
    total = 0
    try:
        for _ in range(n):
            time.sleep(0.05)
            total += 1
    except KeyboardInterrupt:
        pass
    return torch.full((2,), float(total))
"""


@pytest.mark.parametrize("stops", [1, 2])
def test_a_node_cut_short_by_ctrl_c_is_not_cached_one_that_finished_is(tmp_path, stops):
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "counter.py").write_text(COUNTER)
    started = tmp_path / "started"
    workflow = write(tmp_path, wf(c={"type": "Count", "params": {"n": 40}},
                                  o={"type": "StubWrite", "inputs": {"a": "c.x"}}))
    env = {**os.environ, "PYTHONPATH": str(REPO), "COUNT_STARTED": str(started)}
    command = [sys.executable, "-m", "nodegraph.cli", "run", str(workflow), "--json", "--out", str(tmp_path / "out"),
               "--cache-dir", str(tmp_path / "cache"), "--plugins", str(plugins), "--plugins", str(STUB_PLUGINS)]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    _wait_for(started, proc)
    proc.send_signal(signal.SIGINT)  # the first asks for a stop after the node, which finishes its count
    if stops == 2:
        time.sleep(0.3)
        proc.send_signal(signal.SIGINT)  # the second is raised in the node, which catches it and stops counting
    proc.communicate(timeout=60)
    assert proc.returncode == 130
    again = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    assert again.returncode == 0, again.stderr
    # finished work is kept across the Ctrl-C; a count cut short is never served
    assert json.loads(again.stdout)["nodes"]["c"]["status"] == ("cached" if stops == 1 else "ran")
    assert (tmp_path / "out" / "result.txt").read_text() == "40.0 40.0"


def test_ctrl_c_while_starting_up_is_one_line(tmp_path):
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    started = tmp_path / "loading"
    (plugins / "slow.py").write_text(  # a plugin with slow imports: start-up takes a while
        f"import pathlib, time\npathlib.Path({str(started)!r}).write_text('x')\ntime.sleep(20)\n")
    workflow = write(tmp_path, wf(s=SRC, o={"type": "StubSink", "inputs": {"a": "s.x"}}))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "nodegraph.cli", "run", str(workflow), "--plugins", str(plugins)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    _wait_for(started, proc)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert err.strip().splitlines() == [f"nodegraph: interrupted while loading plugin 'slow' ({plugins / 'slow.py'})"]


def test_outputs_are_freed_once_every_reader_ran(stub_registry):
    sunk = stub_module().SUNK
    engine = Engine(registry=stub_registry, cache_dir=False, memory_budget=0)
    engine.run(wf(t={"type": "StubTracked"}, add={"type": "StubAdd", "inputs": {"a": "t.x"}},
                  alive={"type": "StubAlive", "inputs": {"a": "add.x"}},
                  o={"type": "StubSink", "inputs": {"a": "alive.x"}}))
    assert ("alive", False) in sunk
    sunk.clear()
    kept = Engine(registry=stub_registry, cache_dir=False)  # within the memory budget it stays cached
    kept.run(wf(t={"type": "StubTracked"}, add={"type": "StubAdd", "inputs": {"a": "t.x"}},
                alive={"type": "StubAlive", "inputs": {"a": "add.x"}},
                o={"type": "StubSink", "inputs": {"a": "alive.x"}}))
    assert ("alive", True) in sunk


def test_node_limit_is_checked_before_groups_expand(stub_registry):
    group = {"inputs": {"x": "NUMBER"}, "outputs": {"x": "n0.x"}, "feedback": {"x": "x"},
             "nodes": {f"n{i}": {"type": "StubAdd", "inputs": {"a": "in.x"}} for i in range(200)}}
    workflow = {"format": "nodegraph/1", "groups": {"g": group},
                "nodes": {"s": SRC, "big": {"type": "group:g", "inputs": {"x": "s.x"}, "params": {"repeat": 1000}},
                          "o": {"type": "StubSink", "inputs": {"a": "big.x"}}}}
    started = time.perf_counter()
    (issue,) = Engine(registry=stub_registry, cache_dir=False).validate(workflow)
    assert time.perf_counter() - started < 5  # nothing was expanded
    assert issue.code == "too_many_nodes" and "200,002" in issue.message and "'big' makes 200,000" in issue.message
    roomy = Engine(registry=stub_registry, cache_dir=False, limits=Limits(max_nodes=300_000))
    workflow["nodes"]["big"]["params"]["repeat"] = 3
    assert roomy.validate(workflow) == []


def test_pixel_limit_on_decode(tmp_path, stub_registry):
    workflow = {"format": "nodegraph/1", "nodes": {
        "load": {"type": "LoadImage", "params": {"path": str(REPO / "tests" / "data" / "chelsea_128.png")}},
        "save": {"type": "SaveImage", "inputs": {"image": "load.image"}}}}
    small = Engine(registry=stub_registry, cache_dir=False, limits=Limits(max_pixels=64 * 64))
    with pytest.raises(NodeFailed, match="larger than the limit of 4,096"):
        small.run(workflow, out_dir=tmp_path)


def test_pixel_limit_on_images_nodes_create(tmp_path, stub_registry):
    """A small file and a small workflow may still ask for a huge image: refused before it is made."""
    workflow = {"format": "nodegraph/1", "nodes": {
        "load": {"type": "LoadImage", "params": {"path": str(REPO / "tests" / "data" / "astronaut_96.png")}},
        "big": {"type": "ImageResize", "inputs": {"image": "load.image"}, "params": {"width": 4096, "height": 4096}},
        "grow": {"type": "ExpandCanvas", "inputs": {"image": "load.image"},
                 "params": {"expand_pixels": 8000, "max_size": 0}},
        "save": {"type": "SaveImage", "inputs": {"image": "big.image"}},
        "save2": {"type": "SaveImage", "inputs": {"image": "grow.image"}}}}
    engine = Engine(registry=stub_registry, cache_dir=False, limits=Limits(max_pixels=500_000))
    for target in ("big", "grow"):
        with pytest.raises(NodeFailed, match="larger than the limit of 500,000") as info:
            engine.run(workflow, targets=[target], out_dir=tmp_path)
        assert info.value.node_id == target
    (issue,) = engine.validate({"format": "nodegraph/1", "nodes": {
        "m": {"type": "MaskShape", "params": {"width": 1024, "height": 1024}}}}, targets=["m"])
    assert (issue.node_id, issue.field) == ("m", "width") and "larger than the limit" in issue.message


def test_two_runs_at_once_on_one_engine_match_running_them_in_turn(stub_registry):
    steps = lambda value: wf(s={"type": "StubSource", "params": {"value": value}},  # noqa: E731
                             st={"type": "StubSteps", "inputs": {"a": "s.x"}, "params": {"steps": 20, "delay": 0.01}},
                             r={"type": "StubRecord", "params": {"value": value}},
                             add={"type": "StubAdd", "inputs": {"a": "st.x", "b": "r.x"}},
                             o={"type": "StubSink", "inputs": {"a": "add.x"}})
    alone = [Engine(registry=stub_registry, cache_dir=False).run(steps(v)) for v in (3, 5)]
    engine = Engine(registry=stub_registry, cache_dir=False)
    results = {}
    gc.enable()
    threads = [threading.Thread(target=lambda v=v: results.__setitem__(v, engine.run(steps(v)))) for v in (3, 5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for value, single in zip((3, 5), alone):
        together = results[value]
        assert together.outputs["o"]["x"].tolist() == single.outputs["o"]["x"].tolist()
        assert together.info == single.info == {"seeds": {"r": value}}  # no run saw the other's facts
    assert gc.isenabled()  # overlapping runs leave the collector on


def test_the_collector_pause_is_counted_across_threads():
    from nodegraph.gcpause import gc_paused

    gc.enable()
    first, second = gc_paused(), gc_paused()
    first.__enter__()
    second.__enter__()
    assert not gc.isenabled()
    first.__exit__(None, None, None)  # ends first although it started first: still paused
    assert not gc.isenabled()
    second.__exit__(None, None, None)
    assert gc.isenabled()


def test_random_seed_is_drawn_once_per_run_recorded_and_saved(stub_registry, tmp_path):
    workflow = wf(seed={"type": "Seed"}, m={"type": "IntMath", "inputs": {"a": "seed.seed"}, "params": {"b": 0}})
    engine = Engine(registry=stub_registry, cache_dir=False)
    first, second = (engine.run(workflow, targets=["m"]) for _ in range(2))
    drawn = first.info["random"]["seed"]["seed"]
    assert first.outputs["m"]["value"] == drawn != second.outputs["m"]["value"]
    fixed = [engine.run(workflow, targets=["m"], overrides={"seed.seed": 7}) for _ in range(2)]
    assert fixed[1].status == {"seed": "skipped", "m": "cached"} and fixed[1].outputs["m"]["value"] == 7
    with pytest.raises(WorkflowInvalid):
        engine.compile(workflow, overrides={"seed.seed": "sometimes"})


def test_writers_on_a_file_system_without_hard_links_never_overwrite_each_other(tmp_path, monkeypatch):
    # FAT/exFAT drives and some network shares have no hard links: the numbered name is taken another way,
    # and a second process choosing the same number at the same moment must not replace the first's image.
    import errno

    from nodegraph import atomic

    def no_links(src, dst):
        raise OSError(errno.EPERM, "hard links are not supported here")

    real_replace = os.replace
    state = {"raced": False}

    def replace(src, dst):
        if not state["raced"]:  # the other writer runs between this one's choice of a name and its rename
            state["raced"] = True
            atomic.write_new_numbered(tmp_path, lambda i: f"img_{i:05d}.png", 1, lambda h: h.write(b"second"))
        real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "link", no_links)
    monkeypatch.setattr(atomic.os, "replace", replace)
    atomic.write_new_numbered(tmp_path, lambda i: f"img_{i:05d}.png", 1, lambda h: h.write(b"first"))
    assert sorted(p.read_bytes() for p in tmp_path.glob("img_*.png")) == [b"first", b"second"]
    assert not list(tmp_path.glob("*.ngtmp"))
