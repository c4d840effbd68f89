"""The cache never serves a wrong result and never fills the disk."""
import json
import os
import resource
import subprocess
import sys

import pytest
import torch

from nodegraph.api import Engine
from nodegraph.cache import DiskCache

from .conftest import REPO, STUB_PLUGINS, stub_module
from .test_hardening_input import cli, write


def wf(**nodes):
    return {"format": "nodegraph/1", "nodes": nodes}


def sink(src):
    return {"type": "StubSink", "inputs": {"a": src}}


def test_a_file_size_limit_warns_once_and_the_run_completes(tmp_path):
    workflow = write(tmp_path, wf(big={"type": "StubBig", "params": {"size": 200_000}},
                                  add={"type": "StubAdd", "inputs": {"a": "big.x"}},
                                  o={"type": "StubWrite", "inputs": {"a": "add.x"}, "params": {"name": "r.txt", "head": 3}}))

    def limit():  # like a full disk: the first large write fails (EFBIG; SIGXFSZ is ignored by the CLI)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "nodegraph.cli", "run", str(workflow), "--cache-dir",
                           str(tmp_path / "cache"), "--out", str(tmp_path / "out"), "--plugins", str(STUB_PLUGINS)],
                          capture_output=True, text=True, env=env, preexec_fn=limit, timeout=120)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "out" / "r.txt").stat().st_size > 0
    warnings = [line for line in done.stderr.splitlines() if "cannot store" in line]
    assert len(warnings) == 1 and "Traceback" not in done.stderr
    assert not list((tmp_path / "cache").rglob("*.ngtmp"))


def test_a_value_safetensors_refuses_is_not_stored(stub_registry, tmp_path):
    engine = Engine(registry=stub_registry, cache_dir=tmp_path / "cache")
    with pytest.warns(UserWarning, match="cannot store"):
        result = engine.run(wf(s={"type": "StubSource"}, sp={"type": "StubSparse", "inputs": {"a": "s.x"}},
                               o=sink("sp.x")))
    assert result.status["o"] == "ran"


def test_a_file_changed_during_the_run_is_not_cached_under_its_old_content(stub_registry, tmp_path):
    mine, read = tmp_path / "mine.txt", tmp_path / "read.txt"
    mine.write_text("1")
    read.write_text("1")
    workflow = wf(w={"type": "StubRewriteOther", "params": {"path": str(mine), "target": str(read), "text": "9"}},
                  r={"type": "StubReadAfter", "inputs": {"after": "w.x"}, "params": {"path": str(read)}},
                  o=sink("r.x"))
    engine = Engine(registry=stub_registry, cache_dir=tmp_path / "cache")
    with pytest.warns(UserWarning, match="changed while the run read it"):
        first = engine.run(workflow)
    assert first.outputs["o"]["x"].tolist() == [9.0, 9.0]  # read after the change, keyed by "1"
    read.write_text("1")
    second = engine.run(workflow)  # w comes from the cache and writes nothing now
    assert second.status["r"] == "ran"  # never served the 9 made under the key of "1"
    assert second.outputs["o"]["x"].tolist() == [1.0, 1.0]
    third = Engine(registry=stub_registry, cache_dir=tmp_path / "cache").run(workflow)
    assert third.outputs["o"]["x"].tolist() == [1.0, 1.0]  # the disk holds only what "1" really gives


def test_an_edit_that_keeps_size_and_mtime_is_a_new_key(stub_registry, tmp_path):
    path = tmp_path / "n.txt"
    path.write_text("1")
    before = path.stat()
    workflow = wf(r={"type": "StubReadFile", "params": {"path": str(path)}}, o=sink("r.x"))
    engine = Engine(registry=stub_registry, cache_dir=tmp_path / "cache")
    assert engine.run(workflow).outputs["o"]["x"].tolist() == [1.0, 1.0]
    path.write_text("2")
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert path.stat().st_size == before.st_size and path.stat().st_mtime_ns == before.st_mtime_ns
    assert engine.run(workflow).outputs["o"]["x"].tolist() == [2.0, 2.0]
    fresh = Engine(registry=stub_registry, cache_dir=tmp_path / "cache")
    assert fresh.run(workflow).outputs["o"]["x"].tolist() == [2.0, 2.0]


