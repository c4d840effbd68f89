"""``nodegraph serve`` as ComfyUI's clients use it: a real aiohttp server on 127.0.0.1 (one for the module),
websocket-client as ComfyUI's websockets_api_example.py uses it, the tiny SD 1.x checkpoint."""
from __future__ import annotations

import io
import json
import os
import threading
import urllib.error
import urllib.parse
import urllib.request
import uuid

import numpy as np
import pytest
from PIL import Image

from nodegraph.api import Engine
from tests.server_fixtures import (assert_interrupted_in_the_sampler, cached_nodes, connect, img2img, kinds, ran_nodes,
                                   request, run_prompt, server_folders, txt2img, until_done, until_progress, wait_for)

MAX_QUEUE = 3


@pytest.fixture(scope="module")
def folders(tiny, tmp_path_factory):
    return server_folders(tmp_path_factory.mktemp("served"), tiny)


@pytest.fixture(scope="module")
def server(folders):
    from nodegraph.server.app import Running, ServerConfig

    running = Running(ServerConfig(port=0, cache_dir=False, max_queue=MAX_QUEUE, **folders))
    yield running
    running.stop()


def png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def test_comfy_example_client_flow_gives_the_engines_image(server, folders, tmp_path):
    prompt_id, messages = run_prompt(server.url, img2img(seed=11, steps=4, prefix="flow"))
    assert messages[0]["type"] == "status" and "sid" in messages[0]["data"]
    order = kinds(messages, prompt_id)
    assert order[:2] == ["execution_start", "execution_cached"]
    assert order[-2:] == ["execution_success", "executing"]
    assert ran_nodes(messages) == ["ckpt", "load", "enc", "pos", "s", "dec", "save"]
    steps = [(m["data"]["value"], m["data"]["max"]) for m in messages if m["type"] == "progress"]
    assert steps == [(1, 2), (2, 2)] and all(m["data"]["node"] == "s" for m in messages if m["type"] == "progress")
    executed = [m["data"] for m in messages if m["type"] == "executed"]
    assert [e["node"] for e in executed] == ["save"]
    image = executed[0]["output"]["images"][0]
    assert image == {"filename": "flow_00001.png", "subfolder": "", "type": "output"}

    status, history = request(f"{server.url}/history/{prompt_id}")
    entry = history[prompt_id]
    assert entry["status"]["status_str"] == "success" and entry["status"]["completed"] is True
    assert [m[0] for m in entry["status"]["messages"]] == ["execution_start", "execution_cached", "execution_success"]
    assert entry["outputs"] == {"save": {"images": [image]}}
    assert entry["prompt"][1] == prompt_id and entry["prompt"][4] == ["save"]

    status, data = request(f"{server.url}/view?filename={image['filename']}&subfolder=&type=output")
    assert status == 200
    # the same workflow run in-process by the Python API makes the same pixels
    reference = Engine(cache_dir=False, models=folders["models"]).run(
        img2img(seed=11, steps=4, prefix="ref"), out_dir=tmp_path,
        overrides={"load.path": str(folders["input"] / "photo.png")})
    np.testing.assert_array_equal(png(data), np.asarray(Image.open(reference.files[0]).convert("RGB")))


def test_a_repeated_prompt_reports_its_nodes_cached_and_runs_only_the_saver(server):
    run_prompt(server.url, img2img(seed=12, prefix="again"))
    prompt_id, messages = run_prompt(server.url, img2img(seed=12, prefix="again"))
    assert set(cached_nodes(messages)) == {"ckpt", "load", "enc", "pos", "s", "dec"}
    assert ran_nodes(messages) == ["save"]
    assert not [m for m in messages if m["type"] == "progress"]


