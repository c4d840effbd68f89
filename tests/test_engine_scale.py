"""What keeps the engine's cost per node flat: keys made once per graph, a benchmark that measures
what it claims."""
import importlib.util
from collections import Counter

from nodegraph.api import Engine

from .conftest import REPO


def _benchmark():
    spec = importlib.util.spec_from_file_location("engine_benchmark", REPO / "benchmarks" / "engine.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_cached_rerun_computes_no_key_twice(tmp_path, monkeypatch):
    from nodegraph import executor

    bench = _benchmark()
    made = Counter()
    real = executor.node_key

    def counting(type_name, version, code, canonical, links, salt, files):
        key = real(type_name, version, code, canonical, links, salt, files)
        made[key] += 1
        return key

    monkeypatch.setattr(executor, "node_key", counting)
    path = tmp_path / "chain.json"
    import json

    path.write_text(json.dumps(bench.chain(200)))
    engine = Engine(registry=bench.registry(), cache_dir=False)
    first = engine.run(path)
    assert len(made) == 200 and set(made.values()) == {1}  # each node's key once
    again = engine.run(path)
    assert sum(made.values()) == 200  # the rerun made none: they were kept with the validated graph
    assert again.status["last"] == "cached" and first.outputs["last"] == again.outputs["last"]
    changed = engine.run(path, overrides={"n198.amount": 5})  # a changed workflow is another graph
    assert changed.ran() == {"n198", "last"} and sum(made.values()) == 400


def test_the_fanout_benchmark_needs_every_node_and_no_two_share_a_key():
    bench = _benchmark()
    engine = Engine(registry=bench.registry(), cache_dir=False)
    assert bench.needed_and_distinct(engine, bench.fanout(300)) == (True, True)
    assert bench.needed_and_distinct(Engine(registry=bench.registry(), cache_dir=False), bench.chain(300)) == (True, True)


def test_the_node_loop_leaves_nothing_for_full_collections_to_rescan(monkeypatch):
    """What a run keeps per node (its status, the memory cache's entry, the outputs) is untracked by the
    collector once it has looked at it: a million-node run's full collections have nothing of it to rescan."""
    import contextlib
    import gc

    from nodegraph import executor

    bench = _benchmark()
    real, left = executor.gc_frozen, []

    @contextlib.contextmanager
    def counting():
        with real():  # everything older than the loop is frozen: what is left to collect is the loop's own
            yield
            gc.collect()
            left.append(len(gc.get_objects()))

    monkeypatch.setattr(executor, "gc_frozen", counting)
    engine = Engine(registry=bench.registry(), cache_dir=False)
    result = engine.run(bench.chain(3000))
    assert result.ran() == set(result.nodes) and len(result.nodes) == 3000
    assert left[0] < 300  # before, two tracked objects per node: each status and each cache entry's tuple
    status = result.nodes["n5"]
    assert isinstance(status, executor.NodeStatus) and status.status == "ran" and status.seconds >= 0
    assert status.error is None and len(engine.memory) == 3000


def test_memory_cache_counts_bytes_through_replacements_and_evictions():
    import torch

    from nodegraph.cache import MemoryCache

    cache = MemoryCache(budget_bytes=1000)
    cache.put("plain", {"x": 1})  # no tensor: costs nothing
    cache.put("a", {"x": torch.zeros(100)})  # 400 bytes
    cache.put("a", {"x": torch.zeros(50)})  # replaced: 200
    cache.put("b", {"x": torch.zeros(150)})  # 600
    assert cache.used_bytes == 800 and len(cache) == 3
    cache.get("plain")  # now the most recently used
    cache.put("c", {"x": torch.zeros(100)})  # 1,200 > 1,000: the least recently used, "a", goes
    assert "a" not in cache and list(cache._items) == ["b", "plain", "c"] and cache.used_bytes == 1000
    cache.put("c", {"x": 2})  # a tensor replaced by a plain value
    assert cache.used_bytes == 600 and cache.get("c") == {"x": 2}
    cache.put("d", {"x": torch.zeros(200)})  # 800: "b" goes; "plain" costs nothing and stays
    assert list(cache._items) == ["plain", "c", "d"] and cache.used_bytes == 800
