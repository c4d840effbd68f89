"""A batch from start to end: read the sweeps, check every job before any runs, skip those already done
(``resume``), run the rest on a pool, and record each in ``results.jsonl`` as it ends.

Each job writes into a hidden ``.<job>.partial`` folder that becomes ``<job>/`` only when the job is done, so
no job folder ever holds a half-run job's files.
"""
from __future__ import annotations

import fcntl
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..errors import NodegraphError, WorkflowInvalid
from .group import GroupTask, batch_role, form_groups
from .jobs import Job, Results, job_key, workflow_digest
from .sweep import SweepInvalid, combine, read_sweep
from .task import Task


class BatchInvalid(NodegraphError):
    """Jobs that would not run, each problem naming the job and the node and field."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        count = len(problems)
        super().__init__("\n".join([f"batch is invalid ({count} problem{'s' if count != 1 else ''}):",
                                    *(f"  - {p}" for p in problems)]))


@dataclass
class Batch:
    workflow: Path
    sweeps: list[str]
    out: Path
    bind: str | None = None
    base: dict[str, Any] = field(default_factory=dict)  # --set: overrides every job shares
    resume: bool = False
    workers: int | None = None  # None: one per GPU, else one
    threads: int | None = None  # torch threads per worker
    ray: bool = False
    ray_address: str | None = None
    shared_out: bool = False  # Ray: actors write into the output folder themselves
    device: str = "auto"
    dtype: str = "float32"
    engine_options: dict[str, Any] = field(default_factory=dict)  # Engine keyword arguments for each worker
    batch_size: int = 1  # up to this many jobs differing only in seed / prompt sampled as one batch (group.py)
    progress: bool = True


@dataclass
class Summary:
    total: int = 0
    skipped: int = 0  # done in an earlier run (resume)
    done: int = 0
    failed: int = 0
    interrupted: bool = False
    seconds: float = 0.0
    records: list[dict] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return 130 if self.interrupted else 1 if self.failed else 0


def plan(batch: Batch, engine) -> list[Job]:
    """Every job, checked on ``engine``; raises SweepInvalid or BatchInvalid with every problem at once."""
    problems: list[str] = []
    sweeps, inputs = [], set()
    for sweep in batch.sweeps:
        try:
            jobs, bound = read_sweep(sweep, batch.bind)
        except SweepInvalid as exc:
            problems += exc.problems
            continue
        sweeps.append(jobs)
        inputs |= bound
    if batch.bind and not any(Path(s).is_dir() for s in batch.sweeps):
        problems.append(f"--bind {batch.bind}: binds the images of a folder sweep, and no --sweep is a folder")
    if problems:
        raise SweepInvalid(problems)
    overrides = combine(sweeps, batch.sweeps)
    try:
        digest = workflow_digest(batch.workflow, batch.base)
    except OSError as exc:
        raise NodegraphError(f"workflow '{batch.workflow}': cannot read it ({exc.strerror})") from None
    jobs: list[Job] = []
    seen: dict[str, int] = {}
    for index, job_overrides in enumerate(overrides):
        key = job_key(digest, job_overrides)
        label = f"job {index} {_short(job_overrides)}"
        if key in seen:
            problems.append(f"{label}: the same as job {seen[key]}; list each job once")
            continue
        seen[key] = index
        try:
            graph = engine.compile(batch.workflow, {**batch.base, **job_overrides})
        except WorkflowInvalid as exc:
            problems += [f"{label}: {issue}" for issue in exc.issues]
            continue
        jobs.append(Job(index, job_overrides, key, _models(graph),
                        {k: str(job_overrides[k]) for k in inputs if k in job_overrides},
                        batch_role(graph, job_overrides) if batch.batch_size > 1 else None))
    if problems:
        raise BatchInvalid(problems)
    return jobs


def _short(overrides: dict) -> str:
    text = ", ".join(f"{k}={v!r}" for k, v in overrides.items())
    return f"({text[:120]}{'...' if len(text) > 120 else ''})"


def _models(graph) -> tuple[str, ...]:
    """The model files a job loads (params declared in a models folder): its affinity."""
    return tuple(sorted({path for node in graph.nodes.values() for name, path in node.paths.items()
                         if (spec := node.definition.inputs.get(name)) is not None
                         and spec.path is not None and spec.path.folder}))


def worker_count(batch: Batch) -> int:
    from .local import gpu_count

    return batch.workers or gpu_count() or 1


def make_pool(batch: Batch, interrupt=None, engine=None):
    """Ray actors with --ray; else worker processes, or this process alone for one worker (``engine``)."""
    if batch.ray:
        from .ray_pool import RayPool

        return RayPool(batch.engine_options, batch.ray_address, batch.workers, batch.threads)
    if worker_count(batch) == 1:
        from .dispatch import InProcessPool

        if batch.threads:
            import torch

            torch.set_num_threads(batch.threads)

        return InProcessPool(batch.engine_options, interrupt, engine)
    from .local import LocalPool

    return LocalPool(worker_count(batch), batch.engine_options, batch.threads)


def run_batch(batch: Batch, interrupt=None, pool=None, on_outcome: Callable[[Job, dict], None] | None = None,
              engine=None) -> Summary:
    """Plan, then run every job not done yet. ``pool``: a pool to use (else one is made from ``batch`` and
    closed at the end); ``on_outcome``: called after each job is recorded."""
    from ..api import Engine

    start = time.perf_counter()
    results = Results(batch.out)
    _refuse_an_earlier_batch(batch, results)  # before planning, which takes a while; again under the lock
    in_process = pool is None and not batch.ray and worker_count(batch) == 1
    if engine is None:  # in this process it runs the jobs too; else it only checks them
        engine = Engine(**(batch.engine_options if in_process else {**batch.engine_options, "cache_dir": False}))
    jobs = plan(batch, engine)
    lock = _lock(batch.out)
    try:
        return _run(batch, interrupt, pool, on_outcome, engine, jobs, results, in_process, start)
    finally:
        os.close(lock)


def _refuse_an_earlier_batch(batch: Batch, results: Results) -> None:
    if results.path.exists() and not batch.resume:
        raise NodegraphError(f"'{batch.out}' already holds a batch ({results.path.name}); pass --resume to "
                             "run the jobs not done yet, or choose another --out")


def _lock(out: Path) -> int:
    """Hold the output folder for this batch alone: two batches in one folder would clear each other's running
    job folders and run every job twice. The lock is on the folder itself, so nothing is left behind and a
    killed batch's lock goes with its process."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd = os.open(out, os.O_RDONLY)
    except OSError as exc:
        raise NodegraphError(f"--out '{out}': cannot use it as the output folder ({exc.strerror})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise NodegraphError(f"'{out}' is in use by another batch that is still running; wait for it to end, "
                             "or choose another --out") from None
    except OSError:  # a filesystem without locks: run unguarded, as before
        pass
    return fd


