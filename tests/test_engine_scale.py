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
