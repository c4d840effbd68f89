"""The executor with stub nodes that count their calls: what runs, what is cached."""
import sys

import pytest
import torch

from nodegraph.api import Engine
from nodegraph.cache import MemoryCache
from nodegraph.context import InterruptFlag
from nodegraph.errors import Interrupted, NodeFailed
from nodegraph.workflow import WorkflowBuilder


def chain(n=4, first=1.0, last=1.0):
    """source -> add x n -> sink, plus an unrelated branch that no output needs."""
    b = WorkflowBuilder("chain")
    prev = source = b.add("StubSource", id="src", value=first)
    for i in range(n):
        prev = b.add("StubAdd", id=f"add{i}", a=prev["x"], amount=last if i == n - 1 else 1.0)
    b.add("StubSink", id="sink", a=prev["x"])
    b.add("StubAdd", id="unused", a=source["x"])  # feeds no output node
    return b.build()


def test_runs_only_needed_nodes_in_order(stub_registry, calls):
    engine = Engine(registry=stub_registry)
    result = engine.run(chain(), out_dir="unused")
    assert result.ran() == {"src", "add0", "add1", "add2", "add3", "sink"}
    assert "unused" not in result.nodes
    assert calls["StubAdd"] == 4
    assert list(result.nodes) == ["src", "add0", "add1", "add2", "add3", "sink"]
    assert torch.equal(result.outputs["sink"]["x"], torch.full((2,), 5.0))


def test_identical_rerun_executes_nothing(stub_registry, calls):
    engine = Engine(registry=stub_registry)
    engine.run(chain())
    calls.clear()
    result = engine.run(chain())
    assert sum(calls.values()) == 0
    assert result.ran() == set()
    assert result.status["sink"] == "cached"
    assert torch.equal(result.outputs["sink"]["x"], torch.full((2,), 5.0))


def test_param_change_at_end_reruns_only_that_node_and_output(stub_registry, calls):
    engine = Engine(registry=stub_registry)
    engine.run(chain())
    calls.clear()
    result = engine.run(chain(), overrides={"add3.amount": 10.0})
    assert result.ran() == {"add3", "sink"}
    assert result.status["add2"] == "cached"
    assert result.status["src"] == "skipped"  # its value was not needed: add2 came from the cache
    assert torch.equal(result.outputs["sink"]["x"], torch.full((2,), 14.0))


def test_param_change_at_start_reruns_everything_downstream(stub_registry, calls):
    engine = Engine(registry=stub_registry)
    engine.run(chain())
    result = engine.run(chain(), overrides={"src.value": 2.0})
    assert result.ran() == {"src", "add0", "add1", "add2", "add3", "sink"}


def test_omitted_default_and_explicit_default_share_the_key(stub_registry, calls):
    engine = Engine(registry=stub_registry)
    wf = {"format": "nodegraph/1", "nodes": {"s": {"type": "StubSource"}, "o": {"type": "StubSink", "inputs": {"a": "s.x"}}}}
    engine.run(wf)
    result = engine.run(wf, overrides={"s.value": 1.0})
    assert result.ran() == set()


def test_identical_subgraphs_share_work_whatever_their_ids(stub_registry, calls):
    b = WorkflowBuilder()
    for tag in ("left", "right"):
        s = b.add("StubSource", id=f"{tag}_src", value=3)
        a = b.add("StubAdd", id=f"{tag}_add", a=s["x"], amount=2)
        b.add("StubSink", id=f"{tag}_sink", a=a["x"])
    result = Engine(registry=stub_registry).run(b.build())
    assert calls["StubSource"] == 1 and calls["StubAdd"] == 1
    assert result.status["right_add"] == "cached" or result.status["left_add"] == "cached"


def test_multiple_outputs_and_optional_inputs(stub_registry, calls):
    b = WorkflowBuilder()
    s = b.add("StubSource", id="s", value=3)
    p = b.add("StubPair", id="p", a=s["x"])
    a = b.add("StubAdd", id="a", a=p["low"], b=p["high"], amount=0)
    b.add("StubSink", id="o", a=a["x"])
    result = Engine(registry=stub_registry).run(b.build())
    assert torch.equal(result.outputs["o"]["x"], torch.full((2,), 6.0))


