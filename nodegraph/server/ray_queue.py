"""``nodegraph serve --ray``: the prompt queue on the batch pool's Ray actors (batch/ray_pool.py).

Each actor runs one prompt at a time on its own Engine (made with the server's confinement and limits), reading
the server's input folder and writing into its output and temp folders: the actors share the server's
filesystem (one machine, or a shared folder mounted at the same path). An idle actor takes the first waiting
prompt whose models it holds, else the first whose models no actor holds, else the first in the queue. The
actor keeps its run's events; a thread per running prompt polls them and turns them into ComfyUI's messages
with the same Execution as a local run. A prompt whose actor died goes back to the front of the queue, up to
``attempts`` tries in all."""
from __future__ import annotations

import heapq
import logging
import threading
from dataclasses import dataclass
from types import SimpleNamespace

from ..batch.ray_pool import BatchActor
from ..context import InterruptFlag
from ..errors import Interrupted, NodegraphError
from .prompts import Prompt
from .queue import Execution, PromptQueue, failure, release

log = logging.getLogger("nodegraph.server")
POLL_SECONDS = 0.05  # how often a running prompt's events are fetched from its actor


class PromptActor(BatchActor):
    """A server's worker: ``run`` one prompt while ``drain``, ``interrupt`` and ``free`` answer beside it (the
    actor is made with ``max_concurrency=2``)."""

    def __init__(self, name, engine_options, threads):
        super().__init__(name, engine_options, threads)
        self._lock = threading.Lock()  # guards the events list
        self._events: list[tuple] = []
        self._flags: dict[str, InterruptFlag] = {}
        self._running = threading.Lock()  # held while a prompt runs
        self._free: tuple[bool, bool] | None = None

    def run_prompt(self, prompt_id: str, workflow, targets, out_dir: str, temp_dir: str) -> dict:
        with self._running:
            self._release()
            flag = self._flags.get(prompt_id) or InterruptFlag()  # an interrupt may come before the run
            self._flags = {prompt_id: flag}
            with self._lock:
                self._events = []
            try:
                self.engine.run(workflow, out_dir=out_dir, targets=targets, temp_dir=temp_dir, interrupt=flag,
                                progress=self._progress, events=self._event)
                return {"status": "success"}
            except (Interrupted, NodegraphError) as exc:
                return failure(exc)
            finally:
                self._release()

    def _event(self, kind: str, node_id, value) -> None:
        if kind == "done":
            value = [str(path) for path in value]
        with self._lock:
            self._events.append(("event", kind, node_id, value))

    def _progress(self, event) -> None:
        with self._lock:
            self._events.append(("progress", event.step, event.total, event.node_id))

    def drain(self) -> list[tuple]:
        with self._lock:
            events, self._events = self._events, []
        return events

    def interrupt(self, prompt_id: str) -> None:
        self._flags.setdefault(prompt_id, InterruptFlag()).set()

    def free(self, unload_models: bool, free_memory: bool) -> None:
        """Done now when idle, else when the running prompt ends."""
        old = self._free or (False, False)
        self._free = (old[0] or unload_models, old[1] or free_memory)
        if self._running.acquire(blocking=False):
            try:
                self._release()
            finally:
                self._running.release()

    def _release(self) -> None:
        free, self._free = self._free, None
        if free is not None:
            release(self.engine, *free)


@dataclass
class Run:
    prompt: Prompt
    worker: str
    execution: Execution


