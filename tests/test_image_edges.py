"""Image, mask and latent nodes on the awkward inputs users really have: strips one pixel wide, batches of
different sizes, float files holding NaN. Each gives a correct result or an error naming the node."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from nodegraph.api import Engine
from nodegraph.errors import NodeError, NodeFailed


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine()


def strip(tmp_path, width: int, height: int, colour=(200, 10, 10)) -> str:
    path = tmp_path / f"strip_{width}x{height}.png"
    Image.new("RGB", (width, height), colour).save(path)
    return str(path)


def run(engine, tmp_path, nodes: dict, target: str) -> dict:
    result = engine.run({"format": "nodegraph/1", "nodes": nodes}, targets=[target], out_dir=tmp_path / "out",
                        device="cpu")
    return result.outputs[target]


@pytest.mark.parametrize("method", ["bilinear", "nearest-exact", "lanczos"])
@pytest.mark.parametrize("size,target", [((1, 40), (40, 1)), ((400, 2), (2, 400))])
def test_image_scale_centre_crop_of_a_strip_keeps_its_pixels(engine, tmp_path, method, size, target):
    # the centre crop to a far more extreme aspect rounded the strip away: a torch error, or black with lanczos
    nodes = {"load": {"type": "LoadImage", "params": {"path": strip(tmp_path, *size)}},
             "scale": {"type": "ImageScale", "inputs": {"image": "load.image"},
                       "params": {"width": target[0], "height": target[1], "crop": "center", "method": method}}}
    image = run(engine, tmp_path, nodes, "scale")["image"]
    assert tuple(image.shape) == (1, 3, target[1], target[0])
    expected = torch.tensor([200, 10, 10]).view(1, 3, 1, 1) / 255.0
    assert torch.allclose(image, expected.expand_as(image), atol=1 / 255)


def test_latent_scale_centre_crop_of_a_strip_latent(engine, tmp_path):
    nodes = {"empty": {"type": "EmptyLatent", "params": {"width": 8, "height": 4096}},
             "scale": {"type": "LatentScale", "inputs": {"latent": "empty.latent"},
                       "params": {"width": 4096, "height": 64, "crop": "center", "method": "bislerp"}}}
    latent = run(engine, tmp_path, nodes, "scale")["latent"]
    assert tuple(latent.samples.shape) == (1, 4, 8, 512)
    assert torch.isfinite(latent.samples).all()


@pytest.mark.parametrize("size", [(1, 1000), (1000, 1)])
def test_crop_to_mask_and_paste_back_on_a_one_pixel_strip(engine, tmp_path, size):
    # the fit of a 1 x 1000 crop into 8 x 8 (diffusers' "fill" arithmetic) was 0 px wide: a Pillow ValueError
    width, height = size
    nodes = {"load": {"type": "LoadImage", "params": {"path": strip(tmp_path, width, height)}},
             "mask": {"type": "MaskShape", "params": {"width": width, "height": height, "x": 0, "y": 0,
                                                      "w": width, "h": height}},
             "crop": {"type": "CropToMask", "inputs": {"image": "load.image", "mask": "mask.mask"},
                      "params": {"width": 8, "height": 8, "padding": 0}},
             "paste": {"type": "PasteCrop", "inputs": {"original": "load.image", "image": "crop.image",
                                                       "mask": "mask.mask", "region": "crop.region"}}}
    crop = run(engine, tmp_path, nodes, "crop")
    red = torch.tensor([200, 10, 10]).view(1, 3, 1, 1) / 255.0
    assert tuple(crop["image"].shape) == (1, 3, 8, 8)
    assert torch.allclose(crop["image"], red.expand(1, 3, 8, 8), atol=1 / 255)
    assert crop["region"].boxes == ((0, 0, width, height),)
    pasted = run(engine, tmp_path, nodes, "paste")["image"]
    assert tuple(pasted.shape) == (1, 3, height, width)
    assert torch.allclose(pasted, red.expand_as(pasted), atol=1 / 255)


def test_vae_encode_for_inpaint_refuses_mismatched_batches_by_name():
    from nodegraph.nodes.latent import grey_masked

    image, mask = torch.rand(2, 3, 16, 16), torch.rand(3, 1, 16, 16)
    with pytest.raises(NodeError, match=r"batch sizes differ \(image: 2, mask: 3\)"):
        grey_masked(image, mask, 6)
    grey, grown = grey_masked(image, mask[:1], 6)  # a single mask still serves the whole batch, as in ComfyUI
    assert grey.shape[0] == 2 and grown.shape[0] == 1


def test_vae_size_advice_never_suggests_zero_pixels():
    from nodegraph.nodes.latent import _check_image

    with pytest.raises(NodeError) as caught:
        _check_image(torch.rand(1, 3, 40, 1), 8)
    assert "e.g. to 8x40" in str(caught.value)


def test_float_image_with_nan_is_refused_naming_the_file(engine, tmp_path):
    path = tmp_path / "depth.tif"
    values = np.full((16, 16), 0.5, np.float32)
    values[3, 4] = np.nan
    Image.fromarray(values).save(path)
    for node in ({"type": "LoadImage", "params": {"path": str(path)}},
                 {"type": "LoadMask", "params": {"path": str(path)}}):
        with pytest.raises(NodeFailed, match="depth.tif' holds NaN"):
            run(engine, tmp_path, {"load": node}, "load")
    values[3, 4] = 0.25  # a finite float file still loads
    Image.fromarray(values).save(path)
    mask = run(engine, tmp_path, {"load": {"type": "LoadMask", "params": {"path": str(path)}}}, "load")["mask"]
    assert float(mask[0, 0, 3, 4]) == 0.25 and float(mask[0, 0, 0, 0]) == 0.5


def test_empty_latent_refuses_linked_sizes_that_are_not_multiples_of_8(engine, tmp_path):
    # validation only sees literals; a linked 63 x 45 silently became a 56 x 40 latent
    path = tmp_path / "photo.png"
    Image.fromarray(np.zeros((45, 63, 3), np.uint8)).save(path)
    nodes = {"load": {"type": "LoadImage", "params": {"path": str(path)}},
             "empty": {"type": "EmptyLatent", "inputs": {"width": "load.width", "height": "load.height"}}}
    with pytest.raises(NodeFailed) as caught:
        run(engine, tmp_path, nodes, "empty")
    message = str(caught.value)
    assert "(EmptyLatent)" in message and "'width' = 63" in message and "'height' = 45" in message
    Image.fromarray(np.zeros((48, 64, 3), np.uint8)).save(path)
    latent = run(engine, tmp_path, nodes, "empty")["latent"]
    assert tuple(latent.samples.shape) == (1, 4, 6, 8)


@pytest.mark.parametrize("node_type,source", [("ImageResize", "load.image"), ("MaskResize", "load.mask")])
def test_resize_refuses_linked_long_side_together_with_width(engine, tmp_path, node_type, source):
    # validation only sees literals; a linked width next to long_side was silently ignored
    path = strip(tmp_path, 40, 24)
    nodes = {"load": {"type": "LoadImage", "params": {"path": path}},
             "resize": {"type": node_type, "inputs": {source.split(".")[1]: source, "width": "load.width"},
                        "params": {"long_side": 20}}}
    with pytest.raises(NodeFailed, match=rf"\({node_type}\) failed: param 'long_side': give either long_side"):
        run(engine, tmp_path, nodes, "resize")


@pytest.mark.parametrize("prefix", ["taken/photo", "taken/deeper/photo"])
def test_save_image_prefix_through_a_file_names_the_file(engine, tmp_path, prefix):
    # a file where the prefix needs a subfolder failed with a bare FileExistsError
    out = tmp_path / "out"
    out.mkdir()
    (out / "taken").write_text("not a folder")
    nodes = {"load": {"type": "LoadImage", "params": {"path": strip(tmp_path, 4, 4)}},
             "save": {"type": "SaveImage", "inputs": {"image": "load.image"}, "params": {"prefix": prefix}}}
    with pytest.raises(NodeFailed, match=r"\(SaveImage\) failed: prefix .* needs the folder .*taken'.* in the way"):
        engine.run({"format": "nodegraph/1", "nodes": nodes}, out_dir=out, device="cpu")
    assert sorted(p.name for p in out.iterdir()) == ["taken"]


def test_sixteen_bit_grey_png_with_a_transparent_level_gives_its_mask(engine, tmp_path):
    # the tRNS chunk of a 16-bit grey PNG was ignored: an all-0 mask, and LoadMask said "no alpha channel"
    path = tmp_path / "grey16.png"
    levels = np.full((8, 8), 30000, np.uint16)
    levels[2:4, 5:7] = 0
    Image.fromarray(levels).save(path, transparency=0)
    transparent = np.zeros((8, 8), np.float32)
    transparent[2:4, 5:7] = 1
    loaded = run(engine, tmp_path, {"load": {"type": "LoadImage", "params": {"path": str(path)}}}, "load")
    assert np.array_equal(loaded["mask"][0, 0].numpy(), transparent)
    assert torch.allclose(loaded["image"][0, :, 0, 0], torch.full((3,), 30000 / 65535))
    mask = run(engine, tmp_path, {"load": {"type": "LoadMask", "params": {"path": str(path), "channel": "alpha"}}},
               "load")["mask"]
    assert np.array_equal(mask[0, 0].numpy(), transparent)
