"""Edges found by trying to break the hardened engine: stale models, implied files, plugin checks, altered
cache metadata, facts kept with their results, overrides on broken nodes, odd paths, signals at start-up."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from nodegraph.api import Engine
from nodegraph.cache import DiskCache
from nodegraph.errors import Interrupted, NodeFailed, WorkflowInvalid
from nodegraph.limits import Limits

from .conftest import REPO
from .test_hardening_input import cli, write


def wf(**nodes):
    return {"format": "nodegraph/1", "nodes": nodes}


def sampling(path, **extra):
    return wf(ckpt={"type": "LoadCheckpoint", "params": {"path": str(path), **extra}},
              pos={"type": "CLIPEncode", "inputs": {"clip": "ckpt.clip"}, "params": {"text": "a cat"}},
              empty={"type": "EmptyLatent", "params": {"width": 32, "height": 32}},
              s={"type": "Sampler", "inputs": {"model": "ckpt.model", "positive": "pos.conditioning",
                                               "latent": "empty.latent"}, "params": {"seed": 3, "steps": 2}})


def edit_scheduler(folder):
    config = folder / "scheduler" / "scheduler_config.json"
    data = json.loads(config.read_text())
    data["beta_end"] = data["beta_end"] * 1.5
    config.write_text(json.dumps(data))


def test_an_edited_checkpoint_folder_is_loaded_again(tiny, tmp_path):
    folder = shutil.copytree(tiny.sd15, tmp_path / "model")
    engine = Engine(cache_dir=False)
    before = engine.run(sampling(folder), targets=["s"]).outputs["s"]["latent"].samples
    edit_scheduler(folder)
    after = engine.run(sampling(folder), targets=["s"]).outputs["s"]["latent"].samples
    assert not torch.equal(before, after)  # not the model loaded from the old config
    from nodegraph.nodes.models import clear_loaded_models

    clear_loaded_models()
    fresh = Engine(cache_dir=False).run(sampling(folder), targets=["s"]).outputs["s"]["latent"].samples
    assert torch.equal(after, fresh)


def test_a_single_file_s_sidecar_config_is_in_its_key(tiny, tmp_path):
    single = tmp_path / "single"
    single.mkdir()
    file = shutil.copy(tiny.sd15_file, single / tiny.sd15_file.name)
    shutil.copytree(tiny.sd15_file_config, single / tiny.sd15_file_config.name)
    workflow = sampling(file)
    first = Engine(cache_dir=tmp_path / "cache").run(workflow, targets=["s"])
    assert Engine(cache_dir=tmp_path / "cache").run(workflow, targets=["s"]).status["s"] == "cached"
    edit_scheduler(single / tiny.sd15_file_config.name)
    again = Engine(cache_dir=tmp_path / "cache").run(workflow, targets=["s"])
    assert again.status["s"] == "ran"
    assert not torch.equal(again.outputs["s"]["latent"].samples, first.outputs["s"]["latent"].samples)


@pytest.mark.parametrize("body, words", [("import sys; sys.exit(0)", "SystemExit"),
                                         ("raise ValueError('oops')", "ValueError: oops")])
def test_a_plugin_check_that_raises_is_that_node_s_problem(tmp_path, body, words):
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "checky.py").write_text(
        "from nodegraph import node\n"
        f"def bad(params):\n    {body}\n    yield 'x', 'y'\n"
        "@node('Checky', outputs={'x': 'INT'}, check=bad, output=True)\n"
        "def checky(value: int = 1) -> int:\n    '''A node whose check fails.'''\n    return value\n")
    workflow = write(tmp_path, wf(c={"type": "Checky"}))
    done = cli("validate", str(workflow), "--json", "--plugins", str(plugins))
    document = json.loads(done.stdout)
    assert done.returncode == 2 and document["exit"] == 2, done.stderr
    (error,) = document["errors"]
    assert (error["code"], error["node_id"]) == ("check_failed", "c") and words in error["message"]


def test_the_digest_covers_the_stored_structure(stub_registry, tmp_path):
    workflow = wf(s={"type": "StubSource", "params": {"value": 3}}, p={"type": "StubPair", "inputs": {"a": "s.x"}},
                  o={"type": "StubSink", "inputs": {"a": "p.low"}})
    Engine(registry=stub_registry, cache_dir=tmp_path / "c").run(workflow, targets=["p"])
    (entry,) = [e for e in (tmp_path / "c").rglob("*.safetensors") if b'\\"$t\\":\\"1\\"' in e.read_bytes()]
    data = entry.read_bytes()
    swapped = data.replace(b'{\\"$t\\":\\"0\\"}', b'{\\"$t\\":\\"X\\"}').replace(b'{\\"$t\\":\\"1\\"}', b'{\\"$t\\":\\"0\\"}')
    swapped = swapped.replace(b'{\\"$t\\":\\"X\\"}', b'{\\"$t\\":\\"1\\"}')
    assert swapped != data
    entry.write_bytes(swapped)
    again = Engine(registry=stub_registry, cache_dir=tmp_path / "c").run(workflow, targets=["p"])
    assert again.status["p"] == "ran" and again.outputs["p"]["low"].tolist() == [2.0, 2.0]
    header = json.dumps([1, 2]).encode()  # a header that is a list, not an object: damage, not a crash
    entry.write_bytes(len(header).to_bytes(8, "little") + header)
    assert DiskCache(tmp_path / "c").get(entry.stem) is None and not entry.exists()


def test_facts_live_and_go_with_their_result(stub_registry, tmp_path):
    cache = DiskCache(tmp_path / "c", max_bytes=40_000)
    keys = [f"{i:02d}" + "f" * 62 for i in range(4)]
    for i, key in enumerate(keys):
        cache.put(key, {"x": torch.zeros(3000)})
        cache.put_facts(key, {"seeds": i})
        for path in (cache._path(key), cache._path(key).with_suffix(".facts.json")):
            os.utime(path, (1000 + i, 1000 + i))
        if i == 1:
            assert cache.get(keys[0]) is not None  # using the result keeps its facts too
    survivors = {p.name[:64] for p in (tmp_path / "c").rglob("*") if p.is_file() and p.name[:2].isdigit()}
    for key in keys:
        has_result = cache._path(key).exists()
        assert has_result == cache._path(key).with_suffix(".facts.json").exists()  # together, or neither
    assert keys[0] in survivors and keys[1] not in survivors
    assert cache.get_facts(keys[0]) == {"seeds": 0}


def test_an_override_of_a_malformed_node_hides_nothing(stub_registry):
    workflow = wf(s={"type": "StubSource", "parms": {}}, o={"type": "StubSink", "inputs": {"a": "s.x"}})
    issues = Engine(registry=stub_registry, cache_dir=False).validate(workflow, overrides={"s.value": 3},
                                                                     targets=["s"])
    assert [(i.code, i.node_id, i.field) for i in issues] == [("bad_structure", "s", "parms")]


def test_odd_paths_are_usage_errors(tmp_path):
    long = "x" * 300
    workflow = write(tmp_path, wf(s={"type": "StubSource"}, o={"type": "StubWrite", "inputs": {"a": "s.x"}}))
    for args in (["--cache-dir", str(tmp_path / long)], ["--out", str(tmp_path / long)]):
        done = cli("run", str(workflow), "--json", *args)
        assert done.returncode == 2 and "too long" in json.loads(done.stdout)["error"], done.stderr
        assert "Traceback" not in done.stderr
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    started = time.time()
    done = cli("validate", str(fifo), timeout=60)
    assert done.returncode == 2 and "FIFO" in done.stderr and time.time() - started < 30
    assert cli("validate", "/dev/zero").returncode == 2


def test_a_remembered_workflow_whose_file_became_a_fifo_is_refused(stub_registry, tmp_path):
    value = tmp_path / "n.txt"
    value.write_text("1")
    workflow = wf(r={"type": "StubReadFile", "params": {"path": str(value)}},
                  o={"type": "StubSink", "inputs": {"a": "r.x"}})
    engine = Engine(registry=stub_registry, cache_dir=False)
    engine.run(workflow)
    value.unlink()
    os.mkfifo(value)
    issues = engine.validate(workflow)
    assert [(i.code, i.node_id, i.field) for i in issues] == [("bad_file", "r", "path")]
    with pytest.raises(WorkflowInvalid):
        engine.run(workflow)


def test_joined_batches_and_crops_keep_to_the_pixel_limit(stub_registry, tmp_path):
    photo = str(REPO / "tests" / "data" / "astronaut_96.png")
    engine = Engine(registry=stub_registry, cache_dir=False, limits=Limits(max_pixels=96 * 96 * 3))
    group = {"inputs": {"images": "IMAGE"}, "outputs": {"images": "join.images"}, "feedback": {"images": "images"},
             "nodes": {"join": {"type": "ImageBatch", "inputs": {"a": "in.images", "b": "in.images"}}}}
    doubling = {"format": "nodegraph/1", "groups": {"double": group}, "nodes": {
        "load": {"type": "LoadImage", "params": {"path": photo}},
        "more": {"type": "group:double", "inputs": {"images": "load.image"}, "params": {"repeat": 4}}}}
    with pytest.raises(NodeFailed, match="the joined batch"):
        engine.run(doubling, targets=["more[4]/join"])
    (issue,) = engine.validate(wf(load={"type": "LoadImage", "params": {"path": photo}},
                                  crop={"type": "CropToMask", "inputs": {"image": "load.image", "mask": "load.mask"},
                                        "params": {"width": 512, "height": 512}}), targets=["crop"])
    assert (issue.node_id, issue.field) == ("crop", "width") and "larger than the limit" in issue.message


def test_sigterm_while_starting_up_is_one_line_and_one_document(tmp_path):
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    started = tmp_path / "loading"
    (plugins / "slow.py").write_text(f"import pathlib, time\npathlib.Path({str(started)!r}).write_text('x')\n"
                                     "time.sleep(20)\n")
    workflow = write(tmp_path, wf(s={"type": "StubSource"}, o={"type": "StubSink", "inputs": {"a": "s.x"}}))
    proc = subprocess.Popen([sys.executable, "-m", "nodegraph.cli", "run", str(workflow), "--json", "--plugins",
                             str(plugins)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    deadline = time.time() + 60
    while not started.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and json.loads(out)["exit"] == 130
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_an_interrupted_run_is_not_ok(stub_registry):
    from nodegraph.context import InterruptFlag

    flag = InterruptFlag()
    workflow = wf(s={"type": "StubSource"}, st={"type": "StubSteps", "inputs": {"a": "s.x"}, "params": {"steps": 5}},
                  o={"type": "StubSink", "inputs": {"a": "st.x"}})

    def stop(event):
        if event.step == 5:
            flag.set()  # after the sampler's last step: only the output node is left

    with pytest.raises(Interrupted) as info:
        Engine(registry=stub_registry, cache_dir=False).run(workflow, progress=stop, interrupt=flag)
    assert not info.value.result.ok and not info.value.result.to_dict()["ok"]


def test_random_in_a_repeated_group_is_one_draw_and_the_saved_workflow_reproduces_it(stub_registry, tmp_path):
    group = {"inputs": {"x": "INT"}, "outputs": {"x": "add.value"}, "feedback": {"x": "x"},
             "nodes": {"seed": {"type": "Seed", "params": {"seed": "random"}},
                       "add": {"type": "IntMath", "inputs": {"a": "in.x", "b": "seed.seed"}, "params": {"op": "max"}}}}
    workflow = {"format": "nodegraph/1", "groups": {"g": group}, "nodes": {
        "start": {"type": "Int", "params": {"value": 0}},
        "loop": {"type": "group:g", "inputs": {"x": "start.value"}, "params": {"repeat": 3}}}}
    from nodegraph.api import workflow_as_run

    engine = Engine(registry=stub_registry, cache_dir=False)
    result = engine.run(workflow, targets=["loop[3]/add"])
    draws = {v["seed"] for v in result.info["random"].values()}
    assert len(draws) == 1 and result.outputs["loop[3]/add"]["value"] == draws.pop()
    graph = engine.compile(workflow, targets=["loop[3]/add"])
    as_run = workflow_as_run(graph, {n: f["seed"] and {"seed": f["seed"]} for n, f in result.info["random"].items()})
    rerun = Engine(registry=stub_registry, cache_dir=False).run(as_run, targets=["loop[3]/add"])
    assert rerun.outputs == result.outputs and "random" not in rerun.info


def test_abbreviated_options_are_refused(tmp_path):
    workflow = write(tmp_path, wf(s={"type": "StubSource"}, o={"type": "StubSink", "inputs": {"a": "s.x"}}))
    done = cli("validate", str(workflow), "--js")
    assert done.returncode == 2 and "--js" in done.stderr
