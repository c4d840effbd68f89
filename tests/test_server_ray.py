"""``nodegraph serve --ray``: the server's queue on two Ray actors of a local cluster, driven by ComfyUI's
client flow (websocket-client, urllib) on 127.0.0.1, the tiny SD 1.x checkpoint."""
from __future__ import annotations

import threading

import numpy as np
import pytest
from PIL import Image

ray = pytest.importorskip("ray")

from nodegraph.api import Engine  # noqa: E402
from tests.server_fixtures import (assert_interrupted_in_the_sampler, cached_nodes, connect, img2img, kinds,  # noqa: E402
                                   ran_nodes, request, run_prompt, server_folders, txt2img, until_done,
                                   until_progress, wait_for)
from tests.test_server import png  # noqa: E402


@pytest.fixture(scope="module")
def folders(tiny, tmp_path_factory):
    return server_folders(tmp_path_factory.mktemp("served-ray"), tiny)


@pytest.fixture(scope="module")
def server(ray_cluster, folders):
    from nodegraph.server.app import Running, ServerConfig

    running = Running(ServerConfig(port=0, cache_dir=False, ray=True, workers=2, threads=1, **folders))
    yield running
    running.stop()


def queue(server):
    return server.server.queue


def post(server, prompt, client_id):
    status, answer = request(f"{server.url}/prompt", {"prompt": prompt, "client_id": client_id})
    assert status == 200, answer
    return answer["prompt_id"]


def test_comfy_client_flow_on_an_actor_gives_the_in_process_image(server, folders, tmp_path):
    prompt_id, messages = run_prompt(server.url, img2img(seed=11, steps=4, prefix="flow"))
    order = kinds(messages, prompt_id)
    assert order[:2] == ["execution_start", "execution_cached"] and order[-2:] == ["execution_success", "executing"]
    assert ran_nodes(messages) == ["ckpt", "load", "enc", "pos", "s", "dec", "save"]
    steps = [(m["data"]["value"], m["data"]["max"]) for m in messages if m["type"] == "progress"]
    assert steps == [(1, 2), (2, 2)]
    image = next(m["data"] for m in messages if m["type"] == "executed")["output"]["images"][0]
    assert image == {"filename": "flow_00001.png", "subfolder": "", "type": "output"}
    assert (folders["output"] / "flow_00001.png").is_file()  # the actor wrote into the server's output folder
    entry = request(f"{server.url}/history/{prompt_id}")[1][prompt_id]
    assert entry["status"]["status_str"] == "success" and entry["outputs"] == {"save": {"images": [image]}}
    assert [m[0] for m in entry["status"]["messages"]] == ["execution_start", "execution_cached", "execution_success"]
    status, data = request(f"{server.url}/view?filename=flow_00001.png&subfolder=&type=output")
    reference = Engine(cache_dir=False, models=folders["models"]).run(
        img2img(seed=11, steps=4, prefix="ref"), out_dir=tmp_path,
        overrides={"load.path": str(folders["input"] / "photo.png")})
    np.testing.assert_array_equal(png(data), np.asarray(Image.open(reference.files[0]).convert("RGB")))


def test_two_prompts_run_at_once_on_two_actors_each_client_hearing_only_its_own(server):
    results, running = {}, []

    def client(seed):
        ws, client_id = connect(server.url)
        try:
            prompt_id = post(server, txt2img(seed=seed, steps=60), client_id)
            results[seed] = (prompt_id, until_done(ws, prompt_id))
        finally:
            ws.close()

    threads = [threading.Thread(target=client, args=(seed,)) for seed in (51, 52)]
    for t in threads:
        t.start()
    try:  # both listed as running at once, on different actors
        running = wait_for(lambda: (lambda r: r if len(r) == 2 else None)(
            request(f"{server.url}/queue")[1]["queue_running"]))
        workers = {run.worker for run in queue(server).runs.values()}
    finally:
        for t in threads:
            t.join(180)
    assert len(running) == 2 and len(workers) == 2
    assert len(results) == 2
    for prompt_id, messages in results.values():
        assert {m["data"]["prompt_id"] for m in messages if "prompt_id" in m["data"]} == {prompt_id}
        order = [k for k in kinds(messages, prompt_id) if k != "progress"]
        assert order[:2] == ["execution_start", "execution_cached"]
        assert order[-4:] == ["executing", "executed", "execution_success", "executing"]
        values = [m["data"]["value"] for m in messages if m["type"] == "progress"]
        assert values == list(range(1, 61))


