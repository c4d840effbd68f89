"""The prompt queue and its one worker: prompts run in order (lowest number first) on one long-lived Engine,
so models stay loaded and caches warm from one prompt to the next. The worker reports each run as ComfyUI's
websocket messages and keeps ComfyUI's history entries."""
from __future__ import annotations

import heapq
import logging
import threading
import time
import traceback
from collections import OrderedDict
from pathlib import Path
from typing import Callable

from ..context import InterruptFlag
from ..errors import Interrupted, NodeFailed, NodegraphError, WorkflowInvalid
from .prompts import Prompt

log = logging.getLogger("nodegraph.server")
MAX_HISTORY = 10_000  # as ComfyUI


def _now() -> int:
    return int(time.time() * 1000)


class PromptIdTaken(NodegraphError):
    """A prompt posted with the id of one still waiting or running."""

    def __init__(self, prompt_id: str):
        super().__init__(f"prompt_id '{prompt_id}' is already queued or running; give a new one, or none for the "
                         "server to choose")


class PromptQueue:
    """Pending prompts, the running one, and the history; ``send(event, data, sid)`` delivers messages."""

    def __init__(self, engine, send: Callable, output_dir: Path, temp_dir: Path, max_queue: int = 100,
                 max_history: int = MAX_HISTORY):
        self.engine, self.send = engine, send
        self.output_dir, self.temp_dir = Path(output_dir), Path(temp_dir)
        self.max_queue, self.max_history = max_queue, max_history
        self.pending: list[tuple[float, int, Prompt]] = []  # a heap: (number, arrival, prompt)
        self.running: Prompt | None = None
        self.execution: Execution | None = None  # the running prompt's run, for a client that reconnects
        self.flag: InterruptFlag | None = None
        self.history: OrderedDict[str, dict] = OrderedDict()
        self.number = 0  # the next number given to a prompt without one
        self._arrivals = 0
        self._cond = threading.Condition()
        self._stopping = False
        self._free: tuple[bool, bool] | None = None  # (unload_models, free_memory) asked for by POST /free
        self._thread = threading.Thread(target=self._work, name="nodegraph-prompt-worker", daemon=True)

    # ------------------------------------------------------------------ the queue

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 30) -> None:
        with self._cond:
            self._stopping = True
            self.pending.clear()
            if self.flag is not None:
                self.flag.set()
            self._cond.notify_all()
        self._thread.join(timeout)

    def next_number(self, front: bool = False) -> float:
        with self._cond:
            number = self.number
            self.number += 1
        return -number if front else number

    def full(self) -> bool:
        with self._cond:
            return len(self.pending) >= self.max_queue

    def put(self, prompt: Prompt) -> bool:
        """Queue a validated prompt; False when the queue is full, PromptIdTaken when a prompt waiting or running
        has its id (the history, /queue deletes and interrupts name prompts by id)."""
        with self._cond:
            if self._taken(prompt.prompt_id):
                raise PromptIdTaken(prompt.prompt_id)
            if len(self.pending) >= self.max_queue:
                return False
            self._arrivals += 1
            heapq.heappush(self.pending, (prompt.number, self._arrivals, prompt))
            self._cond.notify()
        self.status()
        return True

    def _taken(self, prompt_id: str) -> bool:
        """Whether a waiting or running prompt has this id (the lock held)."""
        running = self.running is not None and self.running.prompt_id == prompt_id
        return running or any(p.prompt_id == prompt_id for _, _, p in self.pending)

    def remaining(self) -> int:
        with self._cond:
            return len(self.pending) + (self.running is not None)

    def status(self) -> None:
        """ComfyUI's "status" message, to every client."""
        self.send("status", {"status": {"exec_info": {"queue_remaining": self.remaining()}}})

    def listing(self) -> dict:
        with self._cond:
            running = [self.running.item()] if self.running is not None else []
            pending = [p.item() for _, _, p in sorted(self.pending)]
        return {"queue_running": running, "queue_pending": pending}

    def delete(self, prompt_ids) -> None:
        with self._cond:
            ids = set(prompt_ids)
            self.pending = [entry for entry in self.pending if entry[2].prompt_id not in ids]
            heapq.heapify(self.pending)
        self.status()

    def clear(self) -> None:
        with self._cond:
            self.pending.clear()
        self.status()

    def interrupt(self, prompt_id: str | None = None) -> None:
        """Stop the running prompt (only if it is ``prompt_id``, when given) at the next node or step."""
        with self._cond:
            if self.flag is not None and (prompt_id is None or self.running.prompt_id == prompt_id):
                self.flag.set()

    # ------------------------------------------------------------------ history

    def get_history(self, prompt_id: str | None = None, max_items: int | None = None, offset: int = -1) -> dict:
        """One entry, or the entries from ``offset`` on (oldest first), at most ``max_items``; without an offset,
        the last ``max_items`` (ComfyUI's reading of the two)."""
        with self._cond:
            if prompt_id is not None:
                return {prompt_id: self.history[prompt_id]} if prompt_id in self.history else {}
            items = list(self.history.items())
        if offset < 0:
            offset = max(len(items) - max_items, 0) if max_items is not None else 0
        end = offset + max(max_items, 0) if max_items is not None else None
        return dict(items[offset:end])

    def delete_history(self, prompt_ids=None) -> None:
        with self._cond:
            if prompt_ids is None:
                self.history.clear()
            for prompt_id in prompt_ids or ():
                self.history.pop(prompt_id, None)

    # ------------------------------------------------------------------ the worker

    def request_free(self, unload_models: bool, free_memory: bool) -> None:
        """ComfyUI's /free: done by the worker before the next prompt (at once when idle), never during one."""
        with self._cond:
            old = self._free or (False, False)
            self._free = (old[0] or unload_models, old[1] or free_memory)
            self._cond.notify_all()

    def _release(self, unload_models: bool, free_memory: bool) -> None:
        release(self.engine, unload_models, free_memory)

    def _take(self) -> Prompt | None:
        while True:
            with self._cond:
                while not self.pending and not self._stopping and self._free is None:
                    self._cond.wait()
                if self._stopping:
                    return None
                free, self._free = self._free, None
                if free is None:
                    _, _, prompt = heapq.heappop(self.pending)
                    self.running, self.flag = prompt, InterruptFlag()
                    return prompt
            self._release(*free)

    def _work(self) -> None:
        while (prompt := self._take()) is not None:
            self.status()
            try:
                self.execution = Execution(self, prompt, self.flag)
                entry = self.execution.run(self._run_here)
            except Exception:  # the worker must outlive any one prompt
                log.exception("prompt %s: the server failed to run it", prompt.prompt_id)
                entry = {"prompt": prompt.item(), "outputs": {}, "meta": {},
                         "status": {"status_str": "error", "completed": False, "messages": []}}
            with self._cond:
                self.history[prompt.prompt_id] = entry  # before the final "executing", as ComfyUI
                while len(self.history) > self.max_history:
                    self.history.popitem(last=False)
                self.running = self.flag = self.execution = None
            self.send("executing", {"node": None, "prompt_id": prompt.prompt_id}, prompt.extra_data.get("client_id"))
            self.status()

    def _run_here(self, execution: "Execution") -> None:
        prompt = execution.prompt
        self.engine.run(prompt.workflow, out_dir=self.output_dir, targets=prompt.targets, temp_dir=self.temp_dir,
                        interrupt=execution.flag, progress=execution.progress, events=execution.events)

    def running_for(self, sid: str) -> "Execution | None":
        """The running prompt's run if ``sid`` queued it (a client that reconnects hears where it is)."""
        current = self.execution
        return current if current is not None and current.sid == sid else None


