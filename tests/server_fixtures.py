"""Folders, prompts and a small HTTP/websocket client for the server tests (tests/test_server*.py) and
benchmarks/server.py: a models root holding the tiny SD 1.x checkpoint, an input folder with a photo, and
bounded waits everywhere."""
from __future__ import annotations

import json
import shutil
import socket
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parent.parent
PHOTO = REPO / "tests" / "data" / "astronaut_96.png"
WAIT = 120  # seconds any one wait may take on a busy 2-core machine


def server_folders(root: Path, tiny) -> dict:
    """models/ (the tiny checkpoint as a diffusers folder and as a single file), input/photo.png (64 px)."""
    checkpoints = root / "models" / "checkpoints"
    checkpoints.mkdir(parents=True, exist_ok=True)
    if not (checkpoints / "tiny-sd15").exists():
        shutil.copytree(tiny.sd15, checkpoints / "tiny-sd15")
        shutil.copy(tiny.sd15_file, checkpoints / "tiny-sd15.safetensors")
        shutil.copytree(tiny.sd15_file_config, checkpoints / "tiny-sd15.config")
    (root / "input").mkdir(exist_ok=True)
    Image.open(PHOTO).convert("RGB").resize((64, 64)).save(root / "input" / "photo.png")
    return {"models": [root / "models"], "input": root / "input", "output": root / "output", "temp": root / "temp"}


def img2img(seed: int = 1, steps: int = 4, strength: float = 0.5, prefix: str = "img2img") -> dict:
    """A nodegraph img2img workflow on the tiny checkpoint and input/photo.png."""
    return {"format": "nodegraph/1", "nodes": {
        "ckpt": {"type": "LoadCheckpoint", "params": {"path": "tiny-sd15"}},
        "load": {"type": "LoadImage", "params": {"path": "photo.png"}},
        "enc": {"type": "VAEEncode", "inputs": {"vae": "ckpt.vae", "image": "load.image"}},
        "pos": {"type": "CLIPEncode", "inputs": {"clip": "ckpt.clip"}, "params": {"text": "an astronaut"}},
        "s": {"type": "Sampler", "inputs": {"model": "ckpt.model", "positive": "pos.conditioning",
                                            "latent": "enc.latent"},
              "params": {"seed": seed, "steps": steps, "strength": strength}},
        "dec": {"type": "VAEDecode", "inputs": {"vae": "ckpt.vae", "latent": "s.latent"}},
        "save": {"type": "SaveImage", "inputs": {"image": "dec.image"}, "params": {"prefix": prefix}}}}


def txt2img(seed: int, steps: int) -> dict:
    """A long txt2img workflow (for interrupts and a busy queue)."""
    return {"format": "nodegraph/1", "nodes": {
        "ckpt": {"type": "LoadCheckpoint", "params": {"path": "tiny-sd15"}},
        "pos": {"type": "CLIPEncode", "inputs": {"clip": "ckpt.clip"}, "params": {"text": "a long run"}},
        "empty": {"type": "EmptyLatent", "params": {"width": 64, "height": 64}},
        "s": {"type": "Sampler", "inputs": {"model": "ckpt.model", "positive": "pos.conditioning",
                                            "latent": "empty.latent"}, "params": {"seed": seed, "steps": steps}},
        "dec": {"type": "VAEDecode", "inputs": {"vae": "ckpt.vae", "latent": "s.latent"}},
        "save": {"type": "SaveImage", "inputs": {"image": "dec.image"}, "params": {"prefix": "long"}}}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request(url: str, body=None, method: str | None = None, timeout: float = WAIT) -> tuple[int, object]:
    """(status, parsed JSON or raw bytes) of a request. JSON bodies go without a JSON content type, as
    ComfyUI's example scripts send them (urllib's form default)."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method or ("POST" if data is not None else "GET"))
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            status, raw, kind = resp.status, resp.read(), resp.headers.get("Content-Type", "")
    except urllib.error.HTTPError as exc:
        status, raw, kind = exc.code, exc.read(), exc.headers.get("Content-Type", "")
    return status, json.loads(raw) if "json" in kind and raw else raw


def connect(url: str, client_id: str | None = None):
    """A websocket-client connection to /ws, as ComfyUI's websockets_api_example.py makes it."""
    import websocket

    client_id = client_id or uuid.uuid4().hex
    ws = websocket.WebSocket()
    ws.connect(f"{url.replace('http://', 'ws://')}/ws?clientId={client_id}", timeout=WAIT)
    return ws, client_id


def until_done(ws, prompt_id: str, timeout: float = WAIT) -> list[dict]:
    """Every message up to and including ``executing`` with node None for ``prompt_id``."""
    messages, end = [], time.monotonic() + timeout
    while time.monotonic() < end:
        ws.settimeout(max(end - time.monotonic(), 0.1))
        raw = ws.recv()
        if not isinstance(raw, str):
            continue
        message = json.loads(raw)
        messages.append(message)
        data = message["data"]
        if message["type"] == "executing" and data.get("node") is None and data.get("prompt_id") == prompt_id:
            return messages
    raise TimeoutError(f"prompt {prompt_id} did not finish within {timeout} s")


def run_prompt(url: str, prompt: dict, **extra) -> tuple[str, list[dict]]:
    """ComfyUI's example client: connect, queue, read until our prompt is done; (prompt id, messages)."""
    ws, client_id = connect(url)
    try:
        status, answer = request(f"{url}/prompt", {"prompt": prompt, "client_id": client_id, **extra})
        assert status == 200, answer
        return answer["prompt_id"], until_done(ws, answer["prompt_id"])
    finally:
        ws.close()


def ran_nodes(messages) -> list[str]:
    """The nodes the messages say were executed, in order."""
    return [m["data"]["node"] for m in messages if m["type"] == "executing" and m["data"]["node"]]


def cached_nodes(messages) -> list[str]:
    """The nodes of the (first) execution_cached message."""
    return next(m["data"]["nodes"] for m in messages if m["type"] == "execution_cached")


def wait_for(check, timeout: float = WAIT, every: float = 0.05):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = check()
        if value:
            return value
        time.sleep(every)
    raise TimeoutError(f"not true within {timeout} s")


def until_progress(ws) -> list[dict]:
    """The messages up to and including the first progress message."""
    messages = [json.loads(ws.recv())]
    while messages[-1]["type"] != "progress":
        messages.append(json.loads(ws.recv()))
    return messages


def kinds(messages, prompt_id):
    return [m["type"] for m in messages if m["data"].get("prompt_id") == prompt_id]


def assert_interrupted_in_the_sampler(messages, prompt_id):
    """A txt2img prompt (``txt2img``) interrupted during its long sampler: ComfyUI's messages say so."""
    order = kinds(messages, prompt_id)
    assert "execution_interrupted" in order and "execution_success" not in order
    interrupted = next(m["data"] for m in messages if m["type"] == "execution_interrupted")
    assert interrupted["node_id"] == "s" and set(interrupted["executed"]) == {"ckpt", "pos", "empty"}
    assert sum(m["type"] == "progress" for m in messages) < 900