def test_a_prompt_id_already_running_on_an_actor_is_refused(server):
    """Two actors could otherwise run two prompts of one id while the queue tracked one: /queue, the queue's
    count and /interrupt would miss the other."""
    ws, client_id = connect(server.url)
    try:
        body = {"prompt": txt2img(seed=71, steps=1000), "client_id": client_id, "prompt_id": "twice"}
        assert request(f"{server.url}/prompt", body)[0] == 200
        status, answer = request(f"{server.url}/prompt", {**body, "prompt": txt2img(seed=72, steps=1000)})
        assert status == 400 and "'twice' is already queued or running" in answer["error"]["message"]
        until_progress(ws)
        assert [item[1] for item in request(f"{server.url}/queue")[1]["queue_running"]] == ["twice"]
        request(f"{server.url}/interrupt", {})
        assert "execution_interrupted" in kinds(until_done(ws, "twice"), "twice")
    finally:
        ws.close()
    wait_for(lambda: queue(server).remaining() == 0)


def test_interrupt_reaches_the_actor_running_that_prompt(server):
    ws, client_id = connect(server.url)
    try:
        prompt_id = post(server, txt2img(seed=31, steps=1000), client_id)
        until_progress(ws)
        assert request(f"{server.url}/interrupt", {"prompt_id": prompt_id})[0] == 200
        messages = until_done(ws, prompt_id)
    finally:
        ws.close()
    assert_interrupted_in_the_sampler(messages, prompt_id)
    assert request(f"{server.url}/history/{prompt_id}")[1][prompt_id]["status"]["status_str"] == "error"


def test_free_memory_empties_the_actors_caches_between_prompts(server):
    run_prompt(server.url, img2img(seed=12, prefix="freed"))
    assert set(cached_nodes(run_prompt(server.url, img2img(seed=12, prefix="freed"))[1])) >= {"ckpt", "s", "dec"}
    assert request(f"{server.url}/free", {"unload_models": True, "free_memory": True})[0] == 200
    prompt_id, messages = run_prompt(server.url, img2img(seed=12, prefix="freed"))
    assert cached_nodes(messages) == [] and "execution_success" in kinds(messages, prompt_id)
    assert sum(m["type"] == "progress" for m in messages) == 2  # sampled again


def test_a_killed_actor_s_prompt_runs_again_on_the_other_then_errors_when_none_is_left(server):
    ws, client_id = connect(server.url)
    try:
        first = post(server, txt2img(seed=61, steps=80), client_id)
        before = until_progress(ws)
        victim = queue(server).runs[first].worker
        ray.kill(server.server.queue.pool.actors[victim])
        messages = before + until_done(ws, first)
        order = kinds(messages, first)
        # the run starts once for the client; the other actor runs every node again (its messages repeat)
        assert order.count("execution_start") == 1 and order[-2:] == ["execution_success", "executing"]
        assert [m["data"]["value"] for m in messages if m["type"] == "progress"][-80:] == list(range(1, 81))
        assert queue(server).live == [w for w in ("ray-0", "ray-1") if w != victim]
        assert request(f"{server.url}/history/{first}")[1][first]["status"]["completed"] is True

        second = post(server, txt2img(seed=62, steps=1000), client_id)  # the last actor dies too
        until_progress(ws)
        ray.kill(server.server.queue.pool.actors[queue(server).runs[second].worker])
        messages = until_done(ws, second)
        error = next(m["data"] for m in messages if m["type"] == "execution_error")
        assert "died" in error["exception_message"] and error["prompt_id"] == second

        third = post(server, img2img(seed=63), client_id)  # nothing left to run it: an error, not a hang
        messages = until_done(ws, third, timeout=30)
        error = next(m["data"] for m in messages if m["type"] == "execution_error")
        assert "no Ray actor" in error["exception_message"]
    finally:
        ws.close()


