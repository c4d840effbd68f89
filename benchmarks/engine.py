"""Executor overhead per node, in microseconds, for chains and fan-outs of trivial nodes.

    python benchmarks/engine.py [--sizes 1000 10000 100000 1000000] [--repeat 3] [--memory] [--floor]

Each workflow is a JSON file, as the CLI and the server get them. For each shape and size:
validation alone (a fresh engine: read + checks + order), the first run (a fresh engine:
validation included), a fully cached rerun (the same engine: it finds the file's text
validated before and its keys made) and a rerun after changing the param of the last adder
(validation of the changed workflow included). Best of --repeat runs. Then the ratio of
µs/node at the largest size over the smallest (1.0 = linear) and, with --memory, the peak
memory the engine allocates per node for a first run of 100,000 nodes (tracemalloc, in a
fresh process).

With --floor, the same ratio for three steps that involve no engine code, on the same files: the
standard library's json.loads, a copy of each node's dict, and a dict lookup by node id. They show how
much of the growth from the smallest size to the largest this machine's memory gives any Python
program that holds one object per node (more than 1.3 on a virtual machine with 4 KiB pages).

Shapes: a chain (source -> n-2 adders -> sink) and a fan-out (one source feeding n-1 adders
that are all output nodes with different amounts: every node is needed and no two share a
cache key, which `needed_and_distinct` checks and a test asserts).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Annotated

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nodegraph.api import Engine  # noqa: E402
from nodegraph.definitions import build_node_def  # noqa: E402
from nodegraph.limits import Limits  # noqa: E402
from nodegraph.registry import Registry  # noqa: E402
from nodegraph.sockets import Socket  # noqa: E402

Number = Annotated[int, Socket("BENCH_INT")]
LIMITS = Limits(max_nodes=10_000_000)


def bench_add(a: Number, amount: int = 1) -> int:
    """Add a number."""
    return a + amount


def bench_source(value: int = 0) -> int:
    """A number."""
    return value


def bench_sink(a: Number) -> int:
    """Keep a number."""
    return a


def registry() -> Registry:
    reg = Registry()
    for fn, name, output in ((bench_source, "BenchSource", False), (bench_add, "BenchAdd", False),
                             (bench_add, "BenchAddOut", True), (bench_sink, "BenchSink", True)):
        reg.add(build_node_def(fn, name, 1, "bench", {"x": "BENCH_INT"}, True, output, None, None), origin="bench")
    return reg


def chain(n: int) -> dict:
    nodes = {"n0": {"type": "BenchSource", "params": {"value": 1}}}
    for i in range(1, n - 1):
        nodes[f"n{i}"] = {"type": "BenchAdd", "inputs": {"a": f"n{i - 1}.x"}, "params": {"amount": 1}}
    nodes["last"] = {"type": "BenchSink", "inputs": {"a": f"n{n - 2}.x"}}
    return {"format": "nodegraph/1", "nodes": nodes}


def fanout(n: int) -> dict:
    """One source feeding n - 1 adders, each an output node with its own amount."""
    nodes = {"n0": {"type": "BenchSource", "params": {"value": 1}}}
    for i in range(1, n):
        nodes[f"n{i}"] = {"type": "BenchAddOut", "inputs": {"a": "n0.x"}, "params": {"amount": i}}
    return {"format": "nodegraph/1", "nodes": nodes}


SHAPES = {"chain": (chain, lambda n: f"n{n - 2}"), "fanout": (fanout, lambda n: f"n{n - 1}")}


def needed_and_distinct(engine: Engine, source) -> tuple[bool, bool]:
    """Whether a run of ``source`` needs every node and gives each its own cache key."""
    result = engine.run(source)
    ran = result.ran()
    keys = engine.memory._items  # every node ran once and was cached under its key
    return len(ran) == len(result.nodes), len(keys) == len(result.nodes)


def timed(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def measure(shape: str, n: int, repeat: int, folder: Path) -> dict:
    reg = registry()
    make, last_adder = SHAPES[shape]
    path = folder / f"{shape}-{n}.json"
    path.write_text(json.dumps(make(n)))

    def fresh() -> Engine:
        return Engine(registry=reg, cache_dir=False, limits=LIMITS)

    validate = timed(lambda: fresh().compile(path), repeat)
    first = timed(lambda: fresh().run(path), repeat)
    engine = fresh()
    engine.run(path)
    cached = timed(lambda: engine.run(path), repeat)
    counter = iter(range(10**9))
    changed = timed(lambda: engine.run(path, overrides={f"{last_adder(n)}.amount": next(counter) + 10**6}), repeat)
    return {"shape": shape, "nodes": n, **{k: v / n * 1e6 for k, v in
            (("validate", validate), ("first run", first), ("cached rerun", cached), ("last changed", changed))}}


def peak_bytes_per_node(shape: str, n: int, folder: Path) -> float:
    """Peak memory the engine allocates to validate and run a workflow file (tracemalloc, in a fresh
    process, after imports and a warm-up), per node."""
    path = folder / f"memory-{shape}-{n}.json"
    path.write_text(json.dumps(SHAPES[shape][0](n)))
    code = (f"import sys, tracemalloc; sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})\n"
            "import engine as b\n"
            "reg = b.registry(); b.Engine(registry=reg, cache_dir=False).run(b.chain(10))\n"
            "tracemalloc.start()\n"
            f"b.Engine(registry=reg, cache_dir=False, limits=b.LIMITS).run({str(path)!r})\n"
            "print(tracemalloc.get_traced_memory()[1])")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(done.stdout.split()[-1]) / n


def floor(sizes: list[int], repeat: int) -> None:
    """µs per node, at the smallest and the largest size, of steps that involve no engine code."""
    print("\nsteps without the engine, µs/node (ratio of the largest size to the smallest):")
    for shape, (make, _) in SHAPES.items():
        rows = []
        for n in (min(sizes), max(sizes)):
            text = json.dumps(make(n))
            nodes = json.loads(text)["nodes"]
            ids = list(nodes)
            index = {node_id: i for i, node_id in enumerate(ids)}
            steps = (lambda: json.loads(text), lambda: [dict(v) for v in nodes.values()],
                     lambda: [index[node_id] for node_id in ids])
            rows.append([timed(step, repeat) / n * 1e6 for step in steps])
        names = ("json.loads", "copy each node's dict", "dict lookup by id")
        print(f"  {shape:<7} " + "  ".join(f"{name}: {a:.3f} -> {b:.3f} ({b / a:.2f})"
                                           for name, a, b in zip(names, *rows)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000, 1000000])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--memory", action="store_true", help="also the peak memory per node at 100,000 nodes")
    parser.add_argument("--floor", action="store_true", help="also the growth of steps that involve no engine code")
    args = parser.parse_args()
    columns = ["validate", "first run", "cached rerun", "last changed"]
    Engine(registry=registry(), cache_dir=False).run(chain(10))  # imports and first-use costs out of the way
    print(f"{'shape':<7} {'nodes':>8}  " + "  ".join(f"{c + ' µs/node':>22}" for c in columns))
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for shape in SHAPES:
            for n in args.sizes:
                row = measure(shape, n, args.repeat, Path(folder))
                rows.append(row)
                print(f"{shape:<7} {n:>8}  " + "  ".join(f"{row[c]:>22.2f}" for c in columns), flush=True)
    print("\nµs/node at the largest size over the smallest (target <= 1.3):")
    for shape in SHAPES:
        mine = [r for r in rows if r["shape"] == shape]
        print(f"  {shape:<7} " + "  ".join(f"{c}: {mine[-1][c] / mine[0][c]:.2f}" for c in columns))
    for row in (r for r in rows if r["nodes"] == max(args.sizes)):
        print(f"cached rerun at {row['nodes']:,} nodes ({row['shape']}): {row['cached rerun']:.2f} µs/node (target <= 5)")
    if args.memory:
        with tempfile.TemporaryDirectory() as folder:
            for shape in SHAPES:
                per_node = peak_bytes_per_node(shape, 100_000, Path(folder))
                print(f"peak memory of a first run, {shape}, 100,000 nodes: {per_node:,.0f} bytes/node "
                      "(target <= 3,000)")
    if args.floor:
        floor(args.sizes, args.repeat)


if __name__ == "__main__":
    main()
