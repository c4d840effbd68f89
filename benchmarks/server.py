"""nodegraph serve against the same workflow run in-process, on CPU.

    PYTHONPATH=. python benchmarks/server.py [--batch 20] [--repeat 5] [--latency 30] [--prompts 1000]

The prompt: img2img on the tiny random SD 1.x model (tests/tiny_models.py) at 64x64, 4 steps at strength 0.5
(2 sampler steps), a new seed each time, so the sampler and decoder run for every prompt while the loader,
the image, its latents and the prompt's embeddings come from the memory cache, as on a real server. Both
sides use one long-lived Engine with the disk cache off and a small memory cache (--memory-budget).

  - throughput: --batch prompts posted to the server by one client and waited for on its websocket, against
    --batch Engine.run calls in a loop; interleaved pairs (alternating which side goes first), the median
    ratio server / in-process with its min-max and each side's median prompts per second;
  - queue latency: on an idle queue, the time from sending POST /prompt to receiving execution_start on the
    websocket, over --latency prompts (median, min-max);
  - memory: the process's resident size (the server runs in this process, in its own threads) after 100
    prompts and after --prompts prompts; the growth should stay within the memory cache's budget (plus the
    history's entries: ComfyUI keeps the last 10,000).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]

from loading import machine, quiet, summary  # noqa: E402


def rss_mib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


class Client:
    """One websocket client that posts prompts and waits until each is done."""

    def __init__(self, url: str):
        from tests.server_fixtures import connect

        self.url = url
        self.ws, self.client_id = connect(url)

    def post(self, prompt: dict) -> str:
        from tests.server_fixtures import request

        status, answer = request(f"{self.url}/prompt", {"prompt": prompt, "client_id": self.client_id})
        if status != 200:
            raise RuntimeError(f"POST /prompt answered {status}: {answer}")
        return answer["prompt_id"]

    def wait(self, prompt_ids: list[str], first: str | None = None) -> float | None:
        """Until every prompt is done; the time ``first`` arrives as an event type, if asked."""
        left, seen = set(prompt_ids), None
        deadline = time.monotonic() + 600
        while left:
            self.ws.settimeout(max(deadline - time.monotonic(), 0.1))
            message = json.loads(self.ws.recv())
            data = message["data"]
            if first and seen is None and message["type"] == first:
                seen = time.perf_counter()
            if message["type"] == "execution_error":
                raise RuntimeError(data["exception_message"])
            if message["type"] == "executing" and data.get("node") is None:
                left.discard(data.get("prompt_id"))
        return seen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=20, help="prompts per throughput measurement")
    parser.add_argument("--repeat", type=int, default=5, help="interleaved pairs of batches")
    parser.add_argument("--latency", type=int, default=30, help="prompts for the queue latency")
    parser.add_argument("--prompts", type=int, default=1000, help="prompts before the last memory reading")
    parser.add_argument("--memory-budget", type=int, default=64 * 1024**2, help="memory cache bytes (both sides)")
    args = parser.parse_args()
    quiet()
    load_at_start = os.getloadavg()[0]

    from nodegraph.api import Engine
    from nodegraph.server.app import Running, ServerConfig
    from tests.server_fixtures import img2img, server_folders
    from tests.tiny_models import build_tiny_models

    root = Path(tempfile.mkdtemp(prefix="nodegraph-bench-server-"))
    folders = server_folders(root, build_tiny_models(root / "tiny"))
    server = Running(ServerConfig(port=0, cache_dir=False, memory_budget=args.memory_budget, max_queue=100_000,
                                  **folders))
    engine = Engine(cache_dir=False, models=folders["models"], memory_budget=args.memory_budget)
    local = {**folders, "output": root / "local"}
    photo = str(folders["input"] / "photo.png")
    client = Client(server.url)
    seeds = iter(range(10**9))

    def served(n: int) -> None:
        client.wait([client.post(img2img(seed=next(seeds))) for _ in range(n)])

    def in_process(n: int) -> None:
        for _ in range(n):
            engine.run(img2img(seed=next(seeds)), overrides={"load.path": photo}, out_dir=local["output"])

    served(2), in_process(2)  # models loaded, caches filled on both sides
    times = {"server": [], "engine": []}
    for i in range(args.repeat):
        for name in ("server", "engine") if i % 2 == 0 else ("engine", "server"):
            start = time.perf_counter()
            (served if name == "server" else in_process)(args.batch)
            times[name].append(time.perf_counter() - start)
    s = summary(times["server"], times["engine"])

    latencies, answers = [], []
    for _ in range(args.latency):
        start = time.perf_counter()
        prompt_id = client.post(img2img(seed=next(seeds)))
        answers.append(time.perf_counter() - start)
        latencies.append(client.wait([prompt_id], first="execution_start") - start)

    cache = server.server.engine.memory
    served(max(100 - 2 - args.repeat * args.batch - args.latency, 0))
    at_100, cache_100 = rss_mib(), cache.used_bytes / 1024**2
    done = max(100, 2 + args.repeat * args.batch + args.latency)
    while done < args.prompts:
        chunk = min(100, args.prompts - done)
        served(chunk)
        done += chunk
    at_end, cache_end = rss_mib(), cache.used_bytes / 1024**2
    server.stop()

    ms = lambda xs: f"{statistics.median(xs) * 1000:.1f} ms ({min(xs) * 1000:.1f}-{max(xs) * 1000:.1f})"
    print(f"nodegraph serve vs Engine.run in-process: tiny SD 1.x img2img, 64x64, 2 sampler steps, new seed per "
          f"prompt, CPU; {machine(load_at_start)}")
    print(f"  throughput, {args.batch} prompts per batch, {s['n']} interleaved pairs: server "
          f"{args.batch / s['ours']:.2f} prompts/s, in-process {args.batch / s['ref']:.2f} prompts/s; time ratio "
          f"server / in-process {s['ratio']:.3f}x ({s['min']:.3f}-{s['max']:.3f})")
    print(f"  queue latency, POST sent -> execution_start received, idle queue, {args.latency} prompts: "
          f"{ms(latencies)}; POST answered after {ms(answers)}")
    print(f"  resident memory of the process: {at_100:.0f} MiB after 100 prompts, {at_end:.0f} MiB after "
          f"{done} prompts ({at_end - at_100:+.0f} MiB); the server's memory cache held {cache_100:.0f} MiB, then "
          f"{cache_end:.0f} MiB of its {args.memory_budget / 1024**2:.0f} MiB budget")


if __name__ == "__main__":
    main()