def release(engine, unload_models: bool, free_memory: bool) -> None:
    """ComfyUI's /free on one Engine. unload_models: every model off the device (to the CPU); free_memory: the
    memory cache emptied and the loaded models forgotten (the disk cache stays), so they leave RAM too."""
    import gc

    from nodegraph.nodes._loading import release_all_loaded
    from nodegraph.nodes._memory import MANAGER

    if unload_models or free_memory:
        MANAGER.unload_all()
    if free_memory:
        engine.memory.clear()
        release_all_loaded()
        gc.collect()
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def failure(exc: BaseException) -> dict:
    """How a run ended, as plain data (it crosses to the server from a Ray actor): ``status`` interrupted or
    error, with the failed node and the exception's text."""
    if isinstance(exc, Interrupted):
        return {"status": "interrupted"}
    invalid = next((i for i in exc.issues if i.node_id is not None), None) if isinstance(exc, WorkflowInvalid) else None
    if invalid is not None:  # a file changed after the prompt was queued: the client is told which node reads it
        return {"status": "error", "node_id": invalid.node_id, "node_type": invalid.node_type, "message": str(exc),
                "type": type(exc).__name__, "traceback": []}
    if isinstance(exc, NodeFailed):
        return {"status": "error", "node_id": exc.node_id, "node_type": exc.node_type, "message": str(exc),
                "type": f"{type(exc.cause).__module__}.{type(exc.cause).__name__}",
                "traceback": traceback.format_exception_only(exc.cause)}
    return {"status": "error", "node_id": None, "node_type": None, "message": str(exc),  # a file changed, say
            "type": type(exc).__name__, "traceback": []}