def test_nan_and_both_infinities_are_three_keys(stub_registry):
    engine = Engine(registry=stub_registry, cache_dir=False)
    calls = stub_module().CALLS
    outs = []
    for value in (float("nan"), float("inf"), float("-inf"), float("inf")):
        outs.append(engine.run(wf(f={"type": "StubAnyFloat", "params": {"value": value}}, o=sink("f.x"))))
    assert calls["StubAnyFloat"] == 3 and outs[3].status["f"] == "skipped"
    assert [o.outputs["o"]["x"][0].item() for o in outs[1:]] == [float("inf"), float("-inf"), float("inf")]


def _entry(cache_dir):
    (entry,) = [p for p in cache_dir.rglob("*.safetensors")]
    return entry


@pytest.mark.parametrize("damage", ["flip", "append", "shape"])
def test_an_altered_disk_entry_is_detected_and_recomputed(stub_registry, tmp_path, damage):
    workflow = wf(s={"type": "StubSource", "params": {"value": 3}}, o=sink("s.x"))
    Engine(registry=stub_registry, cache_dir=tmp_path / "c").run(workflow, targets=["s"])
    entry = _entry(tmp_path / "c")
    data = bytearray(entry.read_bytes())
    if damage == "flip":
        data[-1] ^= 0x40
    elif damage == "append":
        data += b"garbage"
    else:  # a consistent header claiming another shape: [2] -> [1, 2]
        data = bytearray(bytes(data).replace(b'"shape":[2]', b'"shape":[1,2]'))
    entry.write_bytes(bytes(data))
    result = Engine(registry=stub_registry, cache_dir=tmp_path / "c").run(workflow, targets=["s"])
    assert result.status["s"] == "ran" and result.outputs["s"]["x"].tolist() == [3.0, 3.0]


def test_an_entry_moved_under_another_key_is_not_served(stub_registry, tmp_path):
    # Two whole, undamaged entries exchanged (a sync tool or a hand copy): each is some other node's result.
    runs = {}
    for value in (3, 4):
        before = set((tmp_path / "c").rglob("*.safetensors"))
        Engine(registry=stub_registry, cache_dir=tmp_path / "c").run(
            wf(s={"type": "StubSource", "params": {"value": value}}, o=sink("s.x")), targets=["s"])
        (runs[value],) = set((tmp_path / "c").rglob("*.safetensors")) - before
    three, four = runs[3].read_bytes(), runs[4].read_bytes()
    runs[3].write_bytes(four)
    runs[4].write_bytes(three)
    result = Engine(registry=stub_registry, cache_dir=tmp_path / "c").run(
        wf(s={"type": "StubSource", "params": {"value": 3}}, o=sink("s.x")), targets=["s"])
    assert result.status["s"] == "ran" and result.outputs["s"]["x"].tolist() == [3.0, 3.0]


def test_temporary_files_of_a_killed_run_are_cleaned_up(stub_registry, tmp_path):
    from nodegraph.atomic import temp_path

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    cache, out = tmp_path / "cache", tmp_path / "out"
    Engine(registry=stub_registry, cache_dir=cache).run(wf(s={"type": "StubSource"}, o=sink("s.x")), targets=["s"])
    folder = next(p for p in cache.iterdir() if p.is_dir())
    out.mkdir()
    leftovers = []
    for where in (folder, out):
        mine = temp_path(where, "x.png")
        leftover = mine.with_name(mine.name.replace(f".{os.getpid()}.", f".{dead.pid}."))
        leftover.write_bytes(b"half")
        leftovers.append(leftover)
    live = temp_path(out, "other.png")  # a live writer's (this process's) file stays
    live.write_bytes(b"busy")
    import nodegraph.atomic as atomic

    atomic._cleaned.clear()  # as in a new process
    engine = Engine(registry=stub_registry, cache_dir=cache)
    engine.run(wf(s={"type": "StubSource", "params": {"value": 5}}, o=sink("s.x")), targets=["s"])
    engine.run({"format": "nodegraph/1", "nodes": {
        "load": {"type": "LoadImage", "params": {"path": str(REPO / "tests" / "data" / "astronaut_96.png")}},
        "save": {"type": "SaveImage", "inputs": {"image": "load.image"}}}}, out_dir=out)
    assert not any(p.exists() for p in leftovers) and live.exists()


