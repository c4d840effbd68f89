"""workflows/outpaint_telea.json end to end: through nodegraph.api.Engine, from the PNG it saves,
and once through the CLI."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from nodegraph.api import Engine

ROOT = Path(__file__).resolve().parents[1]
WORKFLOW = ROOT / "workflows" / "outpaint_telea.json"
PHOTO = ROOT / "workflows" / "images" / "coffee_256.jpg"
GREY = (128, 128, 128)


def expected_pixels() -> np.ndarray:
    """The photo, grown 256 px to the right with grey, the new strip filled by cv2.inpaint (Telea, radius 3)."""
    rgb = np.asarray(Image.open(PHOTO).convert("RGB"))
    h, w = rgb.shape[:2]
    canvas = np.empty((h, w + 256, 3), np.uint8)
    canvas[:, :w], canvas[:, w:] = rgb, GREY
    holes = np.zeros((h, w + 256), np.uint8)
    holes[:, w:] = 255
    bgr = cv2.inpaint(cv2.cvtColor(canvas, cv2.COLOR_RGB2BGR), holes, 3, cv2.INPAINT_TELEA)
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def check_output(path: Path) -> None:
    original = np.asarray(Image.open(PHOTO).convert("RGB"))
    with Image.open(path) as png:
        pixels = np.asarray(png.convert("RGB"))
        assert json.loads(png.info["nodegraph.workflow"])["nodes"]["expand"]["type"] == "ExpandCanvas"
        assert "ExpandCanvas" in json.loads(png.info["nodegraph.manifest"])["node_versions"]
    assert pixels.shape == (171, 512, 3)
    assert np.array_equal(pixels[:, :256], original)           # original pixels untouched
    strip = pixels[:, 256:].astype(int)
    assert (np.abs(strip - GREY).sum(axis=-1) > 30).mean() > 0.9  # the grey strip was filled
    assert np.array_equal(pixels, expected_pixels())             # ... by Telea, exactly
    # the fill continues the photo: the first new column is close to the last old one
    assert np.abs(strip[:, 0] - original[:, -1].astype(int)).mean() < 12


def test_workflow_runs_through_the_engine_and_reruns_from_its_png(tmp_path):
    engine = Engine()
    result = engine.run(WORKFLOW, out_dir=tmp_path / "a", device="cpu")
    assert result.status == dict.fromkeys(["load", "expand", "fill", "overlay", "save"], "ran")
    assert [p.name for p in result.files] == ["outpaint_telea_00001.png"]
    check_output(result.files[0])

    again = engine.run(WORKFLOW, out_dir=tmp_path / "a", device="cpu")
    assert again.status["overlay"] == "cached" and again.status["save"] == "ran"
    assert again.status["fill"] == "skipped"  # not needed: overlay came from the cache
    assert [p.name for p in again.files] == ["outpaint_telea_00002.png"]  # the first file is kept

    from_png = Engine().run(result.files[0], out_dir=tmp_path / "b", device="cpu")  # the embedded workflow
    assert np.array_equal(np.asarray(Image.open(from_png.files[0])), np.asarray(Image.open(result.files[0])))


def test_an_edited_photo_is_reloaded(tmp_path):
    (tmp_path / "images").mkdir()
    shutil.copy(WORKFLOW, tmp_path / "wf.json")
    shutil.copy(PHOTO, tmp_path / "images" / "coffee_256.jpg")
    engine = Engine()
    first = engine.run(tmp_path / "wf.json", out_dir=tmp_path / "out")
    Image.fromarray(np.zeros((171, 256, 3), np.uint8)).save(tmp_path / "images" / "coffee_256.jpg")
    second = engine.run(tmp_path / "wf.json", out_dir=tmp_path / "out")
    assert second.status["load"] == "ran"
    assert np.asarray(Image.open(second.files[0]))[:, :256].max() == 0
    assert np.asarray(Image.open(first.files[0]))[:, :256].max() > 0


def test_workflow_runs_through_the_cli(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "nodegraph.cli", "run", str(WORKFLOW), "--out", str(tmp_path), "--json",
                           "--no-cache"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    files = sorted(tmp_path.glob("outpaint_telea_*.png"))
    assert len(files) == 1
    check_output(files[0])


def test_cli_refuses_an_escaping_prefix(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "nodegraph.cli", "run", str(WORKFLOW), "--out", str(tmp_path / "o"),
                           "--set", "save.prefix=../outside", "--no-cache"],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    assert "node 'save' (SaveImage): param 'prefix'" in proc.stdout + proc.stderr
    assert not list(tmp_path.glob("**/outside_*.png"))
