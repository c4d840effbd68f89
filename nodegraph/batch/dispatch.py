"""The one executor interface (a pool of workers that run Tasks and answer with futures) and the loop that
hands jobs to workers, preferring the worker that already holds a job's models.

A pool is anything with
- ``workers``: the worker names, each able to run one job at a time;
- ``submit(worker, task, job)`` -> a ``concurrent.futures.Future`` of the job's outcome (``task.run_task``);
- ``lost(exc)``: whether an exception from a future means the worker itself died (its job is retried
  on another worker);
- ``close(now=False)``: stop the workers (``now``: without waiting for running jobs).

``InProcessPool`` (here), ``LocalPool`` (``local.py``: worker processes) and ``RayPool`` (``ray_pool.py``:
Ray actors) are the three; a server queue can drive any of them through ``dispatch``.
"""
from __future__ import annotations

import concurrent.futures as cf
from collections import OrderedDict, deque
from typing import Any, Callable, Iterable

from .jobs import Job
from .task import Task, make_engine, run_task

POLL_SECONDS = 0.2  # how often the loop looks at the interrupt flag while jobs run


class InProcessPool:
    """One worker in this process (a thread), with one Engine: the default on a machine without GPUs."""

    def __init__(self, engine_options: dict[str, Any], interrupt=None, engine=None):
        self.workers = ["local-0"]
        self.engine = engine if engine is not None else make_engine(engine_options)
        self.interrupt = interrupt
        self._threads = cf.ThreadPoolExecutor(1, thread_name_prefix="nodegraph-batch")

    def submit(self, worker: str, task: Task, job: Job) -> cf.Future:
        return self._threads.submit(run_task, self.engine, task, worker, self.interrupt)

    def lost(self, exc: BaseException) -> bool:
        return False

    def close(self, now: bool = False) -> None:
        if now and self.interrupt is not None:
            self.interrupt.set()
        self._threads.shutdown(wait=True, cancel_futures=True)


class Affinity:
    """Pending jobs grouped by the models they load, and which worker holds which models.

    An idle worker takes, in this order: a job whose models it holds; a job whose models no worker holds;
    a job whose models another worker holds, when more such jobs wait than workers hold them (else that
    worker will take it soon, without loading anything)."""

    def __init__(self, jobs: Iterable[Job], workers: list[str]):
        self.queues: OrderedDict[tuple, deque[Job]] = OrderedDict()
        for job in jobs:
            self.queues.setdefault(job.models, deque()).append(job)
        self.holds: dict[str, set[str]] = {w: set() for w in workers}

    def __len__(self) -> int:
        return sum(len(q) for q in self.queues.values())

    def put_back(self, job: Job) -> None:
        self.queues.setdefault(job.models, deque()).appendleft(job)

    def drop_worker(self, worker: str) -> None:
        self.holds.pop(worker, None)

    def _holders(self, models: tuple) -> list[str]:
        return [w for w, held in self.holds.items() if models and set(models) <= held]

    def take(self, idle: list[str]) -> list[tuple[str, Job]]:
        picks: list[tuple[str, Job]] = []
        idle = [w for w in idle if w in self.holds]
        rules = (lambda w, m: bool(m) and set(m) <= self.holds[w],
                 lambda w, m: not self._holders(m),
                 lambda w, m: len(self.queues[m]) > len(self._holders(m)))
        for rule in rules:
            for worker in list(idle):
                models = next((m for m, q in self.queues.items() if q and rule(worker, m)), None)
                if models is None:
                    continue
                picks.append((worker, self.queues[models].popleft()))
                self.holds[worker].update(models)
                idle.remove(worker)
        return picks


def dispatch(pool, jobs: list[Job], make_task: Callable[[Job], Task], on_outcome: Callable[[Job, dict], None],
             interrupt=None, attempts: int = 3, depth: int = 2) -> bool:
    """Run every job on the pool's workers, calling ``on_outcome(job, outcome)`` as each ends (failed jobs
    included). Each worker holds up to ``depth`` jobs, so it starts the next without waiting for the driver.
    A job whose worker died is retried on another, up to ``attempts`` times in all. Returns
    False when stopped by ``interrupt`` (jobs still pending or running are left out)."""
    queue = Affinity(jobs, list(pool.workers))
    live = list(pool.workers)
    running: dict[cf.Future, tuple[Job, str]] = {}
    tries: dict[str, int] = {}
    while len(queue) or running:
        if interrupt is not None and interrupt.is_set():
            return False
        while True:  # fill every worker up to ``depth`` jobs: the next is queued there before this one ends
            load = [w for _, w in running.values()]
            picks = queue.take([w for w in live if load.count(w) < depth])
            if not picks:
                break
            for worker, job in picks:
                tries[job.key] = tries.get(job.key, 0) + 1
                running[pool.submit(worker, make_task(job), job)] = (job, worker)
        if not running:  # every worker is gone
            for job in [j for q in queue.queues.values() for j in q]:
                on_outcome(job, {"status": "failed", "error": "no worker left to run it (every worker died)",
                                 "worker": None, "seconds": 0.0, "files": []})
            return True
        done, _ = cf.wait(running, timeout=POLL_SECONDS, return_when=cf.FIRST_COMPLETED)
        for future in done:
            job, worker = running.pop(future)
            try:
                outcome = future.result()
            except Exception as exc:  # noqa: BLE001 - the pool says whether the worker died
                if pool.lost(exc):
                    if worker in live:  # its other job in flight fails the same way
                        live.remove(worker)
                        queue.drop_worker(worker)
                    if tries[job.key] < attempts:
                        queue.put_back(job)
                        continue
                    error = f"its worker died {tries[job.key]} times ({type(exc).__name__})"
                else:
                    error = f"internal error: {type(exc).__name__}: {exc}"
                outcome = {"status": "failed", "error": error, "worker": worker, "seconds": 0.0, "files": []}
            outcome["attempts"] = tries[job.key]
            on_outcome(job, outcome)
    return True
