"""Executor overhead per node, in microseconds, for chains and fan-outs of trivial nodes.

    python benchmarks/engine.py [--sizes 100 1000 10000] [--repeat 3]

For each shape and size: validation alone (load + checks + DAG, a fresh engine), then
the first run (validation included), a fully cached rerun (the same engine: it loads the
workflow and finds it validated before, by content) and a rerun after changing the param
of the last adder (the node before the output). Also the ratio µs/node at the largest
size over the smallest: ~1 means linear cost.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nodegraph.api import Engine  # noqa: E402
from nodegraph.definitions import build_node_def  # noqa: E402
from nodegraph.registry import Registry  # noqa: E402


def bench_add(a: "int", amount: int = 1) -> int:  # annotation replaced below
    """Add a number."""
    return a + amount


def bench_source(value: int = 0) -> int:
    """A number."""
    return value


def bench_sink(a: int) -> int:
    """Keep a number."""
    return a


def registry() -> Registry:
    reg = Registry()
    from typing import Annotated

    from nodegraph.sockets import Socket

    number = Annotated[int, Socket("NUMBER")]
    bench_add.__annotations__["a"] = number
    bench_sink.__annotations__["a"] = number
    reg.add(build_node_def(bench_source, "BenchSource", 1, "bench", {"x": "NUMBER"}, True, False, None, None))
    reg.add(build_node_def(bench_add, "BenchAdd", 1, "bench", {"x": "NUMBER"}, True, False, None, None))
    reg.add(build_node_def(bench_sink, "BenchSink", 1, "bench", {"x": "NUMBER"}, True, True, None, None))
    return reg


def chain(n: int) -> dict:
    nodes = {"n0": {"type": "BenchSource", "params": {"value": 1}}}
    for i in range(1, n - 1):
        nodes[f"n{i}"] = {"type": "BenchAdd", "inputs": {"a": f"n{i - 1}.x"}, "params": {"amount": 1}}
    nodes["last"] = {"type": "BenchSink", "inputs": {"a": f"n{n - 2}.x"}}
    return {"format": "nodegraph/1", "nodes": nodes}


def fanout(n: int) -> dict:
    """One source feeding n - 2 adders, each an output (so every node is needed)."""
    nodes = {"n0": {"type": "BenchSource", "params": {"value": 1}}}
    for i in range(1, n - 1):
        nodes[f"n{i}"] = {"type": "BenchSink" if i % 2 else "BenchAdd", "inputs": {"a": "n0.x"},
                          **({} if i % 2 else {"params": {"amount": i}})}
    nodes["last"] = {"type": "BenchAdd", "inputs": {"a": "n0.x"}, "params": {"amount": 1}}
    nodes["last_out"] = {"type": "BenchSink", "inputs": {"a": "last.x"}}
    return {"format": "nodegraph/1", "nodes": nodes}


def timed(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def measure(shape: str, n: int, repeat: int) -> dict:
    reg = registry()
    data = (chain if shape == "chain" else fanout)(n)
    last_adder = f"n{n - 2}" if shape == "chain" else "last"
    count = len(data["nodes"])
    validate = timed(lambda: Engine(registry=reg).compile(data), repeat)
    first = timed(lambda: Engine(registry=reg).run(data), repeat)
    engine = Engine(registry=reg)
    engine.run(data)
    cached = timed(lambda: engine.run(data), repeat)
    counter = iter(range(10**9))
    changed = timed(lambda: engine.run(data, overrides={f"{last_adder}.amount": next(counter) + 100}), repeat)
    return {"shape": shape, "nodes": count, **{k: v / count * 1e6 for k, v in
            (("validate", validate), ("first run", first), ("cached rerun", cached), ("last changed", changed))}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 1000, 10000])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    columns = ["validate", "first run", "cached rerun", "last changed"]
    print(f"{'shape':<7} {'nodes':>6}  " + "  ".join(f"{c + ' µs/node':>22}" for c in columns))
    rows = []
    for shape in ("chain", "fanout"):
        for n in args.sizes:
            row = measure(shape, n, args.repeat)
            rows.append(row)
            print(f"{shape:<7} {row['nodes']:>6}  " + "  ".join(f"{row[c]:>22.1f}" for c in columns), flush=True)
    print("\nµs/node at the largest size over the smallest (1.0 = linear):")
    for shape in ("chain", "fanout"):
        mine = [r for r in rows if r["shape"] == shape]
        print(f"  {shape:<7} " + "  ".join(f"{c}: {mine[-1][c] / mine[0][c]:.2f}" for c in columns))
    big = [r for r in rows if r["nodes"] == max(x["nodes"] for x in rows)]
    for row in big:
        print(f"targets at {row['nodes']} nodes ({row['shape']}): first run, validation included, "
              f"{row['first run']:.1f} µs/node (target < 50); fully cached rerun "
              f"{row['cached rerun']:.1f} µs/node (target < 20)")

if __name__ == "__main__":
    main()
