"""``nodegraph serve``: ComfyUI's HTTP and websocket API on aiohttp (docs/server.md).

Every route answers at its ComfyUI path and again under ``/api/``. Prompts are validated in full when they
are posted; one worker (queue.py) runs them in order on one long-lived Engine."""
from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import math
import os
import platform
import sys
import threading
import urllib.parse
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

from ..api import Engine
from ..confine import Confinement
from ..errors import NodegraphError
from ..limits import Limits
from ..model_folders import FOLDERS, ModelRoots
from .folders import Folders, OutsideFolder, inside
from .messages import Hub
from .object_info import object_info
from .prompts import PromptRejected, error_body, prepare
from .queue import PromptIdTaken, PromptQueue
from .options import SERVED_MAX_NODES
from .uploads import upload_image, upload_mask

log = logging.getLogger("nodegraph.server")
PAGE = Path(__file__).parent / "page"
VERSION = "nodegraph-0.1.0"


@dataclass
class ServerConfig:
    """What ``nodegraph serve`` is started with; sizes in bytes, None for the Engine's default."""

    listen: str = "127.0.0.1"
    port: int = 8188
    models: list[Path] = field(default_factory=list)
    input: Path = Path("input")
    output: Path = Path("output")
    temp: Path | None = None
    cache_dir: Path | None | bool = None
    cache_size: int | str | None = None
    memory_budget: int | None = None
    allow_download: bool = False
    max_queue: int = 100
    max_nodes: int = SERVED_MAX_NODES
    max_pixels: int = 2**25
    max_upload: int = 100 * 1024**2  # request body limit (aiohttp's client_max_size)
    max_history: int = 10_000
    plugin_dirs: list[str] = field(default_factory=list)
    model_paths: Path | None = None  # the model paths file; None: $NODEGRAPH_MODEL_PATHS or the user's one
    ray: bool = False  # run prompts on Ray actors (ray_queue.py)
    ray_address: str | None = None  # None: start a local Ray; "auto": the running cluster
    workers: int | None = None  # actors (default: one per GPU of the cluster, else one)
    threads: int | None = None  # torch threads per actor