def _run(batch, interrupt, pool, on_outcome, engine, jobs, results, in_process, start) -> Summary:
    from .dispatch import dispatch

    _refuse_an_earlier_batch(batch, results)  # one may have ended while this one was checked
    done = results.done() if batch.resume else {}
    todo = [j for j in jobs if j.key not in done]
    summary = Summary(total=len(jobs), skipped=len(jobs) - len(todo))
    for job in todo:  # what a killed run left half-made
        _remove(batch.out / f".{job.name}.partial")
    own_pool = pool is None
    if own_pool and todo:
        pool = make_pool(batch, interrupt, engine if in_process else None)
    bar = _bar(len(todo), batch.progress)

    def task(job: Job) -> Task | GroupTask:
        if job.members:
            return GroupTask([task(member) for member in job.members], job.sampler)
        shipped = batch.ray and not batch.shared_out
        folder = None if shipped else str((batch.out / f".{job.name}.partial").resolve())
        return Task(job.key, str(batch.workflow.resolve()), {**batch.base, **job.overrides}, folder,
                    batch.device, batch.dtype, job.inputs if batch.ray else {})

    def record(job: Job, outcome: dict) -> None:
        if job.members:  # a group: each job's own outcome, or the group's failure for every job
            each = outcome.get("outcomes") or [dict(outcome) for _ in job.members]
            for member, own in zip(job.members, each):
                record(member, {**own, "attempts": outcome.get("attempts", 1)})
            return
        if outcome["status"] == "interrupted":
            return
        files = _finish(batch.out, job, outcome)
        entry = {"key": job.key, "index": job.index, "job": job.name, "overrides": job.overrides,
                 "status": outcome["status"], "seconds": outcome.get("seconds", 0.0), "files": files,
                 "worker": outcome.get("worker"), "attempts": outcome.get("attempts", 1),
                 "nodes": outcome.get("nodes", {}),
                 **({"batch": outcome["batch"]} if outcome.get("batch") else {}),
                 **({"error": outcome["error"]} if outcome.get("error") else {}),
                 "manifest": outcome.get("manifest", {})}
        results.append(entry)
        summary.records.append(entry)
        if outcome["status"] == "done":
            summary.done += 1
        else:
            summary.failed += 1
            if bar is None:
                print(f"nodegraph: {job.name} failed: {outcome.get('error')}", file=sys.stderr)
            else:
                bar.write(f"nodegraph: {job.name} failed: {outcome.get('error')}", file=sys.stderr)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(failed=summary.failed, refresh=False)
        if on_outcome is not None:
            on_outcome(job, entry)

    finished = False
    try:
        if interrupt is not None:
            interrupt.running = True
        units = form_groups(todo, {j.key: j.role for j in todo}, batch.batch_size)
        finished = dispatch(pool, units, task, record, interrupt) if todo else True
    finally:
        if own_pool and pool is not None:
            pool.close(now=not finished)
        for job in todo:
            _remove(batch.out / f".{job.name}.partial")
        results.close()
        if bar is not None:
            bar.close()
    summary.interrupted = not finished
    summary.seconds = time.perf_counter() - start
    return summary


def _finish(out: Path, job: Job, outcome: dict) -> list[str]:
    """Give a done job's folder its final name (writing files sent back by a Ray actor first); the files,
    relative to the output folder."""
    partial, final = out / f".{job.name}.partial", out / job.name
    if outcome["status"] != "done":
        _remove(partial)
        return []
    from ..atomic import write_bytes_atomic

    for name, data in (outcome.pop("data", None) or {}).items():
        write_bytes_atomic(partial / name, data)
    partial.mkdir(parents=True, exist_ok=True)  # a job that writes no file still gets its folder
    _remove(final)  # left by a run killed between the rename and its results line
    partial.rename(final)
    return [f"{job.name}/{name}" for name in outcome.get("files", [])]


def _remove(folder: Path) -> None:
    if folder.exists():
        shutil.rmtree(folder, ignore_errors=True)


def _bar(total: int, enabled: bool):
    if not enabled or not total:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="job", desc="batch", file=sys.stderr)
