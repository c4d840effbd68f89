"""Local worker processes: one per GPU (each sees only its own), else as many as asked, each holding an
Engine with its models and memory cache for the whole batch."""
from __future__ import annotations

import concurrent.futures as cf
import multiprocessing
import os
import signal
import threading
import time
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from .jobs import Job
from .task import Task, make_engine, run_task

_ENGINE = None  # the worker process's Engine
_NAME = ""


def _start(name: str, engine_options: dict[str, Any], threads: int | None, gpu: int | None) -> None:
    """Runs first in each worker process: its GPU, its threads, its Engine."""
    global _ENGINE, _NAME
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the driver's to handle: it stops the workers
    threading.Thread(target=_end_with, args=(os.getppid(),), name="nodegraph-parent", daemon=True).start()
    if gpu is not None:  # before torch touches CUDA: this worker's "cuda" is that one GPU
        os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu)
    if threads:  # before torch and OpenCV load: their thread pools then match the worker's share of the cores
        for variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            os.environ[variable] = str(threads)
    import torch

    if threads:
        torch.set_num_threads(threads)
        import cv2

        cv2.setNumThreads(threads)
    _NAME = name
    _ENGINE = make_engine(engine_options)


def _end_with(parent: int) -> None:
    """A batch killed outright (SIGKILL, a crash) cannot stop its workers: each ends by itself when its parent is
    gone, rather than run on into job folders that a resumed batch has made anew."""
    while os.getppid() == parent:
        time.sleep(0.2)
    os._exit(1)


def _run(task: Task) -> dict:
    return run_task(_ENGINE, task, _NAME)


def gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


class LocalPool:
    """``workers`` processes (started with spawn, so no CUDA state or locks are inherited); worker i gets GPU i
    when there are GPUs. ``threads``: torch threads per worker (default: the cores shared out)."""

    def __init__(self, workers: int, engine_options: dict[str, Any], threads: int | None = None):
        gpus = gpu_count()
        threads = threads or (None if gpus else max(1, (os.cpu_count() or 1) // workers))
        context = multiprocessing.get_context("spawn")
        self.workers = [f"local-{i}" for i in range(workers)]
        self._executors = {
            name: cf.ProcessPoolExecutor(1, mp_context=context, initializer=_start,
                                         initargs=(name, engine_options, threads, i % gpus if gpus else None))
            for i, name in enumerate(self.workers)}

    def submit(self, worker: str, task: Task, job: Job) -> cf.Future:
        return self._executors[worker].submit(_run, task)

    def lost(self, exc: BaseException) -> bool:
        return isinstance(exc, BrokenProcessPool)

    def close(self, now: bool = False) -> None:
        for executor in self._executors.values():
            if now:  # interrupted: the running jobs are abandoned (their partial folders are removed)
                for process in list(getattr(executor, "_processes", {}).values()):
                    process.terminate()
            executor.shutdown(wait=True, cancel_futures=True)