class Server:
    """The engine, the queue, the websocket hub and the folders behind the routes. An ``engine`` given here
    is used as it is (its own confinement and limits, none unless it was made with them)."""

    def __init__(self, config: ServerConfig, engine: Engine | None = None):
        self.config = config
        temp = config.temp or Path(config.output).parent / "temp"
        self.folders = Folders(Path(config.input).resolve(), Path(config.output).resolve(), Path(temp).resolve())
        self.folders.create()
        models = ModelRoots.gather(config.models, config.model_paths, origin="--models")
        confine = Confinement.for_server(self.folders.input, models, config.allow_download)
        extra = {"memory_budget": config.memory_budget} if config.memory_budget else {}
        options = dict(plugin_dirs=config.plugin_dirs or None, cache_dir=config.cache_dir,
                       cache_size=config.cache_size, models=models, confine=confine,
                       limits=Limits(max_nodes=config.max_nodes, max_pixels=config.max_pixels), **extra)
        self.engine = engine or Engine(**options)  # validates prompts; runs them too without Ray
        self.hub = Hub()
        queue = (self.folders.output, self.folders.temp, config.max_queue, config.max_history)
        if config.ray:  # the actors' Engines are made with the same options: same confinement and limits
            from ..batch.ray_pool import RayPool
            from .ray_queue import PromptActor, RayPromptQueue

            pool = RayPool(options, config.ray_address, config.workers, config.threads, actor_class=PromptActor,
                           max_concurrency=2)
            self.queue = RayPromptQueue(self.engine, self.hub.send_sync, *queue, pool)
        else:
            self.queue = PromptQueue(self.engine, self.hub.send_sync, *queue)

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.config.max_upload, middlewares=[same_origin])
        routes = [
            ("GET", "/ws", self.websocket), ("GET", "/prompt", self.get_prompt), ("POST", "/prompt", self.post_prompt),
            ("GET", "/queue", self.get_queue), ("POST", "/queue", self.post_queue),
            ("POST", "/interrupt", self.interrupt), ("POST", "/free", self.free), ("GET", "/history", self.get_history),
            ("GET", "/history/{prompt_id}", self.get_history), ("POST", "/history", self.post_history),
            ("GET", "/view", self.view), ("POST", "/upload/image", self.upload_image),
            ("POST", "/upload/mask", self.upload_mask), ("GET", "/object_info", self.object_info),
            ("GET", "/object_info/{node_class}", self.object_info), ("GET", "/system_stats", self.system_stats),
            ("GET", "/models", self.models), ("GET", "/models/{folder}", self.models),
            ("GET", "/embeddings", self.empty_list), ("GET", "/extensions", self.empty_list),
            ("GET", "/features", self.features),
        ]
        for method, path, handler in routes:
            app.router.add_route(method, path, handler)
            app.router.add_route(method, "/api" + path, handler)
        app.router.add_get("/", self.index)
        app.router.add_static("/page/", PAGE)
        app.on_startup.append(self._start)
        app.on_shutdown.append(self._close_sockets)
        app.on_cleanup.append(self._stop)
        return app

    async def _start(self, app) -> None:
        await self.hub.start()
        self.queue.start()

    async def _close_sockets(self, app) -> None:
        await self.hub.stop()

    async def _stop(self, app) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self.queue.stop)

    # ------------------------------------------------------------------ prompts and the queue

    async def websocket(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        sid = request.query.get("clientId") or uuid.uuid4().hex
        monitor = request.query.get("monitor") in ("1", "true")
        if monitor:
            self.hub.monitors.add(ws)
        else:
            self.hub.sockets[sid] = ws
        try:
            status = {"status": {"exec_info": {"queue_remaining": self.queue.remaining()}}, "sid": sid}
            if monitor:
                await ws.send_str(json.dumps({"type": "status", "data": status}))
            else:
                self.hub.send_now("status", status, sid)
                current = self.queue.running_for(sid)  # a client back while its prompt runs hears where it is
                if current is not None and current.last is not None:
                    self.hub.send_now("executing", {"node": current.last, "display_node": current.last,
                                                     "prompt_id": current.prompt.prompt_id}, sid)
            async for _ in ws:  # clients' messages (feature flags) need no answer
                pass
        finally:
            self.hub.monitors.discard(ws)
            if self.hub.sockets.get(sid) is ws:
                del self.hub.sockets[sid]
        return ws

    async def get_prompt(self, request: web.Request) -> web.Response:
        return web.json_response({"exec_info": {"queue_remaining": self.queue.remaining()}})

    async def post_prompt(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except (ValueError, UnicodeDecodeError, RecursionError):
            return web.json_response(error_body("invalid_prompt", "the request body is not JSON (or is nested too "
                                                                  "deeply)"), status=400)
        if not isinstance(body, dict) or "prompt" not in body:
            return web.json_response(error_body("no_prompt", "No prompt provided", "No prompt provided"), status=400)
        if self.queue.full():
            return web.json_response(self._full(), status=429)
        try:
            number = float(body["number"]) if "number" in body else self.queue.next_number(bool(body.get("front")))
        except (TypeError, ValueError, OverflowError):  # OverflowError: an integer beyond a float's range
            number = math.nan
        if not math.isfinite(number):  # NaN or infinity would make /queue and /history answer with invalid JSON
            return web.json_response(error_body("invalid_prompt", "number must be a finite number"), status=400)
        prompt_id = str(body.get("prompt_id") or uuid.uuid4())
        extra_data = dict(body.get("extra_data") or {}) if isinstance(body.get("extra_data") or {}, dict) else {}
        if body.get("client_id") is not None:
            extra_data["client_id"] = str(body["client_id"])
        targets = body.get("partial_execution_targets")
        if targets is not None and (not isinstance(targets, list) or not all(isinstance(t, (str, int)) for t in targets)):
            return web.json_response(error_body("invalid_prompt", "partial_execution_targets must be a list of node "
                                                                  "ids"), status=400)
        loop = asyncio.get_running_loop()
        try:
            prompt = await loop.run_in_executor(None, prepare, self.engine, body["prompt"], number, prompt_id,
                                                extra_data, self.folders.input, targets)
        except PromptRejected as exc:
            return web.json_response(exc.body, status=400)
        try:
            if not self.queue.put(prompt):
                return web.json_response(self._full(), status=429)
        except PromptIdTaken as exc:
            return web.json_response(error_body("invalid_prompt", str(exc)), status=400)
        return web.json_response({"prompt_id": prompt_id, "number": number, "node_errors": {}})

    def _full(self) -> dict:
        return error_body("queue_full", f"the queue is full ({self.config.max_queue} prompts waiting); try again "
                                        "when it has room", "raise the limit with --max-queue")

    async def get_queue(self, request: web.Request) -> web.Response:
        return web.json_response(self.queue.listing())

    async def post_queue(self, request: web.Request) -> web.Response:
        body = await _json(request)
        if body.get("clear"):
            self.queue.clear()
        if isinstance(body.get("delete"), list):
            self.queue.delete(str(i) for i in body["delete"])
        return web.Response(status=200)

    async def interrupt(self, request: web.Request) -> web.Response:
        body = await _json(request)
        self.queue.interrupt(body.get("prompt_id"))
        return web.Response(status=200)

    async def free(self, request: web.Request) -> web.Response:
        body = await _json(request)
        self.queue.request_free(bool(body.get("unload_models")), bool(body.get("free_memory")))
        return web.Response(status=200)

    async def get_history(self, request: web.Request) -> web.Response:
        prompt_id = request.match_info.get("prompt_id")
        try:
            max_items = int(request.query["max_items"]) if "max_items" in request.query else None
            offset = int(request.query.get("offset", -1))
        except ValueError:
            return web.json_response(error_body("bad_request", "max_items and offset must be integers"), status=400)
        return web.json_response(self.queue.get_history(prompt_id, max_items, offset))

    async def post_history(self, request: web.Request) -> web.Response:
        body = await _json(request)
        if body.get("clear"):
            self.queue.delete_history()
        if isinstance(body.get("delete"), list):
            self.queue.delete_history([str(i) for i in body["delete"]])
        return web.Response(status=200)

    # ------------------------------------------------------------------ files

    async def view(self, request: web.Request) -> web.StreamResponse:
        query = request.query
        filename, kind = query.get("filename", ""), query.get("type")
        for annotated in ("output", "input", "temp"):  # ComfyUI's "name.png [input]"
            if filename.endswith(f" [{annotated}]"):
                filename, kind = filename[:-len(annotated) - 3], annotated
        folder = self.folders.of(kind)
        if not filename or folder is None:
            return web.Response(status=400, text="give filename and a type of output, input or temp")
        try:
            path = inside(folder, query.get("subfolder", ""), filename)
        except OutsideFolder as exc:
            return web.Response(status=403, text=str(exc))
        try:
            found = path.is_file()
        except OSError:  # a name too long for the file system: no such file, as ComfyUI answers
            found = False
        if not found:
            return web.Response(status=404)
        name = path.name  # a name with a quote or a line break (an upload may give one) is sent escaped
        plain = name.isprintable() and not any(c in name for c in '"\\')
        disposition = f'filename="{name}"' if plain else f"filename*=UTF-8''{urllib.parse.quote(name)}"
        return web.FileResponse(path, headers={"Content-Disposition": disposition})

    async def upload_image(self, request: web.Request) -> web.Response:
        return await upload_image(request, self.folders)

    async def upload_mask(self, request: web.Request) -> web.Response:
        return await upload_mask(request, self.folders, self.engine.limits)

    # ------------------------------------------------------------------ what the server has

    async def object_info(self, request: web.Request) -> web.Response:
        loop = asyncio.get_running_loop()
        info = await loop.run_in_executor(None, object_info, self.engine.registry, self.engine.models,
                                          self.folders.input)
        name = request.match_info.get("node_class")
        if name is not None:
            info = {name: info[name]} if name in info else {}
        return web.json_response(info)

    async def system_stats(self, request: web.Request) -> web.Response:
        import torch

        pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        free = os.sysconf("SC_AVPHYS_PAGES") * size
        devices = []
        if torch.cuda.is_available():
            for index in range(torch.cuda.device_count()):
                free_vram, total_vram = torch.cuda.mem_get_info(index)
                devices.append({"name": torch.cuda.get_device_name(index), "type": "cuda", "index": index,
                                "vram_total": total_vram, "vram_free": free_vram, "torch_vram_total": total_vram,
                                "torch_vram_free": free_vram})
        else:
            devices.append({"name": "cpu", "type": "cpu", "index": None, "vram_total": pages * size,
                            "vram_free": free, "torch_vram_total": 0, "torch_vram_free": 0})
        return web.json_response({
            "system": {"os": sys.platform, "ram_total": pages * size, "ram_free": free, "comfyui_version": VERSION,
                       "python_version": sys.version, "pytorch_version": torch.__version__,
                       "embedded_python": False, "argv": sys.argv, "platform": platform.platform()},
            "devices": devices})

    async def models(self, request: web.Request) -> web.Response:
        folder = request.match_info.get("folder")
        if folder is None:
            return web.json_response(list(FOLDERS))
        if folder not in FOLDERS:
            return web.Response(status=404, text=f"no models folder '{folder}'")
        names = sorted({e.name for e in self.engine.models.entries(folder, also=False)})
        return web.json_response(names)

    async def empty_list(self, request: web.Request) -> web.Response:
        return web.json_response([])

    async def features(self, request: web.Request) -> web.Response:
        return web.json_response({"supports_preview_metadata": False, "max_upload_size": self.config.max_upload})

    async def index(self, request: web.Request) -> web.FileResponse:
        return web.FileResponse(PAGE / "index.html")


@web.middleware
async def same_origin(request: web.Request, handler):
    """As ComfyUI: a browser page from another site must not queue prompts on a server bound to this machine
    (browsers send such cross-site POSTs to 127.0.0.1); its Origin then names another host than Host."""
    host, origin = request.headers.get("Host"), request.headers.get("Origin")
    if host and origin:
        try:
            host_name = urllib.parse.urlsplit("//" + host).hostname
            other = _loopback(host_name) and urllib.parse.urlsplit(origin).netloc.lower() != host.lower()
        except ValueError:  # a malformed Host or Origin (no browser sends one): it cannot be shown to match
            other = True
        if other:
            return web.Response(status=403, text="cross-site request refused (Origin does not match Host)")
    return await handler(request)


def _loopback(name: str | None) -> bool:
    if not name:
        return False
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


async def _json(request: web.Request) -> dict:
    try:
        body = await request.json()
    except (ValueError, UnicodeDecodeError, RecursionError):
        return {}
    return body if isinstance(body, dict) else {}


def serve(config: ServerConfig) -> None:
    """Run the server until Ctrl-C."""
    server = Server(config)
    started = (f"nodegraph serve: http://{config.listen}:{config.port} (input {server.folders.input}, output "
               f"{server.folders.output}); Ctrl-C stops it")
    from aiohttp.web_runner import GracefulExit

    try:  # aiohttp prints once it listens; the first Ctrl-C or SIGTERM stops it cleanly (exit 0)
        web.run_app(server.app(), host=config.listen, port=config.port, print=lambda _: print(started, flush=True))
    except GracefulExit:  # a second signal while shutting down (aiohttp's SystemExit): interrupted, not a success
        raise KeyboardInterrupt("stopped by a second signal while shutting down") from None
    except OSError as exc:  # the port is taken, or the address is not this machine's
        raise NodegraphError(f"cannot listen on {config.listen}:{config.port}: {exc.strerror or exc}; choose "
                             "another --port or --listen") from None


class Running:
    """A server running in a background thread (tests, benchmarks, notebooks): ``url``, ``stop()``."""

    def __init__(self, config: ServerConfig, engine: Engine | None = None):
        self.server = Server(config, engine)
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="nodegraph-server", daemon=True)
        self._thread.start()
        if not self._ready.wait(60):
            raise RuntimeError("the server did not start within 60 s")
        if self.error is not None:
            raise self.error
        self.url = f"http://{config.listen}:{self.port}"

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.error = None
        try:
            self.runner = web.AppRunner(self.server.app())
            self.loop.run_until_complete(self.runner.setup())
            site = web.TCPSite(self.runner, self.server.config.listen, self.server.config.port)
            self.loop.run_until_complete(site.start())
            self.port = site._server.sockets[0].getsockname()[1]
        except BaseException as exc:  # reported to the starting thread
            self.error = exc
            self._ready.set()
            return
        self._ready.set()
        self.loop.run_forever()
        self.loop.run_until_complete(self.runner.cleanup())
        self.loop.close()

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(60)
