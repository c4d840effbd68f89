"""A pool of Ray actors, one per GPU (``num_gpus=1``; one CPU each on a cluster without GPUs), each holding
an Engine with its models for as long as the pool lives. Ray is the optional extra ``nodegraph[ray]``.

Input images bound by a folder sweep travel through the object store (put once per file); outputs are
either written by the actor into the shared output folder or sent back to the driver, which writes them.
A job whose actor died raises RayActorError, which ``dispatch`` retries on another actor.
"""
from __future__ import annotations

import concurrent.futures as cf
from pathlib import Path
from typing import Any

from ..errors import NodegraphError
from .jobs import Job
from .task import Task, make_engine, run_task


def import_ray():
    try:
        import ray
    except ImportError:
        raise NodegraphError('--ray needs Ray: pip install "nodegraph[ray]"') from None
    return ray


class BatchActor:
    """One worker: an Engine kept for the pool's lifetime, so its models stay loaded."""

    def __init__(self, name: str, engine_options: dict[str, Any], threads: int | None):
        if threads:
            import torch

            torch.set_num_threads(threads)
        self.name = name
        self.engine = make_engine(engine_options)

    def run(self, task: Task, keys: list[str], *images: bytes) -> dict:
        return run_task(self.engine, task, self.name, files=dict(zip(keys, images)))

    def ready(self) -> str:
        return self.name


class RayPool:
    """``address``: None starts a local Ray (or uses the one this process already started), "auto" joins the
    running cluster, "ray://host:10001" a remote one. ``workers``: actors (default: one per GPU in the
    cluster, else one). ``threads``: torch threads per actor. ``actor_class`` and ``actor_options`` (Ray's, such
    as ``max_concurrency``): what each actor is (the server's queue runs prompts on its own kind)."""

    def __init__(self, engine_options: dict[str, Any], address: str | None = None, workers: int | None = None,
                 threads: int | None = None, actor_class: type = BatchActor, **actor_options):
        ray = self.ray = import_ray()
        self._started = False
        if not ray.is_initialized():
            try:
                ray.init(address=address, include_dashboard=False, log_to_driver=False)
            except Exception as exc:  # Ray raises ConnectionError, RuntimeError, ValueError for a bad address
                raise NodegraphError(f"--ray {address or ''}: cannot start or join Ray ({exc})".replace("  ", " "))
            self._started = True
        gpus = int(ray.cluster_resources().get("GPU", 0))
        count = workers or gpus or 1
        room, unit = (gpus, "GPU") if gpus else (int(ray.cluster_resources().get("CPU", 0)), "CPU")
        if count > room:  # Ray would keep the extra actors pending, and the pool would wait for them forever
            if self._started:
                ray.shutdown()
            raise NodegraphError(f"--workers {count}: the Ray cluster has {room} {unit}{'s' if room != 1 else ''} "
                                 f"and each actor takes one {unit}; ask for at most {room} workers")
        resources = {"num_gpus": 1} if gpus else {"num_cpus": 1}
        actor = ray.remote(**resources, **actor_options)(actor_class)
        self.workers = [f"ray-{i}" for i in range(count)]
        self.actors = {name: actor.remote(name, engine_options, threads) for name in self.workers}
        ray.get([a.ready.remote() for a in self.actors.values()])  # a broken engine fails here, once
        self._images: dict[str, Any] = {}  # path -> object ref, so each image is put once

    def submit(self, worker: str, task: Task, job: Job) -> cf.Future:
        keys = sorted(task.inputs)
        refs = [self._image(task.inputs[k]) for k in keys]
        return self.actors[worker].run.remote(task, keys, *refs).future()

    def _image(self, path: str):
        if path not in self._images:
            self._images[path] = self.ray.put(Path(path).read_bytes())
        return self._images[path]

    def lost(self, exc: BaseException) -> bool:
        return isinstance(exc, self.ray.exceptions.RayActorError)

    def close(self, now: bool = False) -> None:
        for actor in self.actors.values():
            self.ray.kill(actor)
        self._images.clear()
        if self._started:
            self.ray.shutdown()
