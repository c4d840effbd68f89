"""The websocket side: clients by id, and messages sent from any thread, in order, as ComfyUI sends them
(``{"type": ..., "data": ...}``; to one client by its id, or to every client). A socket opened with
``?monitor=1`` (the status page) also sees every other client's messages."""
from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from aiohttp import web

log = logging.getLogger("nodegraph.server")


class Hub:
    def __init__(self) -> None:
        self.sockets: dict[str, web.WebSocketResponse] = {}
        self.monitors: set[web.WebSocketResponse] = set()
        self.loop: asyncio.AbstractEventLoop | None = None
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._queue = asyncio.Queue()
        self._task = asyncio.create_task(self._pump())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        for ws in [*self.sockets.values(), *self.monitors]:
            await ws.close()

    def send_sync(self, event: str, data: Any, sid: str | None = None) -> None:
        """From any thread: queue a message for client ``sid`` (None: everyone)."""
        if self.loop is None or self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self._queue.put_nowait, (event, data, sid))

    def send_now(self, event: str, data: Any, sid: str | None = None) -> None:
        """From the event loop's own thread: queue a message at once (messages sent one after another this way
        stay together)."""
        self._queue.put_nowait((event, data, sid))

    async def _pump(self) -> None:
        while True:
            event, data, sid = await self._queue.get()
            text = json.dumps({"type": event, "data": data})
            if sid is None:
                targets = set(self.sockets.values()) | self.monitors
            else:
                targets = ({self.sockets[sid]} if sid in self.sockets else set()) | self.monitors
            for ws in targets:
                try:
                    await ws.send_str(text)
                except (ConnectionError, RuntimeError) as exc:  # a client that went away mid-send
                    log.debug("websocket send failed: %s", exc)
