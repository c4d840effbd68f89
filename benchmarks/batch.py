"""Batch throughput: jobs per second of a tiny-model img2img sweep on 1 and 2 workers, local and on Ray, and on
1 worker with the jobs sampled one by one (--batch-size 1) or 4 at a time (--batch-size 4).

    python benchmarks/batch.py [--jobs 48] [--size 64] [--steps 4] [--no-ray] [--batching-only]

Each pool is started and warmed first (every worker loads the checkpoint and runs a job), then a sweep of
--jobs seeds runs; throughput is taken between its first and last completion, so the figures are steady state,
not start-up (the driver's checking of the sweep is printed apart). Every worker runs torch
with 1 thread (this machine has 2 cores). Prints jobs/s per pool, the scaling efficiency
(jobs/s with 2 workers / (2 x jobs/s with 1)) and Ray's overhead per job against local workers
(1/throughput of Ray - 1/throughput of local workers, at the same worker count). With --batch-size K the jobs
of a group end together, so its throughput is taken from the end of the first group to the last completion.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("NODEGRAPH_CACHE_DIR", "off")

from nodegraph.batch import Batch, run_batch  # noqa: E402
from nodegraph.batch.local import LocalPool  # noqa: E402


def workflow(folder: Path, checkpoint: Path, size: int, steps: int) -> Path:
    from tests.batch_helpers import img2img_workflow

    path = img2img_workflow(folder, checkpoint)
    data = json.loads(path.read_text())
    data["nodes"]["resize"]["params"].update(width=size, height=size)
    data["nodes"]["sample"]["params"]["steps"] = steps
    path.write_text(json.dumps(data))
    return path


def sweep(folder: Path, name: str, seeds: range) -> Path:
    path = folder / f"{name}.json"
    path.write_text(json.dumps({"grid": {"sample.seed": list(seeds)}}))
    return path


def throughput(pool, wf: Path, folder: Path, name: str, jobs: int, workers: int, engine,
               batch_size: int = 1, first: int = 0) -> tuple[float, float]:
    """Steady-state jobs/s (completions from the first to the last, so neither checking the jobs nor filling
    the workers counts) and the seconds the driver spent checking the sweep before the first job ran."""
    options = dict(workflow=wf, progress=False, engine_options={"cache_dir": False}, batch_size=batch_size)
    warm_jobs = 2 * workers * batch_size
    warm_seeds = range(first + 10_000, first + 10_000 + warm_jobs)
    warm = run_batch(Batch(sweeps=[str(sweep(folder, f"{name}-warm", warm_seeds))],
                           out=folder / f"{name}-warm", **options), pool=pool, engine=engine)
    assert warm.done == warm_jobs, warm
    ends: list[float] = []
    start = time.perf_counter()
    timed = run_batch(Batch(sweeps=[str(sweep(folder, name, range(first, first + jobs)))], out=folder / name,
                            **options), pool=pool,
                      engine=engine, on_outcome=lambda job, record: ends.append(time.perf_counter()))
    assert timed.done == jobs, timed
    assert all((r.get("batch") or {}).get("size", 1) == batch_size for r in timed.records[:jobs - jobs % batch_size])
    first_job = min(r["seconds"] + (r.get("batch") or {}).get("seconds", 0.0) for r in timed.records)
    return (jobs - batch_size) / (ends[-1] - ends[batch_size - 1]), ends[0] - start - first_job


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=48)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--no-ray", action="store_true")
    parser.add_argument("--batching-only", action="store_true", help="only --batch-size 1 vs 4 on one worker")
    parser.add_argument("--repeat", type=int, default=3, help="--batch-size 1 and 4 measured this many times, "
                        "alternating (the median is reported: robust to other processes' load)")
    args = parser.parse_args()
    from tests.tiny_models import build_tiny_models

    folder = Path(tempfile.mkdtemp(prefix="nodegraph-batch-bench-"))
    wf = workflow(folder, build_tiny_models(folder / "models").sd15, args.size, args.steps)
    print(f"tiny SD 1.x img2img {args.size}x{args.size}, {args.steps} steps x strength 0.6, {args.jobs} jobs; "
          f"load average {os.getloadavg()[0]:.2f}")
    from nodegraph.api import Engine

    engine = Engine(cache_dir=False)  # the driver's: checks the jobs (its registry is loaded once)
    rates: dict[tuple[str, int], float] = {}
    checks: list[float] = []
    for workers in (() if args.batching_only else (1, 2)):
        pool = LocalPool(workers, {"cache_dir": False}, threads=1)
        try:
            rates["local", workers], check = throughput(pool, wf, folder, f"local{workers}", args.jobs, workers,
                                                       engine)
            checks.append(check)
        finally:
            pool.close()
    batched: dict[int, list[float]] = {1: [], 4: []}
    pool = LocalPool(1, {"cache_dir": False}, threads=1)  # one worker, the jobs sampled one by one or 4 at a time
    try:
        for round_ in range(args.repeat):
            for size in batched:
                # new seeds each time: the worker's memory cache holds the latents of the seeds it ran
                rate, _ = throughput(pool, wf, folder, f"batch{size}-{round_}", args.jobs, 1, engine, size,
                                     first=100_000 * (1 + 2 * round_ + (size > 1)))
                batched[size].append(rate)
    finally:
        pool.close()
    if not args.no_ray and not args.batching_only:
        import ray

        from nodegraph.batch.ray_pool import RayPool

        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        for workers in (1, 2):
            pool = RayPool({"cache_dir": False}, workers=workers, threads=1)
            try:
                rates["ray", workers], _ = throughput(pool, wf, folder, f"ray{workers}", args.jobs, workers, engine)
            finally:
                pool.close()
        ray.shutdown()
    for (kind, workers), rate in rates.items():
        print(f"{kind:5} {workers} worker{'s' if workers > 1 else ' '}: {rate:6.2f} jobs/s  ({1000 / rate:6.1f} ms/job)")
    for kind in ("local", "ray"):
        if (kind, 2) in rates:
            print(f"{kind} scaling efficiency at 2 workers: {rates[kind, 2] / (2 * rates[kind, 1]):.2f} "
                  "(target >= 0.85)")
    for workers in (1, 2):
        if ("ray", workers) in rates:
            overhead = 1000 * (1 / rates["ray", workers] - 1 / rates["local", workers])
            print(f"Ray overhead per job at {workers} worker{'s' if workers > 1 else ''}: {overhead:+.1f} ms "
                  "(target < 50 ms)")
    import statistics

    for size, rates_ in batched.items():
        rate = statistics.median(rates_)
        print(f"local 1 worker, --batch-size {size}: {rate:6.2f} jobs/s  ({1000 / rate:6.1f} ms/job; median of "
              f"{len(rates_)}, {min(rates_):.1f}-{max(rates_):.1f})")
    ratios = [b / a for a, b in zip(batched[1], batched[4])]
    print(f"--batch-size 4 against 1: {statistics.median(batched[4]) / statistics.median(batched[1]):.2f}x "
          f"(per round {', '.join(f'{r:.2f}' for r in ratios)})")
    if checks:
        print(f"checking the sweep before the first job: {1000 * min(checks) / args.jobs:.1f} ms per job")
    print(f"load average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
