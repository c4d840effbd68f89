"""The websocket side: clients by id, and messages sent from any thread, in order, as ComfyUI sends them
(``{"type": ..., "data": ...}``; to one client by its id, or to every client)."""
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
        for ws in list(self.sockets.values()):
            await ws.close()

    def send_sync(self, event: str, data: Any, sid: str | None = None) -> None:
        """From any thread: queue a message for client ``sid`` (None: everyone)."""
        if self.loop is None or self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self._queue.put_nowait, (event, data, sid))

    async def _pump(self) -> None:
        while True:
            event, data, sid = await self._queue.get()
            text = json.dumps({"type": event, "data": data})
            targets = list(self.sockets.values()) if sid is None else [self.sockets[sid]] if sid in self.sockets else []
            for ws in targets:
                try:
                    await ws.send_str(text)
                except (ConnectionError, RuntimeError) as exc:  # a client that went away mid-send
                    log.debug("websocket send failed: %s", exc)