def test_a_change_to_a_node_s_code_invalidates_its_results(tmp_path):
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    source = ("from nodegraph import node\nimport torch\n"
              "@node('Constant', outputs={'x': 'NUMBER'})\ndef constant() -> object:\n"
              "    '''A constant.'''\n    return torch.full((2,), VALUE)\nVALUE = 1.0\n")
    (plugins / "mine.py").write_text(source)
    workflow = write(tmp_path, wf(c={"type": "Constant"}, o={"type": "StubWrite", "inputs": {"a": "c.x"}}))
    args = ["run", str(workflow), "--json", "--cache-dir", str(tmp_path / "cache"), "--plugins", str(plugins)]
    first = json.loads(cli(*args, "--out", str(tmp_path / "a")).stdout)
    again = json.loads(cli(*args, "--out", str(tmp_path / "b")).stdout)
    assert first["nodes"]["c"]["status"] == "ran" and again["nodes"]["c"]["status"] == "cached"
    (plugins / "mine.py").write_text(source.replace("VALUE = 1.0", "VALUE = 2.0"))
    changed = json.loads(cli(*args, "--out", str(tmp_path / "c")).stdout)
    assert changed["nodes"]["c"]["status"] == "ran"
    assert (tmp_path / "c" / "result.txt").read_text() == "2.0 2.0"


def test_library_versions_are_what_is_installed():
    import cv2
    from importlib import metadata

    from nodegraph.versions import LIBRARIES, library_versions

    found = library_versions()
    opencv = next(d for d in LIBRARIES["opencv"] if _installed(metadata, d))
    assert found["opencv"].split()[0] == metadata.version(opencv)
    assert found["opencv"].startswith(cv2.__version__)
    assert found["torch"] == torch.__version__


def _installed(metadata, name):
    try:
        metadata.version(name)
        return True
    except metadata.PackageNotFoundError:
        return False


def test_the_disk_cache_keeps_to_its_size_limit_least_recently_used_first(tmp_path):
    cache = DiskCache(tmp_path / "c", max_bytes=70_000)
    keys = [f"{i:02d}" + "0" * 62 for i in range(6)]
    for key in keys[:4]:
        assert cache.put(key, {"x": torch.zeros(4000)})  # about 16 KB each
        os.utime(cache._path(key), (1000 + int(key[:2]), 1000 + int(key[:2])))
    assert cache.get(keys[0]) is not None  # used: now the most recent
    cache.put(keys[4], {"x": torch.zeros(4000)})
    assert cache.info()["bytes"] <= 70_000
    assert cache.get(keys[1]) is None and cache.get(keys[0]) is not None and cache.get(keys[4]) is not None


def test_cache_command_info_prune_clear(tmp_path):
    cache = DiskCache(tmp_path / "c")
    for i in range(3):
        cache.put(f"{i:02d}" + "a" * 62, {"x": torch.zeros(1000)})
    (tmp_path / "c" / "keep-me.txt").write_text("not ours")
    env = {**os.environ, "PYTHONPATH": str(REPO)}

    def cache_cli(*args):
        return subprocess.run([sys.executable, "-m", "nodegraph.cli", "cache", *args, "--cache-dir",
                               str(tmp_path / "c"), "--json"], capture_output=True, text=True, env=env, timeout=60)

    info = json.loads(cache_cli("info").stdout)["cache"]
    assert info["entries"] == 3 and info["bytes"] > 12_000
    pruned = json.loads(cache_cli("prune", "--cache-size", "9000").stdout)["cache"]
    assert pruned["bytes"] <= 9000 and pruned["entries"] < 3
    cleared = json.loads(cache_cli("clear").stdout)["cache"]
    assert cleared["entries"] == 0 and (tmp_path / "c" / "keep-me.txt").exists()