class RayPromptQueue(PromptQueue):
    """PromptQueue whose prompts run on a RayPool of PromptActors, one per actor at a time."""

    def __init__(self, engine, send, output_dir, temp_dir, max_queue, max_history, pool, attempts: int = 3):
        super().__init__(engine, send, output_dir, temp_dir, max_queue, max_history)
        self.pool, self.ray, self.attempts = pool, pool.ray, attempts
        self.live = list(pool.workers)
        self.holds: dict[str, set[str]] = {w: set() for w in pool.workers}
        self.runs: dict[str, Run] = {}  # prompt_id -> its run, while it runs
        self.started: dict[str, Execution] = {}  # prompts waiting for a retry: their run so far
        self.tries: dict[str, int] = {}
        self._threads: list[threading.Thread] = []

    # ------------------------------------------------------------------ what the routes see

    def remaining(self) -> int:
        with self._cond:
            return len(self.pending) + len(self.runs)

    def _taken(self, prompt_id: str) -> bool:
        return prompt_id in self.runs or super()._taken(prompt_id)

    def listing(self) -> dict:
        with self._cond:
            running = [r.prompt.item() for r in sorted(self.runs.values(), key=lambda r: r.prompt.number)]
            pending = [p.item() for _, _, p in sorted(self.pending)]
        return {"queue_running": running, "queue_pending": pending}

    def delete(self, prompt_ids) -> None:
        """A deleted prompt that was waiting for a retry takes its run so far with it: a later prompt of its id
        starts afresh (in one go, so the dispatcher cannot pick it in between)."""
        with self._cond:
            ids = set(prompt_ids)
            for _, _, prompt in self.pending:
                if prompt.prompt_id in ids:
                    self._forget(prompt.prompt_id)
            self.pending = [entry for entry in self.pending if entry[2].prompt_id not in ids]
            heapq.heapify(self.pending)
        self.status()

    def clear(self) -> None:
        with self._cond:
            for _, _, prompt in self.pending:
                self._forget(prompt.prompt_id)
            self.pending.clear()
        self.status()

    def _forget(self, prompt_id: str) -> None:
        self.started.pop(prompt_id, None)
        self.tries.pop(prompt_id, None)

    def interrupt(self, prompt_id: str | None = None) -> None:
        """Every running prompt (only ``prompt_id``, when given): its actor stops at the next node or step."""
        with self._cond:
            runs = [r for pid, r in self.runs.items() if prompt_id is None or pid == prompt_id]
        for run in runs:
            run.execution.flag.set()
            self.pool.actors[run.worker].interrupt.remote(run.prompt.prompt_id)

    def running_for(self, sid: str) -> Execution | None:
        with self._cond:
            return next((r.execution for r in self.runs.values() if r.execution.sid == sid), None)

    def stop(self, timeout: float = 30) -> None:
        self.interrupt()
        super().stop(timeout)
        for thread in list(self._threads):
            thread.join(timeout)
        self.pool.close()

    # ------------------------------------------------------------------ the dispatcher

    def _idle(self) -> list[str]:
        busy = {r.worker for r in self.runs.values()}
        return [w for w in self.live if w not in busy]

    def _pick(self) -> list[tuple[str, Prompt]]:
        """Idle actors and waiting prompts, paired: the batch pool's affinity, then queue order."""
        waiting = [p for _, _, p in sorted(self.pending)]
        holders = lambda models: [w for w in self.live if models and set(models) <= self.holds[w]]  # noqa: E731
        rules = (lambda w, p: bool(p.models) and set(p.models) <= self.holds[w],
                 lambda w, p: not holders(p.models),
                 lambda w, p: True)
        picks, idle = [], self._idle()
        for rule in rules:
            for worker in list(idle):
                prompt = next((p for p in waiting if rule(worker, p)), None)
                if prompt is not None:
                    picks.append((worker, prompt))
                    waiting.remove(prompt)
                    idle.remove(worker)
                    self.holds[worker].update(prompt.models)
        taken = {id(p) for _, p in picks}
        self.pending = [e for e in self.pending if id(e[2]) not in taken]
        heapq.heapify(self.pending)
        return picks

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and self._free is None and not (
                        self.pending and (self._idle() or not self.live)):
                    self._cond.wait()
                if self._stopping:
                    return
                free, self._free = self._free, None
                orphans = [] if self.live else [p for _, _, p in sorted(self.pending)]
                if orphans:
                    self.pending.clear()
                picks = self._pick() if self.live and free is None else []  # after a /free: next time round
                for worker, prompt in picks:
                    fresh = prompt.prompt_id not in self.started
                    execution = self.started.pop(prompt.prompt_id, None) or Execution(self, prompt, InterruptFlag())
                    self.runs[prompt.prompt_id] = Run(prompt, worker, execution)
                    self.tries[prompt.prompt_id] = self.tries.get(prompt.prompt_id, 0) + 1
                    thread = threading.Thread(target=self._run, args=(self.runs[prompt.prompt_id], fresh),
                                              name=f"nodegraph-prompt-{worker}", daemon=True)
                    self._threads.append(thread)
                    thread.start()
            if free is not None:  # waited for, so a prompt picked next runs after it (a busy actor defers it)
                for worker in list(self.live):
                    try:
                        self.ray.get(self.pool.actors[worker].free.remote(*free))
                    except Exception as exc:  # noqa: BLE001 - a dead actor is noticed by its next prompt
                        log.warning("/free on Ray actor %s: %s", worker, exc)
            for prompt in orphans:
                execution = self.started.pop(prompt.prompt_id, None)
                if execution is None:
                    execution = Execution(self, prompt, InterruptFlag())
                    execution.start()
                self._record(prompt, execution.finish(_lost("no Ray actor is left to run it")))
            if picks or orphans:
                self.status()

    # ------------------------------------------------------------------ one prompt on one actor

    def _run(self, run: Run, fresh: bool) -> None:
        prompt = run.prompt
        try:
            if fresh:
                run.execution.start()
            result = self._remote(run)
        except Exception as exc:  # noqa: BLE001 - the pool says whether the actor died
            if self.pool.lost(exc):
                if self._retry(run):
                    return
                result = _lost(f"its Ray actor died ({self.tries.get(prompt.prompt_id)} tries; "
                               f"{len(self.live)} actors left)")
            else:
                log.exception("prompt %s: the server failed to run it", prompt.prompt_id)
                result = _lost(f"internal error: {type(exc).__name__}: {exc}")
        self._record(prompt, run.execution.finish(result))

    def _remote(self, run: Run) -> dict:
        """Run the prompt on its actor, relaying its events as they come; the actor's outcome."""
        actor, prompt, execution = self.pool.actors[run.worker], run.prompt, run.execution
        done = actor.run_prompt.remote(prompt.prompt_id, prompt.workflow, prompt.targets, str(self.output_dir),
                                       str(self.temp_dir))
        if execution.flag.is_set():  # interrupted between being picked and reaching the actor
            actor.interrupt.remote(prompt.prompt_id)
        while True:
            ready, _ = self.ray.wait([done], timeout=POLL_SECONDS)
            for event in self.ray.get(actor.drain.remote()):  # after the run ends: its last events
                if event[0] == "progress":
                    execution.progress(SimpleNamespace(step=event[1], total=event[2], node_id=event[3]))
                else:
                    execution.events(*event[1:])
            if ready:
                return self.ray.get(done)

    def _retry(self, run: Run) -> bool:
        """The actor died: forget it; the prompt waits at the front of the queue for another, if tries are left."""
        with self._cond:
            if run.worker in self.live:
                self.live.remove(run.worker)
            self.runs.pop(run.prompt.prompt_id, None)
            again = (self.tries[run.prompt.prompt_id] < self.attempts and self.live and not self._stopping
                     and not run.execution.flag.is_set())
            if again:
                log.warning("prompt %s: Ray actor %s died; running it again on another", run.prompt.prompt_id,
                            run.worker)
                self.started[run.prompt.prompt_id] = run.execution
                self._arrivals += 1
                heapq.heappush(self.pending, (float("-inf"), self._arrivals, run.prompt))
            self._cond.notify_all()
        return again

    def _record(self, prompt: Prompt, entry: dict) -> None:
        with self._cond:
            self.history[prompt.prompt_id] = entry  # before the final "executing", as ComfyUI
            while len(self.history) > self.max_history:
                self.history.popitem(last=False)
            self.runs.pop(prompt.prompt_id, None)
            self.tries.pop(prompt.prompt_id, None)
            self._threads = [t for t in self._threads if t.is_alive() and t is not threading.current_thread()]
            self._cond.notify_all()
        self.send("executing", {"node": None, "prompt_id": prompt.prompt_id}, prompt.extra_data.get("client_id"))
        self.status()


def _lost(message: str) -> dict:
    return {"status": "error", "node_id": None, "node_type": None, "message": message, "type": "RayActorError",
            "traceback": []}
