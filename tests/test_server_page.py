"""The status page at ``/`` rendered by a real headless browser (Debian's chromium): its JavaScript must put the
prompts, their graphs (SVG nodes and links) and their output images into the DOM."""
from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from tests.server_fixtures import img2img, run_prompt, server_folders

CHROMIUM = next((shutil.which(name) for name in ("chromium", "chromium-browser", "google-chrome") if shutil.which(name)),
                None)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary (apt-get install chromium)")


@pytest.fixture(scope="module")
def server(tiny, tmp_path_factory):
    from nodegraph.server.app import Running, ServerConfig

    running = Running(ServerConfig(port=0, cache_dir=False, **server_folders(tmp_path_factory.mktemp("page"), tiny)))
    yield running
    running.stop()


def dump_dom(url: str, profile) -> str:
    result = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                             f"--user-data-dir={profile}", "--virtual-time-budget=10000", "--dump-dom", url],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def test_the_page_shows_prompts_graphs_and_images(server, tmp_path):
    prompt_id, _ = run_prompt(server.url, img2img(seed=3, prefix="page"))
    dom = dump_dom(server.url + "/", tmp_path / "profile")
    card = re.search(rf'<div class="card state-success" id="prompt-{prompt_id}">(.*?)</div></div>',
                     dom, re.S)
    assert card, dom[:3000]
    html = card.group(1)
    assert '<svg class="graph"' in html
    nodes = re.findall(r'<g class="node[^"]*" data-node="([^"]+)">', html)
    assert sorted(nodes) == sorted(img2img()["nodes"])
    assert len(re.findall(r"<line ", html)) == 9  # the workflow's links
    assert "s: Sampler" in html
    assert re.search(r'<img src="/view\?filename=page_00001\.png&amp;subfolder=&amp;type=output"', html)
    assert 'id="connection">live<' in dom  # the websocket connected