def test_three_clients_at_once_each_get_only_their_messages(server):
    results = {}

    def client(seed):
        ws, client_id = connect(server.url)
        try:
            status, answer = request(f"{server.url}/prompt", {"prompt": img2img(seed=seed, prefix=f"c{seed}"),
                                                              "client_id": client_id})
            results[seed] = (answer["prompt_id"], until_done(ws, answer["prompt_id"]))
        finally:
            ws.close()

    threads = [threading.Thread(target=client, args=(seed,)) for seed in (21, 22, 23)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert len(results) == 3
    for prompt_id, messages in results.values():
        ids = {m["data"]["prompt_id"] for m in messages if "prompt_id" in m["data"]}
        assert ids == {prompt_id}
        assert "execution_success" in kinds(messages, prompt_id)
        assert sum(m["type"] == "progress" for m in messages) == 2


def test_interrupt_stops_the_running_prompt_between_sampler_steps(server):
    ws, client_id = connect(server.url)
    try:
        status, answer = request(f"{server.url}/prompt", {"prompt": txt2img(seed=31, steps=1000),
                                                          "client_id": client_id})
        prompt_id = answer["prompt_id"]
        until_progress(ws)
        assert request(f"{server.url}/interrupt", {})[0] == 200
        messages = until_done(ws, prompt_id)
    finally:
        ws.close()
    assert_interrupted_in_the_sampler(messages, prompt_id)
    entry = request(f"{server.url}/history/{prompt_id}")[1][prompt_id]
    assert entry["status"] == {**entry["status"], "status_str": "error", "completed": False}
    assert entry["outputs"] == {}


def test_queue_lists_deletes_clears_and_refuses_when_full(server):
    ws, client_id = connect(server.url)
    try:
        status, long = request(f"{server.url}/prompt", {"prompt": txt2img(seed=41, steps=1000), "client_id": client_id})
        while json.loads(ws.recv())["type"] != "progress":
            pass
        waiting = [request(f"{server.url}/prompt", {"prompt": img2img(seed=42 + i, prefix=f"q{i}"),
                                                    "client_id": client_id})[1]["prompt_id"] for i in range(MAX_QUEUE)]
        status, full = request(f"{server.url}/prompt", {"prompt": img2img(seed=49), "client_id": client_id})
        assert status == 429 and full["error"]["type"] == "queue_full"

        queue = request(f"{server.url}/api/queue")[1]
        assert [item[1] for item in queue["queue_running"]] == [long["prompt_id"]]
        assert [item[1] for item in queue["queue_pending"]] == waiting
        number, prompt_id, prompt, extra, outputs = queue["queue_pending"][0]
        assert prompt["nodes"]["s"]["params"]["seed"] == 42 and extra["client_id"] == client_id
        assert outputs == ["save"]
        assert request(f"{server.url}/prompt")[1] == {"exec_info": {"queue_remaining": MAX_QUEUE + 1}}

        request(f"{server.url}/queue", {"delete": [waiting[1]]})
        assert [item[1] for item in request(f"{server.url}/queue")[1]["queue_pending"]] == [waiting[0], waiting[2]]
        request(f"{server.url}/queue", {"clear": True})
        assert request(f"{server.url}/queue")[1]["queue_pending"] == []
        request(f"{server.url}/interrupt", {"prompt_id": long["prompt_id"]})
        until_done(ws, long["prompt_id"])
    finally:
        ws.close()
    wait_for(lambda: request(f"{server.url}/queue")[1]["queue_running"] == [])
    history = request(f"{server.url}/history")[1]
    assert long["prompt_id"] in history and not set(waiting) & set(history)


def test_a_bad_prompt_is_refused_with_every_problem_and_nothing_runs(server):
    before = request(f"{server.url}/history")[1]
    bad = img2img(seed=51)
    bad["nodes"]["s"]["params"]["steps"] = 0
    bad["nodes"]["pos"]["inputs"] = {}
    bad["nodes"]["extra"] = {"type": "NoSuchNode"}
    bad["nodes"]["ckpt"]["params"]["path"] = "no-such-model"
    status, answer = request(f"{server.url}/prompt", {"prompt": bad, "client_id": "x"})
    assert status == 400
    assert answer["error"]["type"] == "prompt_outputs_failed_validation"
    errors = answer["node_errors"]
    assert set(errors) == {"s", "pos", "extra", "ckpt"}
    assert errors["s"]["class_type"] == "Sampler"
    assert errors["s"]["errors"][0]["extra_info"]["input_name"] == "steps"
    assert errors["pos"]["errors"][0]["type"] == "required_input_missing"
    assert errors["ckpt"]["errors"][0]["type"] == "value_not_in_list"
    assert errors["s"]["dependent_outputs"] == errors["ckpt"]["dependent_outputs"] == ["save"]
    assert errors["extra"]["dependent_outputs"] == []  # nothing reads it
    assert all(set(e) == {"type", "message", "details", "extra_info"} for n in errors.values() for e in n["errors"])
    assert request(f"{server.url}/history")[1] == before
    assert request(f"{server.url}/queue")[1] == {"queue_running": [], "queue_pending": []}

    status, answer = request(f"{server.url}/prompt", {"client_id": "x"})
    assert status == 400 and answer["error"]["type"] == "no_prompt"


def test_a_bad_comfy_prompt_names_comfy_ids_and_class_types(server):
    prompt = {"3": {"class_type": "NoSuchComfyNode", "inputs": {}},
              "7": {"class_type": "InvertMask", "inputs": {"mask": ["99", 0]}}}
    status, answer = request(f"{server.url}/prompt", {"prompt": prompt})
    assert status == 400
    assert answer["node_errors"]["3"]["class_type"] == "NoSuchComfyNode"
    assert answer["node_errors"]["7"]["class_type"] == "InvertMask"
    assert answer["node_errors"]["7"]["errors"][0]["extra_info"]["input_name"] == "mask"

    saved = {"1": {"class_type": "NoSuchLoader", "inputs": {}},
             "2": {"class_type": "VAEDecode", "inputs": {"samples": ["1", 0], "vae": ["1", 2]}},
             "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "x"}},
             "4": {"class_type": "PreviewImage", "inputs": {"images": ["2", 0]}}}
    status, answer = request(f"{server.url}/prompt", {"prompt": saved})
    assert status == 400 and answer["node_errors"]["1"]["dependent_outputs"] == ["3", "4"]


@pytest.mark.parametrize("path, code", [("/etc/hostname", "confined_path"), ("../outside.png", "confined_path"),
                                        ("link_out.png", "confined_path")])
def test_file_params_stay_in_the_input_and_models_folders(server, folders, tmp_path, path, code):
    outside = tmp_path / "outside.png"
    Image.new("RGB", (8, 8)).save(outside)
    link = folders["input"] / "link_out.png"
    if not link.is_symlink():
        os.symlink(outside, link)
    prompt = img2img(seed=61)
    prompt["nodes"]["load"]["params"]["path"] = path
    status, answer = request(f"{server.url}/prompt", {"prompt": prompt})
    assert status == 400
    assert answer["node_errors"]["load"]["errors"][0]["type"] == code


def test_hub_ids_are_refused_without_allow_download(server):
    prompt = img2img(seed=62)
    prompt["nodes"]["ckpt"]["params"]["path"] = "someone/some-model"
    status, answer = request(f"{server.url}/prompt", {"prompt": prompt})
    assert status == 400
    error = answer["node_errors"]["ckpt"]["errors"][0]
    assert error["type"] == "download_refused" and "--allow-download" in error["message"]


def test_view_serves_only_inside_its_folders(server, folders, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("secret")
    (folders["output"] / "sub").mkdir(parents=True, exist_ok=True)
    link = folders["output"] / "sub" / "out.txt"
    if not link.is_symlink():
        os.symlink(secret, link)
    for query in ("filename=secret.txt&subfolder=../../" + tmp_path.name, "filename=../x.png",
                  "filename=out.txt&subfolder=sub", "filename=passwd&subfolder=/etc",
                  "filename=photo.png&subfolder=..&type=input"):
        status, body = request(f"{server.url}/view?{query}")
        assert status in (400, 403), query
        assert b"secret" not in body
    assert request(f"{server.url}/view?filename=photo.png&type=input")[0] == 200
    assert request(f"{server.url}/view?filename=photo.png&type=elsewhere")[0] == 400
    assert request(f"{server.url}/view?filename=nothing.png")[0] == 404


def multipart(fields: dict, files: dict) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = []
    for name, value in fields.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    for name, (filename, data) in files.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
                     f'Content-Type: image/png\r\n\r\n'.encode() + data + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def upload(url, fields, files):
    import urllib.request

    body, kind = multipart(fields, files)
    req = urllib.request.Request(url, data=body, headers={"Content-Type": kind})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_upload_image_names_copies_and_overwrites_as_comfy(server, folders):
    red, blue = png_bytes(Image.new("RGB", (16, 16), "red")), png_bytes(Image.new("RGB", (16, 16), "blue"))
    url = f"{server.url}/upload/image"
    assert upload(url, {"subfolder": "up"}, {"image": ("a.png", red)}) == (200, {"name": "a.png", "subfolder": "up",
                                                                                  "type": "input"})
    assert upload(url, {"subfolder": "up"}, {"image": ("a.png", red)})[1]["name"] == "a.png"  # same bytes
    assert upload(url, {"subfolder": "up"}, {"image": ("a.png", blue)})[1]["name"] == "a (1).png"
    assert upload(url, {"subfolder": "up", "overwrite": "true"}, {"image": ("a.png", blue)})[1]["name"] == "a.png"
    assert (folders["input"] / "up" / "a.png").read_bytes() == blue
    assert upload(url, {"subfolder": "../.."}, {"image": ("x.png", red)})[0] == 400
    assert upload(url, {"type": "nowhere"}, {"image": ("x.png", red)})[0] == 400


def test_upload_mask_puts_the_masks_alpha_into_the_original(server, folders):
    rng = np.random.default_rng(0)
    original = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
    Image.fromarray(original).save(folders["input"] / "orig.png")
    mask = rng.integers(0, 256, (24, 32, 4), dtype=np.uint8)
    status, answer = upload(f"{server.url}/upload/mask",
                            {"original_ref": json.dumps({"filename": "orig.png", "type": "input"}), "type": "input",
                             "subfolder": "clipspace"},
                            {"image": ("mask.png", png_bytes(Image.fromarray(mask, "RGBA")))})
    assert status == 200 and answer == {"name": "mask.png", "subfolder": "clipspace", "type": "input"}
    result = np.asarray(Image.open(folders["input"] / "clipspace" / "mask.png"))
    np.testing.assert_array_equal(result[..., :3], original)
    np.testing.assert_array_equal(result[..., 3], mask[..., 3])


def test_info_routes(server):
    info = request(f"{server.url}/object_info")[1]
    assert info["Sampler"]["input"]["optional"]["steps"][0] == "INT"
    assert info["Sampler"]["input"]["required"]["model"] == ["MODEL"]
    assert info["Sampler"]["output"] == ["LATENT"] and info["SaveImage"]["output_node"] is True
    assert "InvertMask" in info  # the importer's ComfyUI types (ComfyUI's spec wins where a name is in both)
    mask = request(f"{server.url}/api/object_info/LoadMask")[1]["LoadMask"]
    assert "photo.png" in mask["input"]["required"]["path"][0]
    assert mask["input"]["optional"]["channel"][0] == ["luminance", "alpha"]
    assert mask["input"]["optional"]["invert"] == ["BOOLEAN", {"default": False, "tooltip": "use 1 - mask (for "
                                                                  "masks drawn white = keep)"}]
    ckpt = request(f"{server.url}/object_info/LoadCheckpoint")[1]["LoadCheckpoint"]
    assert "tiny-sd15" in ckpt["input"]["required"]["path"][0]
    # ComfyUI's own types list the same files, so ComfyUI tooling can check a prompt's names before sending it
    comfy = request(f"{server.url}/object_info/CheckpointLoaderSimple")[1]["CheckpointLoaderSimple"]
    assert comfy["input"]["required"]["ckpt_name"][0] == ["tiny-sd15", "tiny-sd15.safetensors"]
    assert "photo.png" in request(f"{server.url}/object_info/LoadImage")[1]["LoadImage"]["input"]["required"]["image"][0]
    assert "checkpoints" in request(f"{server.url}/models")[1]
    assert request(f"{server.url}/api/models/checkpoints")[1] == ["tiny-sd15", "tiny-sd15.safetensors"]
    assert request(f"{server.url}/models/nothing")[0] == 404
    assert request(f"{server.url}/embeddings")[1] == []
    stats = request(f"{server.url}/system_stats")[1]
    assert stats["system"]["ram_total"] > 0 and stats["devices"]
    assert request(f"{server.url}/history?max_items=1")[0] == 200
    assert len(request(f"{server.url}/history?max_items=1")[1]) <= 1


def test_history_delete_and_clear(server):
    first, _ = run_prompt(server.url, img2img(seed=71, prefix="h"))
    second, _ = run_prompt(server.url, img2img(seed=72, prefix="h"))
    third, _ = run_prompt(server.url, img2img(seed=73, prefix="h"))
    everything = list(request(f"{server.url}/history")[1])
    assert everything[-3:] == [first, second, third]
    assert list(request(f"{server.url}/history?max_items=2")[1]) == [second, third]
    start = len(everything) - 3
    assert list(request(f"{server.url}/history?max_items=2&offset={start}")[1]) == [first, second]
    request(f"{server.url}/history", {"delete": [first]})
    history = request(f"{server.url}/history")[1]
    assert first not in history and second in history
    request(f"{server.url}/history", {"clear": True})
    assert request(f"{server.url}/history")[1] == {}


def test_limits_on_request_size_nodes_and_pixels(folders, tmp_path):
    from nodegraph.server.app import Running, ServerConfig

    small = Running(ServerConfig(port=0, cache_dir=False, max_upload=4096, max_nodes=8, max_pixels=128 * 128,
                                 **{**folders, "output": tmp_path / "out"}))
    try:
        status, answer = request(f"{small.url}/prompt", {"prompt": img2img(), "padding": "x" * 5000})
        assert status == 413
        many = img2img(seed=81)
        many["nodes"].update({f"extra{i}": {"type": "EmptyLatent"} for i in range(2)})
        status, answer = request(f"{small.url}/prompt", {"prompt": many})
        assert status == 400 and answer["error"]["type"] == "too_many_nodes"
        comfy = {str(i): {"class_type": "InvertMask", "inputs": {"mask": [str(i - 1), 0]}} for i in range(1, 10)}
        status, answer = request(f"{small.url}/prompt", {"prompt": comfy})
        assert status == 400 and answer["error"]["type"] == "too_many_nodes" and "9 nodes" in answer["error"]["message"]
        big = txt2img(seed=82, steps=2)
        big["nodes"]["empty"]["params"].update(width=256, height=256)
        status, answer = request(f"{small.url}/prompt", {"prompt": big})
        assert status == 400 and "pixels" in answer["node_errors"]["empty"]["errors"][0]["message"]
        assert request(f"{small.url}/queue")[1] == {"queue_running": [], "queue_pending": []}
    finally:
        small.stop()


def test_partial_execution_targets_and_front(server):
    prompt_id, messages = run_prompt(server.url, img2img(seed=91), partial_execution_targets=["enc"])
    # enc and what it needs; no sampler, no saver
    assert set(ran_nodes(messages)) | set(cached_nodes(messages)) == {"ckpt", "load", "enc"}
    assert request(f"{server.url}/history/{prompt_id}")[1][prompt_id]["prompt"][4] == ["enc"]
    assert request(f"{server.url}/prompt", {"prompt": img2img(seed=92), "front": True})[1]["number"] < 0


def test_a_prompt_without_client_id_shows_its_nodes_to_every_client(server):
    ws, _ = connect(server.url)
    try:
        status, answer = request(f"{server.url}/prompt", {"prompt": img2img(seed=95, prefix="anon")})
        messages = until_done(ws, answer["prompt_id"])
    finally:
        ws.close()
    order = kinds(messages, answer["prompt_id"])
    assert "executing" in order and "executed" in order and "execution_start" not in order
    entry = request(f"{server.url}/history/{answer['prompt_id']}")[1][answer["prompt_id"]]
    assert [m[0] for m in entry["status"]["messages"]] == ["execution_start", "execution_cached", "execution_success"]


def test_a_node_failing_at_run_time_is_an_execution_error_and_the_server_goes_on(server, folders):
    Image.new("RGB", (60, 60), "gray").save(folders["input"] / "odd.png")  # not a multiple of 8: VAEEncode refuses
    prompt = img2img(seed=97)
    prompt["nodes"]["load"]["params"]["path"] = "odd.png"
    prompt_id, messages = run_prompt(server.url, prompt)
    order = kinds(messages, prompt_id)
    assert "execution_error" in order and "execution_success" not in order and order[-1] == "executing"
    error = next(m["data"] for m in messages if m["type"] == "execution_error")
    assert error["node_id"] == "enc" and error["node_type"] == "VAEEncode"
    assert "enc" in error["exception_message"] and "8" in error["exception_message"]
    assert {"ckpt", "load"} <= set(error["executed"]) and "enc" not in error["executed"]
    assert set(error) >= {"prompt_id", "node_id", "node_type", "executed", "exception_message", "exception_type",
                          "traceback", "current_inputs", "current_outputs"}
    entry = request(f"{server.url}/history/{prompt_id}")[1][prompt_id]
    assert entry["status"]["status_str"] == "error" and entry["status"]["messages"][-1][0] == "execution_error"
    prompt_id, messages = run_prompt(server.url, img2img(seed=98, prefix="after"))
    assert "execution_success" in kinds(messages, prompt_id)


def test_a_client_that_reconnects_hears_which_node_is_running(server):
    ws, client_id = connect(server.url)
    try:
        status, answer = request(f"{server.url}/prompt", {"prompt": txt2img(seed=99, steps=1000),
                                                          "client_id": client_id})
        while json.loads(ws.recv())["type"] != "progress":
            pass
        ws.close()  # the connection drops while the prompt runs; the client comes back with its id
        ws, _ = connect(server.url, client_id)
        seen = [json.loads(ws.recv())]
        while seen[-1]["type"] != "executing":  # progress sent before the reconnection may come first
            seen.append(json.loads(ws.recv()))
        request(f"{server.url}/interrupt", {})
        until_done(ws, answer["prompt_id"])
    finally:
        ws.close()
    assert {m["type"] for m in seen} <= {"status", "progress", "executing"}
    status = next(m for m in seen if m["type"] == "status")
    assert status["data"]["sid"] == client_id and seen.index(status) == len(seen) - 2
    assert seen[-1] == {"type": "executing", "data": {"node": "s", "display_node": "s",
                                                       "prompt_id": answer["prompt_id"]}}


def test_cross_site_requests_are_refused_and_annotated_names_are_viewed(server):
    import urllib.request

    def post(origin):
        headers = {"Origin": origin} if origin else {}
        req = urllib.request.Request(f"{server.url}/queue", data=b"{}", headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                return resp.status
        except urllib.error.HTTPError as exc:
            return exc.code

    assert post("http://evil.example") == 403
    assert post(server.url) == 200 and post(None) == 200
    assert request(f"{server.url}/view?filename=photo.png%20[input]")[0] == 200


def test_free_forgets_the_cached_results_and_loaded_models_between_prompts(server):
    """ComfyUI's POST /free: unload_models and free_memory, done by the worker between prompts."""
    prompt = img2img(seed=81, prefix="free")
    run_prompt(server.url, prompt)
    _, again = run_prompt(server.url, prompt)
    cached = [m["data"]["nodes"] for m in again if m["type"] == "execution_cached"]
    assert cached and "ckpt" in cached[0]  # warm: nothing but the saver runs
    engine = server.server.engine
    assert request(f"{server.url}/free", {"unload_models": True, "free_memory": True})[0] == 200
    wait_for(lambda: len(engine.memory) == 0)
    _, cold = run_prompt(server.url, prompt)
    cached = [m["data"]["nodes"] for m in cold if m["type"] == "execution_cached"]
    assert not cached or "ckpt" not in cached[0]  # the checkpoint is loaded again


def test_a_number_no_json_can_carry_is_refused_and_the_queue_stays_json(server):
    """NaN, infinity or an integer beyond a float's range as ``number``: a 400, not a server error, and nothing
    queued whose number would make /queue and /history unreadable to a browser's JSON.parse."""
    for number in ("nan", "Infinity", 10**400):
        status, answer = request(f"{server.url}/prompt", {"prompt": img2img(seed=95), "number": number})
        assert status == 400 and answer["error"]["type"] == "invalid_prompt", number
        assert "number" in answer["error"]["message"]
    with urllib.request.urlopen(f"{server.url}/queue", timeout=60) as resp:
        json.loads(resp.read(), parse_constant=lambda name: pytest.fail(f"/queue answered {name}"))


@pytest.mark.parametrize("prompt, node", [
    ({"1": {"class_type": ["SaveImage"], "inputs": {}}}, "1"),
    ({"1": {"class_type": {"name": "SaveImage"}, "inputs": {}}}, "1"),
    ({"format": "nodegraph/1", "nodes": {"a": {"type": ["SaveImage"]}}}, "a")])
def test_a_node_type_that_is_not_a_string_is_reported_on_its_node(server, prompt, node):
    status, answer = request(f"{server.url}/prompt", {"prompt": prompt})
    assert status == 400 and list(answer["node_errors"]) == [node]


def test_view_and_uploads_answer_hostile_names_with_a_client_error(server, folders):
    url, red = server.url, png_bytes(Image.new("RGB", (8, 8), "red"))
    long = "n" * 300
    assert request(f"{url}/view?filename={long}.png&type=input")[0] == 404
    assert request(f"{url}/view?filename=photo.png&subfolder={long}&type=input")[0] == 404
    (folders["input"] / "taken").mkdir(exist_ok=True)
    before = sorted(p.name for p in folders["input"].parent.iterdir())
    refused = [({}, (".", red)), ({"overwrite": "true"}, (".", red)), ({}, (f"{long}.png", red)),
               ({"overwrite": "true"}, (f"{long}.png", red)), ({"subfolder": long}, ("a.png", red)),
               ({"subfolder": "photo.png"}, ("a.png", red)),  # a subfolder that is a file
               ({"overwrite": "true"}, ("taken", red))]  # a name taken by a folder
    for fields, image in refused:
        status, body = upload(f"{url}/upload/image", fields, {"image": image})
        assert status == 400 and image[0][:20].encode() in body, (fields, image[0][:20])
    assert folders["input"].is_dir() and (folders["input"] / "photo.png").is_file()
    assert sorted(p.name for p in folders["input"].parent.iterdir()) == before  # no stray temporary file
    ref = json.dumps({"filename": f"{long}.png", "type": "input"})
    assert upload(f"{url}/upload/mask", {"original_ref": ref}, {"image": ("m.png", red)})[0] == 404
    ref = json.dumps({"filename": "photo.png", "subfolder": "..", "type": "input"})
    status, body = upload(f"{url}/upload/mask", {"original_ref": ref}, {"image": ("m.png", red)})
    assert status == 400 and b"inside the folder" in body


def test_a_body_that_is_not_a_multipart_form_is_a_client_error(server):
    for kind, body in (("multipart/form-data", b"x"), ("multipart/form-data; boundary=b", b"--b\r\nbroken\r\n")):
        req = urllib.request.Request(f"{server.url}/upload/image", data=body, headers={"Content-Type": kind})
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(req, timeout=60)
        assert caught.value.code == 400 and b"multipart" in caught.value.read()


@pytest.mark.parametrize("headers", [{"Host": "[", "Origin": "http://localhost"}, {"Origin": "http://["}])
def test_a_malformed_host_or_origin_is_refused_not_a_server_error(server, headers):
    import http.client

    connection = http.client.HTTPConnection("127.0.0.1", int(server.url.rsplit(":", 1)[1]), timeout=60)
    connection.putrequest("POST", "/queue", skip_host="Host" in headers)
    for name, value in {**headers, "Content-Length": "2"}.items():
        connection.putheader(name, value)
    connection.endheaders(b"{}")
    assert connection.getresponse().status == 403


def test_a_prompt_id_still_running_is_refused_and_free_again_once_done(server):
    ws, client_id = connect(server.url)
    try:
        body = {"prompt": txt2img(seed=96, steps=1000), "client_id": client_id, "prompt_id": "mine"}
        assert request(f"{server.url}/prompt", body)[0] == 200
        until_progress(ws)
        status, answer = request(f"{server.url}/prompt", {**body, "prompt": img2img(seed=97, prefix="mine")})
        assert status == 400 and "'mine' is already queued or running" in answer["error"]["message"]
        assert request(f"{server.url}/queue")[1]["queue_pending"] == []
        request(f"{server.url}/interrupt", {"prompt_id": "mine"})
        until_done(ws, "mine")
    finally:
        ws.close()
    # once it is done the id is free again, and its history entry is the new run's (as ComfyUI)
    prompt_id, messages = run_prompt(server.url, img2img(seed=97, prefix="mine"), prompt_id="mine")
    assert prompt_id == "mine" and "execution_success" in kinds(messages, "mine")
    assert request(f"{server.url}/history/mine")[1]["mine"]["status"]["status_str"] == "success"


def test_a_file_whose_name_has_a_line_break_or_a_quote_is_viewed(server, folders):
    """Such a name arrives through an upload's RFC 5987 filename*; /view used to drop the connection."""
    body = (b'--b\r\nContent-Disposition: form-data; name="image"; filename*=UTF-8\'\'odd%0D%0Aname%22.png\r\n'
            b'Content-Type: image/png\r\n\r\nodd bytes\r\n--b--\r\n')
    req = urllib.request.Request(f"{server.url}/upload/image", data=body,
                                 headers={"Content-Type": "multipart/form-data; boundary=b"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        name = json.loads(resp.read())["name"]
    assert name == 'odd\r\nname".png'
    status, data = request(f"{server.url}/view?" + urllib.parse.urlencode({"filename": name, "type": "input"}))
    assert status == 200 and data == b"odd bytes"


def test_a_file_gone_before_its_prompt_runs_is_an_execution_error_on_the_node_reading_it(server, folders):
    ws, client_id = connect(server.url)
    try:
        status, long = request(f"{server.url}/prompt", {"prompt": txt2img(seed=98, steps=1000), "client_id": client_id})
        until_progress(ws)
        Image.open(folders["input"] / "photo.png").save(folders["input"] / "gone.png")
        prompt = img2img(seed=99, prefix="gone")
        prompt["nodes"]["load"]["params"]["path"] = "gone.png"
        status, answer = request(f"{server.url}/prompt", {"prompt": prompt, "client_id": client_id})
        assert status == 200
        (folders["input"] / "gone.png").unlink()  # while the prompt waits
        request(f"{server.url}/interrupt", {"prompt_id": long["prompt_id"]})
        until_done(ws, long["prompt_id"])
        messages = until_done(ws, answer["prompt_id"])
    finally:
        ws.close()
    error = next(m["data"] for m in messages if m["type"] == "execution_error")
    assert error["node_id"] == "load" and error["node_type"] == "LoadImage"
    assert "gone.png" in error["exception_message"]


def png_claiming(width: int, height: int) -> bytes:
    """A small PNG whose header claims ``width`` x ``height`` (its IHDR rewritten, CRC and all)."""
    import struct
    import zlib

    data = bytearray(png_bytes(Image.new("L", (8, 8))))
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def test_upload_mask_holds_both_images_to_the_servers_pixel_limit(folders, tmp_path):
    from nodegraph.server.app import Running, ServerConfig

    small = Running(ServerConfig(port=0, cache_dir=False, max_pixels=64 * 64,
                                 **{**folders, "input": tmp_path / "in", "output": tmp_path / "out"}))
    try:
        Image.new("RGB", (128, 128)).save(tmp_path / "in" / "large.png")
        Image.new("RGB", (32, 32)).save(tmp_path / "in" / "small.png")

        def mask(original: str, image: bytes):
            ref = json.dumps({"filename": original, "type": "input"})
            return upload(f"{small.url}/upload/mask", {"original_ref": ref, "type": "input", "subfolder": "masks"},
                          {"image": ("m.png", image)})

        status, body = mask("large.png", png_bytes(Image.new("RGBA", (128, 128))))
        assert status == 400 and b"the original: 128x128 (16,384 pixels) is larger than the limit" in body
        status, body = mask("small.png", png_claiming(20000, 10000))  # Pillow's decompression-bomb size
        assert status == 400 and b"pixels" in body
        assert not (tmp_path / "in" / "masks").exists() or not list((tmp_path / "in" / "masks").iterdir())
        assert mask("small.png", png_bytes(Image.new("RGBA", (32, 32))))[0] == 200
    finally:
        small.stop()
