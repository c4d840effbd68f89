"""``nodegraph serve`` as a process: started from the CLI, stopped with SIGTERM, started again on the same disk
cache, which then serves every node but the saver (reported in ``execution_cached``, not run)."""
from __future__ import annotations

import subprocess
import sys

import pytest

from tests.server_fixtures import (cached_nodes, free_port, img2img, ran_nodes, request, run_prompt, server_folders,
                                   wait_for)


def start(folders, cache, log):
    port = free_port()
    command = [sys.executable, "-c", "from nodegraph.cli import entry; entry()", "serve", "--port", str(port),
               "--models", str(folders["models"][0]), "--input", str(folders["input"]),
               "--output", str(folders["output"]), "--cache-dir", str(cache)]
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"

    def up():
        if process.poll() is not None:
            raise AssertionError(f"the server exited with {process.returncode}")
        try:
            return request(f"{url}/prompt", timeout=2)[0] == 200
        except OSError:
            return False

    wait_for(up, timeout=120, every=0.2)
    return process, url


def stop(process):
    process.terminate()
    try:
        assert process.wait(60) == 0
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(10)
        pytest.fail("the server did not stop within 60 s of SIGTERM")


def test_a_restarted_server_reports_nodes_from_the_disk_cache_as_cached(tiny, tmp_path):
    folders = server_folders(tmp_path, tiny)
    cache = tmp_path / "cache"
    with open(tmp_path / "server.log", "wb") as log:
        process, url = start(folders, cache, log)
        try:
            first = run_prompt(url, img2img(seed=5, prefix="restart"))[1]
        finally:
            stop(process)
        process, url = start(folders, cache, log)
        try:
            second = run_prompt(url, img2img(seed=5, prefix="restart"))[1]
        finally:
            stop(process)
    assert cached_nodes(first) == [] and ran_nodes(first) == ["ckpt", "load", "enc", "pos", "s", "dec", "save"]
    assert set(cached_nodes(second)) == {"ckpt", "load", "enc", "pos", "s", "dec"} and ran_nodes(second) == ["save"]
    assert sorted(p.name for p in folders["output"].iterdir()) == ["restart_00001.png", "restart_00002.png"]
    assert (folders["output"] / "restart_00001.png").stat().st_size > 0