def test_linked_scalar_param_and_its_runtime_check(stub_registry, calls):
    b = WorkflowBuilder()
    amount = b.add("Float", id="amount", value=2.5)
    s = b.add("StubSource", id="s")
    a = b.add("StubAdd", id="a", a=s["x"], amount=amount["value"])
    b.add("StubSink", id="o", a=a["x"])
    engine = Engine(registry=stub_registry)
    assert torch.equal(engine.run(b.build()).outputs["o"]["x"], torch.full((2,), 3.5))
    with pytest.raises(NodeFailed) as info:
        engine.run(b.build(), overrides={"amount.value": -1.0})
    assert info.value.node_id == "a" and "amount" in str(info.value) and "greater than or equal to 0" in str(info.value)


def test_uncacheable_node_reruns_with_everything_after_it(stub_registry, calls):
    wf = {"format": "nodegraph/1", "nodes": {
        "r": {"type": "StubRandom"},
        "a": {"type": "StubAdd", "inputs": {"a": "r.x"}},
        "o": {"type": "StubSink", "inputs": {"a": "a.x"}}}}
    engine = Engine(registry=stub_registry)
    engine.run(wf)
    result = engine.run(wf)
    assert result.ran() == {"r", "a", "o"}


def test_target_runs_only_that_node_and_its_inputs(stub_registry, calls):
    result = Engine(registry=stub_registry).run(chain(), targets=["add1"])
    assert result.ran() == {"src", "add0", "add1"}
    assert torch.equal(result.outputs["add1"]["x"], torch.full((2,), 3.0))


def test_failure_names_node_and_finished_nodes_stay_cached(stub_registry, calls):
    wf = {"format": "nodegraph/1", "nodes": {
        "s": {"type": "StubSource"},
        "a": {"type": "StubAdd", "inputs": {"a": "s.x"}},
        "f": {"type": "StubFail", "inputs": {"a": "a.x"}},
        "o": {"type": "StubSink", "inputs": {"a": "f.x"}}}}
    engine = Engine(registry=stub_registry)
    with pytest.raises(NodeFailed) as info:
        engine.run(wf)
    assert str(info.value) == "node 'f' (StubFail) failed: ValueError: stub failure as asked"
    assert info.value.result.status == {"s": "ran", "a": "ran", "f": "failed"}
    result = engine.run(wf, overrides={"f.fail": False})
    assert result.ran() == {"f", "o"}
    assert result.status["a"] == "cached"


def test_node_error_message_is_the_users(stub_registry):
    wf = {"format": "nodegraph/1", "nodes": {
        "s": {"type": "StubSource"}, "u": {"type": "StubUserError", "inputs": {"a": "s.x"}},
        "o": {"type": "StubSink", "inputs": {"a": "u.x"}}}}
    with pytest.raises(NodeFailed) as info:
        Engine(registry=stub_registry).run(wf)
    assert str(info.value) == "node 'u' (StubUserError) failed: the input is not usable; pick another"


def test_progress_events_and_interrupt_between_steps(stub_registry, calls, tmp_path):
    wf = {"format": "nodegraph/1", "nodes": {
        "s": {"type": "StubSource"},
        "k": {"type": "StubSteps", "inputs": {"a": "s.x"}, "params": {"steps": 5}},
        "w": {"type": "StubWrite", "inputs": {"a": "k.x"}}}}
    events = []
    flag = InterruptFlag()

    def listener(event):
        events.append((event.node_id, event.step, event.total))
        if event.step == 2:
            flag.set()

    with pytest.raises(Interrupted) as info:
        Engine(registry=stub_registry).run(wf, out_dir=tmp_path, progress=listener, interrupt=flag)
    assert events == [("k", 1, 5), ("k", 2, 5)]
    assert info.value.result.status == {"s": "ran", "k": "interrupted"}
    assert calls["StubWrite"] == 0 and not any(tmp_path.iterdir())


def test_edited_input_file_is_reread(stub_registry, calls, tmp_path):
    (tmp_path / "n.txt").write_text("4")
    wf = tmp_path / "wf.json"
    wf.write_text('{"format": "nodegraph/1", "nodes": {"r": {"type": "StubReadFile", "params": {"path": "n.txt"}},'
                  ' "o": {"type": "StubSink", "inputs": {"a": "r.x"}}}}')
    engine = Engine(registry=stub_registry)
    assert engine.run(wf).outputs["o"]["x"][0] == 4
    assert engine.run(wf).ran() == set()
    (tmp_path / "n.txt").write_text("7")
    result = engine.run(wf)
    assert result.ran() == {"r", "o"} and result.outputs["o"]["x"][0] == 7


