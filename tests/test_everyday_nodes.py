"""PreviewImage, SaveMask, MaskShape, ImageToMask and MaskToImage against independent references:
LoadMask round trips, cv2.rectangle / cv2.ellipse, Pillow's convert("L") / convert("RGB"), ComfyUI's
channel semantics, and one workflow through the engine."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from nodegraph.api import Engine
from nodegraph.context import RunContext
from nodegraph.errors import NodeError
from nodegraph.nodes.io import load_image, load_mask, preview_dir, preview_image, save_image, save_mask
from nodegraph.nodes.mask import image_to_mask, mask_shape, mask_to_image
from tests.imaging import DATA, PHOTOS, as_image, as_mask, photo_array, random_masks, to_u8


@pytest.fixture
def system_temp(tmp_path, monkeypatch) -> Path:
    """The system temp folder, moved into tmp_path so previews never land in the real one."""
    folder = tmp_path / "system-temp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def context(tmp_path: Path, node_type: str) -> RunContext:
    workflow = {"format": "nodegraph/1", "nodes": {"n": {"type": node_type}}}
    return RunContext(out_dir=tmp_path / "out", workflow_factory=lambda: workflow,
                      node_versions={node_type: 1}, node_id="n", node_type=node_type)


def text_chunks(path: Path) -> tuple[dict, dict]:
    with Image.open(path) as png:
        return json.loads(png.info["nodegraph.workflow"]), json.loads(png.info["nodegraph.manifest"])


# --------------------------------------------------------------------------- PreviewImage

def test_preview_folder_is_the_runs_temp_dir_or_the_system_one(system_temp, tmp_path):
    assert preview_dir(SimpleNamespace(temp_dir=tmp_path / "mine")) == tmp_path / "mine"
    assert preview_dir(SimpleNamespace()) == system_temp / "nodegraph-preview"
    assert preview_dir(SimpleNamespace(temp_dir=None)) == system_temp / "nodegraph-preview"


def test_preview_writes_to_the_temp_folder_with_the_workflow(system_temp, tmp_path):
    ctx = context(tmp_path, "PreviewImage")
    image = as_image(photo_array(), photo_array()[::-1].copy())
    preview_image(image, ctx, prefix="look")
    folder = preview_dir(ctx)
    files = sorted(folder.iterdir())
    assert [f.name for f in files] == ["look_00001.png", "look_00002.png"] and ctx.files == files
    assert not (tmp_path / "out").exists()  # nothing in the output folder
    for i, path in enumerate(files):
        with Image.open(path) as png:
            assert png.mode == "RGB" and np.array_equal(np.asarray(png), to_u8(image[i]))
        workflow, manifest = text_chunks(path)
        assert workflow == ctx.workflow and manifest["node"]["type"] == "PreviewImage" and manifest["batch_index"] == i
    preview_image(image[:1], ctx, prefix="look")  # numbering continues; nothing is overwritten
    assert (folder / "look_00003.png").is_file()


def test_preview_prefix_stays_inside_the_temp_folder(system_temp, tmp_path):
    with pytest.raises(NodeError, match="'..'"):
        preview_image(torch.rand(1, 3, 4, 4), context(tmp_path, "PreviewImage"), prefix="../escape")
    assert not (system_temp / "escape_00001.png").exists()


# --------------------------------------------------------------------------- SaveMask

def test_save_mask_round_trips_through_load_mask(tmp_path):
    ctx = context(tmp_path, "SaveMask")
    masks = as_mask(*random_masks(48, 64, 3, seed=11, soft=True))
    save_mask(masks, ctx, prefix="masks/m")
    files = sorted((tmp_path / "out" / "masks").iterdir())
    assert [f.name for f in files] == ["m_00001.png", "m_00002.png", "m_00003.png"] and ctx.files == files
    for i, path in enumerate(files):
        with Image.open(path) as png:
            assert png.mode == "L" and np.array_equal(np.asarray(png), to_u8(masks[i]))  # white = 1
        assert torch.equal(load_mask(str(path)), masks[i:i + 1])  # exactly the levels that went in
        workflow, manifest = text_chunks(path)
        assert workflow == ctx.workflow and manifest["node_versions"] == {"SaveMask": 1}


def test_save_mask_quantizes_like_save_image(tmp_path):
    # A float mask comes back at its nearest 8-bit level: what SaveImage does to the same values.
    ctx = context(tmp_path, "SaveMask")
    mask = torch.rand(1, 1, 32, 40, generator=torch.Generator().manual_seed(3))
    save_mask(mask, ctx, prefix="soft")
    save_image(mask.expand(1, 3, 32, 40), ctx, prefix="soft_rgb")
    loaded = load_mask(str(tmp_path / "out" / "soft_00001.png"))
    assert torch.equal(loaded, torch.round(mask * 255) / 255)
    assert torch.equal(loaded, load_mask(str(tmp_path / "out" / "soft_rgb_00001.png")))


def test_save_mask_refuses_an_image(tmp_path):
    with pytest.raises(NodeError, match="MASK tensor of shape"):
        save_mask(torch.rand(1, 3, 8, 8), context(tmp_path, "SaveMask"))


# --------------------------------------------------------------------------- MaskShape

BOXES = [(64, 48, 5, 7, 30, 20), (64, 48, 10, 3, 41, 37), (96, 64, -10, 5, 50, 70), (128, 96, 20, 10, 90, 60),
         (32, 32, 0, 0, 32, 32), (48, 40, 30, 25, 40, 40)]


@pytest.mark.parametrize("width,height,x,y,w,h", BOXES)
def test_rectangle_is_cv2_rectangle(width, height, x, y, w, h):
    expected = np.zeros((height, width), np.uint8)
    cv2.rectangle(expected, (x, y), (x + w - 1, y + h - 1), 255, thickness=-1)
    out = mask_shape(width, height, "rectangle", x, y, w, h)
    assert out.shape == (1, 1, height, width) and out.dtype == torch.float32
    assert np.array_equal(to_u8(out[0]), expected)


@pytest.mark.parametrize("width,height,x,y,w,h", BOXES)
def test_ellipse_is_cv2_ellipse_up_to_its_boundary(width, height, x, y, w, h):
    # cv2.ellipse draws a polygon through pixel centres; shift=1 gives it the box's half-pixel centre.
    expected = np.zeros((height, width), np.uint8)
    cv2.ellipse(expected, (2 * x + w - 1, 2 * y + h - 1), (w, h), 0, 0, 360, 255, thickness=-1, shift=1)
    out = mask_shape(width, height, "ellipse", x, y, w, h)[0, 0].numpy() > 0
    differ = out ^ (expected > 0)
    # Differences only along cv2's boundary: pixels that a 3x3 dilation or erosion of its fill changes.
    kernel = np.ones((3, 3), np.uint8)
    ring = (cv2.dilate(expected, kernel) > 0) & ~(cv2.erode(expected, kernel, borderType=cv2.BORDER_CONSTANT, borderValue=0) > 0)
    assert not (differ & ~ring).any()
    assert differ.sum() <= 0.1 * out.sum()
    inside_box = np.zeros_like(out)
    inside_box[max(y, 0):y + h, max(x, 0):x + w] = True
    assert not (out & ~inside_box).any()  # never outside the box


def test_shape_value_and_invert():
    plain = mask_shape(40, 32, "ellipse", 4, 4, 24, 20)
    assert torch.equal(mask_shape(40, 32, "ellipse", 4, 4, 24, 20, value=0.25), plain * 0.25)
    assert torch.equal(mask_shape(40, 32, "ellipse", 4, 4, 24, 20, invert=True), 1 - plain)
    assert torch.equal(mask_shape(40, 32, "ellipse", 4, 4, 24, 20, value=0.5, invert=True), (1 - plain) * 0.5)


def shape_workflow(**params) -> dict:
    return {"format": "nodegraph/1", "nodes": {
        "shape": {"type": "MaskShape", "params": {"width": 64, "height": 48, "x": 8, "y": 8, "w": 16, "h": 16, **params}},
        "save": {"type": "SaveMask", "inputs": {"mask": "shape.mask"}}}}


@pytest.mark.parametrize("params,field,words", [
    ({"x": 64, "y": 0, "w": 10, "h": 10}, "x", "entirely outside the 64x48 canvas"),
    ({"x": -20, "y": 5, "w": 20, "h": 10}, "x", "entirely outside"),
    ({"x": 0, "y": 0, "w": 0, "h": 10}, "w", "greater than or equal to 1"),
    ({"width": 16384, "height": 16384}, "width", "larger than the limit"),
    ({"width": 20000}, "width", "less than or equal to 16384"),
])
def test_shape_problems_are_found_at_validation(params, field, words):
    assert Engine().validate(shape_workflow()) == []
    issues = Engine().validate(shape_workflow(**params))
    assert [i.field for i in issues] == [field] and words in issues[0].message


def test_shape_problems_from_links_fail_at_run_time():
    with pytest.raises(NodeError, match="entirely outside"):
        mask_shape(32, 32, "rectangle", 40, 0, 8, 8)


# --------------------------------------------------------------------------- ImageToMask / MaskToImage

@pytest.mark.parametrize("name", PHOTOS)
def test_luminance_is_pillow_convert_l_and_load_mask(name):
    image = load_image(str(DATA / name))["image"]
    out = image_to_mask(image, "luminance")
    expected = np.asarray(Image.open(DATA / name).convert("RGB").convert("L"))
    assert out.shape == (1, 1, *expected.shape) and np.array_equal(to_u8(out[0]), expected)
    assert torch.equal(out, load_mask(str(DATA / name)))  # LoadImage -> ImageToMask == LoadMask


def test_luminance_of_a_float_image_is_pillow_on_its_8bit_levels():
    image = torch.rand(2, 3, 24, 32, generator=torch.Generator().manual_seed(5))
    out = image_to_mask(image, "luminance")
    for o, i in zip(out, image):
        assert np.array_equal(to_u8(o), np.asarray(Image.fromarray(to_u8(i)).convert("L")))


@pytest.mark.parametrize("index,channel", [(0, "red"), (1, "green"), (2, "blue")])
def test_colour_channel_is_taken_as_it_is(index, channel):
    # ComfyUI's ImageToMask: image[:, :, :, channel] in its (B, H, W, C) layout.
    image = torch.rand(2, 3, 16, 20, generator=torch.Generator().manual_seed(index))
    comfy = image.permute(0, 2, 3, 1)[:, :, :, index]
    out = image_to_mask(image, channel)
    assert torch.equal(out[:, 0], comfy)
    out += 1  # a new tensor: the input is untouched
    assert torch.equal(image.permute(0, 2, 3, 1)[:, :, :, index], comfy)


def test_mask_to_image_is_grey_rgb():
    masks = as_mask(*random_masks(32, 48, 2, seed=4, soft=True))
    out = mask_to_image(masks)
    # ComfyUI's MaskToImage repeats the mask into 3 channels; Pillow's convert("RGB") of an L image too.
    assert torch.equal(out, masks.expand(-1, 3, -1, -1))
    for o, m in zip(out, masks):
        assert np.array_equal(to_u8(o), np.asarray(Image.fromarray(to_u8(m)).convert("RGB")))
    assert torch.equal(image_to_mask(out, "luminance"), masks)  # grey luma is the grey level
    with pytest.raises(NodeError, match="MASK tensor of shape"):
        mask_to_image(torch.rand(1, 3, 8, 8))


# --------------------------------------------------------------------------- a workflow through the engine

def test_workflow_saves_a_mask_and_a_preview(system_temp, tmp_path):
    photo = DATA / "astronaut_96.png"
    workflow = {"format": "nodegraph/1", "nodes": {
        "load": {"type": "LoadImage", "params": {"path": str(photo)}},
        "luma": {"type": "ImageToMask", "inputs": {"image": "load.image"}},
        "save": {"type": "SaveMask", "inputs": {"mask": "luma.mask"}, "params": {"prefix": "astronaut_mask"}},
        "preview": {"type": "PreviewImage", "inputs": {"image": "load.image"}}}}
    out = tmp_path / "out"
    engine = Engine()
    result = engine.run(workflow, out_dir=out)
    mask_file = out / "astronaut_mask_00001.png"
    preview_file = system_temp / "nodegraph-preview" / "preview_00001.png"
    assert sorted(result.files) == sorted([mask_file, preview_file])
    assert sorted(p.name for p in out.iterdir()) == [mask_file.name]  # the preview is not in the output folder
    expected = np.asarray(Image.open(photo).convert("L"))
    assert np.array_equal(np.asarray(Image.open(mask_file)), expected)
    assert torch.equal(load_mask(str(mask_file)), load_mask(str(photo)))
    assert np.array_equal(np.asarray(Image.open(preview_file)), photo_array("astronaut_96.png"))
    assert text_chunks(preview_file)[0]["nodes"]["preview"]["type"] == "PreviewImage"

    again = engine.run(workflow, out_dir=out)  # output nodes are never cached: new numbered files
    assert again.status["load"] == "cached" and again.status["save"] == again.status["preview"] == "ran"
    assert (out / "astronaut_mask_00002.png").is_file() and preview_file.with_name("preview_00002.png").is_file()