def test_the_disk_cache_is_on_by_default_in_the_user_cache_folder(tmp_path):
    workflow = write(tmp_path, wf(s={"type": "StubSource"}, o={"type": "StubWrite", "inputs": {"a": "s.x"}}))
    env = {k: v for k, v in os.environ.items() if k != "NODEGRAPH_CACHE_DIR"}
    env.update(PYTHONPATH=str(REPO), XDG_CACHE_HOME=str(tmp_path / "xdg"))
    run = [sys.executable, "-m", "nodegraph.cli", "run", str(workflow), "--json", "--plugins", str(STUB_PLUGINS)]
    first = subprocess.run([*run, "--out", str(tmp_path / "a")], capture_output=True, text=True, env=env, timeout=60)
    second = subprocess.run([*run, "--out", str(tmp_path / "b")], capture_output=True, text=True, env=env, timeout=60)
    assert json.loads(second.stdout)["nodes"]["s"]["status"] == "cached", first.stderr
    assert list((tmp_path / "xdg" / "nodegraph" / "results").rglob("*.safetensors"))
    off = subprocess.run([*run, "--out", str(tmp_path / "c"), "--no-cache"], capture_output=True, text=True, env=env)
    assert json.loads(off.stdout)["nodes"]["s"]["status"] == "ran"


def test_a_fifo_in_place_of_an_entry_is_a_miss_not_a_hang(tmp_path):
    import threading

    cache = DiskCache(tmp_path / "c")
    key = "ab" + "0" * 62
    assert cache.put(key, {"x": torch.zeros(4)})
    cache.put_facts(key, {"seeds": {"n": 1}})
    for path in (cache._path(key), cache._path(key).with_suffix(".facts.json")):
        path.unlink()
        os.mkfifo(path)  # opened for reading, a FIFO with no writer would block forever
    got = []
    reader = threading.Thread(target=lambda: got.extend([cache.get(key), cache.get_facts(key)]), daemon=True)
    reader.start()
    reader.join(timeout=30)
    assert not reader.is_alive() and got == [None, None]


def test_cached_results_replay_their_manifest_facts(stub_registry, tmp_path):
    workflow = wf(r={"type": "StubRecord", "params": {"value": 4}}, o=sink("r.x"))
    engine = Engine(registry=stub_registry, cache_dir=tmp_path / "cache")
    ran = engine.run(workflow)
    cached = engine.run(workflow)
    across = Engine(registry=stub_registry, cache_dir=tmp_path / "cache").run(workflow)
    assert cached.status["r"] in ("cached", "skipped") and across.status["r"] in ("cached", "skipped")
    assert ran.info == cached.info == across.info == {"seeds": {"r": 4}}


def test_a_long_running_engine_sees_the_facts_another_process_stored(stub_registry, tmp_path):
    # a server (one long-lived Engine) and a batch or CLI run beside it share the disk cache
    server = Engine(registry=stub_registry, cache_dir=tmp_path / "cache")
    first = wf(r={"type": "StubRecord", "params": {"value": 1}}, o=sink("r.x"))
    server.run(first)
    assert server.run(first).info == {"seeds": {"r": 1}}  # from the cache: the facts on disk are listed now
    workflow = wf(r={"type": "StubRecord", "params": {"value": 4}}, a={"type": "StubAdd", "inputs": {"a": "r.x"}},
                  o=sink("a.x"))
    Engine(registry=stub_registry, cache_dir=tmp_path / "cache").run(workflow)  # the other process
    served = server.run(workflow)
    assert served.status["a"] == "cached" and served.status["r"] == "skipped"  # "r" is cut off, not even read
    assert served.info == {"seeds": {"r": 4}}


def test_processes_sharing_a_cache_keep_it_within_its_limit_together(tmp_path):
    # Batch workers and a server each hold their own DiskCache on one folder; each counts only its own
    # writes after its first, so the others' writes must still be seen before the folder runs past the limit.
    limit = 400_000
    workers = [DiskCache(tmp_path / "c", max_bytes=limit) for _ in range(4)]
    for i in range(80):
        workers[i % 4].put(f"{i:064x}", {"x": torch.zeros(10_000)})  # 40 kB each
        total = sum(p.stat().st_size for p in (tmp_path / "c").rglob("*.safetensors"))
        assert total <= limit * 1.2, (i, total)