def test_memory_cache_evicts_least_recently_used():
    cache = MemoryCache(budget_bytes=3 * 400)
    for key in "abc":
        cache.put(key, {"x": torch.zeros(100)})  # 400 bytes each
    cache.get("a")
    cache.put("d", {"x": torch.zeros(100)})
    assert "b" not in cache and {"a", "c", "d"} <= {k for k in "abcd" if k in cache}
    cache.put("huge", {"x": torch.zeros(1000)})
    assert "huge" not in cache and cache.used_bytes <= cache.budget_bytes


def test_disk_cache_serves_a_new_engine_and_survives_corruption(stub_registry, calls, tmp_path):
    cache_dir = tmp_path / "cache"
    Engine(registry=stub_registry, cache_dir=cache_dir).run(chain())
    calls.clear()
    result = Engine(registry=stub_registry, cache_dir=cache_dir).run(chain())
    assert calls["StubAdd"] == 0 and result.status["add3"] == "cached"
    files = list(cache_dir.rglob("*.safetensors"))
    assert files and not list(cache_dir.rglob(".tmp-*"))
    for path in files:
        path.write_bytes(b"garbage")
    result = Engine(registry=stub_registry, cache_dir=cache_dir).run(chain())
    assert result.ran() == {"src", "add0", "add1", "add2", "add3", "sink"}
    assert torch.equal(result.outputs["sink"]["x"], torch.full((2,), 5.0))


def test_long_chain_has_no_recursion_limit(stub_registry):
    n = sys.getrecursionlimit() + 500
    b = WorkflowBuilder()
    prev = b.add("StubSource", id="s", value=0)
    for i in range(n):
        prev = b.add("StubAdd", id=f"a{i}", a=prev["x"], amount=0)
    b.add("StubSink", id="o", a=prev["x"])
    engine = Engine(registry=stub_registry)
    assert len(engine.run(b.build()).ran()) == n + 2
    assert engine.run(b.build(), overrides={f"a{n - 1}.amount": 1.0}).ran() == {f"a{n - 1}", "o"}


def test_large_files_get_a_sampled_fingerprint(tmp_path, monkeypatch):
    from nodegraph import files as keys

    monkeypatch.setattr(keys, "LARGE_FILE", 1000)
    monkeypatch.setattr(keys, "SAMPLE", 100)
    path = tmp_path / "model.safetensors"
    path.write_bytes(bytes(range(256)) * 10)
    first = keys.file_hash(path)
    assert first.startswith("sampled:")
    data = bytearray(path.read_bytes())
    data[5] ^= 1  # inside the sampled head: the fingerprint changes
    path.write_bytes(bytes(data))
    assert keys.file_hash(path) != first
    small = tmp_path / "small.txt"
    small.write_bytes(b"x" * 999)
    import hashlib

    assert keys.file_hash(small) == hashlib.sha256(b"x" * 999).hexdigest()


def test_int_math_derives_a_size(stub_registry):
    wf = {"format": "nodegraph/1", "nodes": {
        "side": {"type": "Int", "params": {"value": 1024}},
        "pad": {"type": "IntMath", "inputs": {"a": "side.value"}, "params": {"b": 683, "op": "subtract"}}}}
    engine = Engine(registry=stub_registry)
    assert engine.run(wf, targets=["pad"]).outputs["pad"]["value"] == 341
    with pytest.raises(NodeFailed, match="floordiv by b = 0"):
        engine.run(wf, targets=["pad"], overrides={"pad.op": "floordiv", "pad.b": 0})


def test_unwritable_disk_cache_warns_and_the_run_goes_on(stub_registry, calls, tmp_path, monkeypatch):
    from nodegraph import cache
    from nodegraph.errors import NodegraphError

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cache, "save_file", disk_full)
    engine = Engine(registry=stub_registry, cache_dir=tmp_path / "cache")
    with pytest.warns(UserWarning, match="No space left on device"):
        result = engine.run(chain())
    assert result.status["sink"] == "ran" and result.outputs["sink"]["x"].tolist() == [5.0, 5.0]
    assert not list((tmp_path / "cache").rglob("*.safetensors")) and not list((tmp_path / "cache").rglob(".tmp-*"))
    (tmp_path / "afile").write_text("")
    with pytest.raises(NodegraphError, match="is a file"):
        Engine(registry=stub_registry, cache_dir=tmp_path / "afile")