class FakePool:
    def __init__(self, workers):
        self.workers, self.ray, self.actors = workers, None, {}


def test_an_idle_actor_takes_the_prompt_whose_models_it_holds_else_the_queue_s_next(tmp_path):
    from nodegraph.server.prompts import Prompt
    from nodegraph.server.ray_queue import RayPromptQueue

    q = RayPromptQueue(None, lambda *a: None, tmp_path, tmp_path, 10, 10, FakePool(["ray-0", "ray-1"]))

    def put(number, models):
        q.put(Prompt(number, f"p{number}", {}, {}, None, None, [], False, models=models))

    q.holds["ray-1"] = {"a.safetensors"}
    put(0, ("b.safetensors",))
    put(1, ("a.safetensors",))
    put(2, ("b.safetensors",))
    picks = {worker: prompt.prompt_id for worker, prompt in q._pick()}
    assert picks == {"ray-1": "p1", "ray-0": "p0"}  # ray-1 skips ahead to its models; p0 is first in line
    assert [p.prompt_id for _, _, p in q.pending] == ["p2"]
    put(3, ("c.safetensors",))  # both idle again: ray-0 now holds b, and nobody holds c
    assert [(w, p.prompt_id) for w, p in q._pick()] == [("ray-0", "p2"), ("ray-1", "p3")]


def test_a_prompt_deleted_while_waiting_for_a_retry_leaves_nothing_to_a_later_prompt_of_its_id(tmp_path):
    """Its actor died and it waited for another; deleted then, a new prompt posted with its id must start afresh:
    its own client hears it, it starts, its history shows its own workflow and it gets every try."""
    from nodegraph.context import InterruptFlag
    from nodegraph.server.prompts import Prompt
    from nodegraph.server.queue import Execution
    from nodegraph.server.ray_queue import RayPromptQueue, Run

    q = RayPromptQueue(None, lambda *a: None, tmp_path, tmp_path, 10, 10, FakePool(["ray-0", "ray-1"]))
    old = Prompt(0, "same", {"old": {}}, {"client_id": "alice"}, None, None, [], False)
    q.put(old)
    [(worker, picked)] = q._pick()
    q.runs["same"], q.tries["same"] = Run(picked, worker, Execution(q, picked, InterruptFlag())), 1
    assert q._retry(q.runs["same"])  # its actor died: it waits at the front of the queue for the other
    q.delete(["same"])
    assert q.listing()["queue_pending"] == []

    new = Prompt(1, "same", {"new": {}}, {"client_id": "bob"}, None, None, [], False)
    q.put(new)
    [(_, picked)] = q._pick()
    assert picked is new
    # the dispatcher reuses a run kept in `started` (no execution_start, alice hears bob's prompt, the history
    # shows the old workflow) and counts on from the old tries
    assert "same" not in q.started and "same" not in q.tries


def test_the_command_line_asks_for_the_pool(monkeypatch):
    import nodegraph.server.app as app
    from nodegraph.cli import build_parser
    from nodegraph.server.options import run

    seen = []
    monkeypatch.setattr(app, "serve", seen.append)
    for argv, expected in ((["serve"], (False, None, None)), (["serve", "--ray"], (True, None, None)),
                           (["serve", "--ray", "auto", "--workers", "3"], (True, "auto", 3))):
        run(build_parser().parse_args(argv))
        assert (seen[-1].ray, seen[-1].ray_address, seen[-1].workers) == expected