class Execution:
    """One prompt's run: ComfyUI's messages from the engine's events, and the history entry it ends with."""

    def __init__(self, queue: PromptQueue, prompt: Prompt, flag: InterruptFlag):
        self.queue, self.prompt, self.flag = queue, prompt, flag
        self.sid = prompt.extra_data.get("client_id")
        self.messages: list = []
        self.outputs: dict[str, dict] = {}
        self.executed: list[str] = []
        self.last: str | None = None

    def send(self, event: str, data: dict, keep: bool = False) -> None:
        data = {**data, "prompt_id": self.prompt.prompt_id}
        if keep:  # the messages ComfyUI keeps in the history entry's status
            data["timestamp"] = _now()
            self.messages.append([event, data])
            if self.sid is None and event != "execution_interrupted":
                return  # as ComfyUI: a prompt queued without a client_id announces only its nodes, to everyone
        self.queue.send(event, data, self.sid)

    def events(self, kind: str, node_id: str | None, value) -> None:
        name = self.prompt.client_id(node_id)
        if kind == "cached":
            cached = list(dict.fromkeys(self.prompt.client_id(n) for n in value))
            self.executed.extend(cached)  # ComfyUI counts cached nodes as executed
            self.send("execution_cached", {"nodes": cached}, keep=True)
        elif kind == "start":
            if name != self.last:  # an importer's helper nodes run as part of their ComfyUI node
                self.send("executing", {"node": name, "display_node": name})
                self.last = name
        elif kind == "done":
            if name not in self.executed:
                self.executed.append(name)
            images = [ref for ref in map(self.file_ref, value) if ref is not None]
            if images:
                output = self.outputs.setdefault(name, {"images": []})
                output["images"].extend(images)
                self.send("executed", {"node": name, "display_node": name, "output": {"images": images}})

    def progress(self, event) -> None:
        self.send("progress", {"value": event.step, "max": event.total, "node": self.prompt.client_id(event.node_id)})

    def file_ref(self, path: Path) -> dict | None:
        path = Path(path).resolve()
        for kind, root in (("output", self.queue.output_dir), ("temp", self.queue.temp_dir)):
            root = root.resolve()
            if root in path.parents:
                sub = path.parent.relative_to(root).as_posix()
                return {"filename": path.name, "subfolder": "" if sub == "." else sub, "type": kind}
        return None

    def start(self) -> None:
        self.send("execution_start", {}, keep=True)

    def run(self, call: Callable[["Execution"], dict | None]) -> dict:
        """Start, ``call(self)`` (it runs the prompt, feeding ``events`` and ``progress``; returns None or raises
        for the local Engine, returns ``failure``'s dict from an actor), then the history entry."""
        self.start()
        try:
            result = call(self) or {"status": "success"}
        except (Interrupted, NodegraphError) as exc:
            result = failure(exc)
        return self.finish(result)

    def finish(self, result: dict) -> dict:
        """The last message of the run (success, interrupted or error) and its history entry."""
        ok = result["status"] == "success"
        if ok:
            self.send("execution_success", {}, keep=True)
        elif result["status"] == "interrupted":
            node = self.last
            self.send("execution_interrupted", {"node_id": node, "node_type": self.prompt.class_types.get(node),
                                                "executed": self.executed}, keep=True)
        else:
            name = self.prompt.client_id(result["node_id"])
            self.send("execution_error", {
                "node_id": name, "node_type": self.prompt.class_types.get(name, result["node_type"]),
                "executed": self.executed, "exception_message": result["message"],
                "exception_type": result["type"], "traceback": result["traceback"], "current_inputs": {},
                "current_outputs": {}}, keep=True)
        meta = {n: {"node_id": n, "display_node": n, "parent_node": None, "real_node_id": n} for n in self.outputs}
        return {"prompt": self.prompt.item(), "outputs": self.outputs, "meta": meta,
                "status": {"status_str": "success" if ok else "error", "completed": ok, "messages": self.messages}}
