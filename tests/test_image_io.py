"""LoadImage, LoadMask and SaveImage: formats, orientation, alpha, bad files, safe atomic saving."""
from __future__ import annotations

import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from nodegraph.context import RunContext
from nodegraph.errors import NodeError
from nodegraph.nodes.io import load_image, load_mask, prefix_problem, save_image
from tests.imaging import DATA, as_image, photo_array, to_u8


def fake_png(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims width x height and that holds no pixel data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))
    return path


# --------------------------------------------------------------------------- loading

def test_png_and_jpeg_load_as_pillow_decodes_them():
    for name in ("chelsea_128.png", "rocket_128.jpg"):
        out = load_image(str(DATA / name))
        expected = np.asarray(Image.open(DATA / name).convert("RGB"))
        assert out["image"].shape == (1, 3, *expected.shape[:2]) and out["image"].dtype == torch.float32
        assert torch.equal(out["image"], as_image(expected))  # level / 255, exactly
        assert torch.equal(out["mask"], torch.zeros(1, 1, *expected.shape[:2]))
        assert (out["width"], out["height"]) == (expected.shape[1], expected.shape[0])


def test_webp_lossless(tmp_path):
    rgb = photo_array()
    Image.fromarray(rgb).save(tmp_path / "p.webp", lossless=True)
    assert np.array_equal(to_u8(load_image(str(tmp_path / "p.webp"))["image"][0]), rgb)


def test_alpha_becomes_the_mask(tmp_path):
    rgb = photo_array()
    alpha = np.random.default_rng(0).integers(0, 256, rgb.shape[:2], dtype=np.uint8)
    Image.fromarray(np.dstack([rgb, alpha])).save(tmp_path / "a.png")
    out = load_image(str(tmp_path / "a.png"))
    assert np.array_equal(to_u8(out["image"][0]), rgb)
    assert torch.allclose(out["mask"][0, 0], 1 - torch.from_numpy(alpha).float() / 255, atol=1e-6)


def test_palette_transparency_becomes_the_mask(tmp_path):
    indices = np.zeros((6, 8), np.uint8)
    indices[2:4, 3:6] = 1
    image = Image.fromarray(indices).convert("P")
    image.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    image.save(tmp_path / "p.png", transparency=1)
    out = load_image(str(tmp_path / "p.png"))
    assert torch.equal(out["mask"][0, 0], torch.from_numpy(indices == 1).float())
    assert torch.equal(out["image"][0, :, 0, 0], torch.tensor([1.0, 0, 0]))


def test_exif_orientation_is_applied(tmp_path):
    rgb = photo_array()
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: display rotated 90 degrees clockwise
    Image.fromarray(rgb).save(tmp_path / "o.png", exif=exif)
    Image.fromarray(rgb).save(tmp_path / "o.jpg", exif=exif, quality=95)
    out = load_image(str(tmp_path / "o.png"))["image"][0]
    assert np.array_equal(to_u8(out), np.rot90(rgb, k=-1))
    assert load_image(str(tmp_path / "o.jpg"))["image"].shape == (1, 3, 128, 85)


def test_sixteen_bit_grey(tmp_path):
    grey = np.random.default_rng(1).integers(0, 65536, (10, 12), dtype=np.uint16)
    Image.fromarray(grey).save(tmp_path / "g.png")
    out = load_image(str(tmp_path / "g.png"))["image"]
    assert torch.allclose(out[0], torch.from_numpy(grey / 65535.0).float().expand(3, 10, 12), atol=1e-6)


def test_load_mask_luminance_alpha_invert_threshold(tmp_path):
    rgb = photo_array("astronaut_96.png")
    alpha = np.random.default_rng(2).integers(0, 256, rgb.shape[:2], dtype=np.uint8)
    Image.fromarray(np.dstack([rgb, alpha])).save(tmp_path / "m.png")
    luma = np.asarray(Image.fromarray(rgb).convert("L")) / 255.0
    path = str(tmp_path / "m.png")
    assert torch.allclose(load_mask(path)[0, 0], torch.from_numpy(luma).float(), atol=1e-6)
    assert torch.allclose(load_mask(path, channel="alpha")[0, 0], torch.from_numpy(1 - alpha / 255.0).float(), atol=1e-6)
    assert torch.allclose(load_mask(path, invert=True)[0, 0], torch.from_numpy(1 - luma).float(), atol=1e-6)
    hard = load_mask(path, threshold=0.5)[0, 0]
    assert torch.equal(hard, torch.from_numpy(luma >= 0.5).float())
    with pytest.raises(NodeError, match="has no alpha channel"):
        load_mask(str(DATA / "chelsea_128.png"), channel="alpha")


# --------------------------------------------------------------------------- bad files

def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(NodeError, match=r"no such image file '.*nothere\.png'"):
        load_image(str(tmp_path / "nothere.png"))


def test_non_image_names_the_path(tmp_path):
    (tmp_path / "notes.png").write_text("this is not a picture")
    with pytest.raises(NodeError, match=r"'.*notes\.png' is not an image file"):
        load_image(str(tmp_path / "notes.png"))


def test_truncated_png_names_the_path(tmp_path):
    data = (DATA / "chelsea_128.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(NodeError, match=r"cannot decode '.*cut\.png'.*truncated"):
        load_image(str(tmp_path / "cut.png"))


def test_zero_size_header_is_refused(tmp_path):
    with pytest.raises(NodeError, match=r"zero\.png"):
        load_image(str(fake_png(tmp_path / "zero.png", 0, 0)))


@pytest.mark.parametrize("width,height", [(20000, 10), (12000, 12000), (16384, 16384), (2**31 - 1, 2**31 - 1)])
def test_huge_images_are_refused_from_the_header(tmp_path, width, height):
    # The files hold no pixel data: an error here shows nothing was decoded or allocated.
    path = fake_png(tmp_path / "huge.png", width, height)
    with pytest.raises(NodeError, match=r"huge\.png.*(larger than the limit)"):
        load_image(str(path))
    with pytest.raises(NodeError, match="larger than the limit"):
        load_mask(str(path))


# --------------------------------------------------------------------------- saving

def context(tmp_path: Path) -> RunContext:
    workflow = {"format": "nodegraph/1", "nodes": {"save": {"type": "SaveImage", "params": {"prefix": "x"}}}}
    return RunContext(out_dir=tmp_path / "out", workflow_factory=lambda: workflow,
                      node_versions={"SaveImage": 1, "LoadImage": 1}, info={"seeds": {"s": 7}, "models": ["m"]},
                      node_id="save", node_type="SaveImage")


def test_save_writes_png_with_workflow_and_manifest(tmp_path):
    ctx = context(tmp_path)
    image = torch.rand(2, 3, 12, 16)
    assert save_image(image, ctx, prefix="shot") is None
    files = sorted((tmp_path / "out").iterdir())
    assert [f.name for f in files] == ["shot_00001.png", "shot_00002.png"]
    assert ctx.files == files
    for i, path in enumerate(files):
        with Image.open(path) as png:
            assert np.array_equal(np.asarray(png), to_u8(image[i]))  # round(x * 255)
            workflow = json.loads(png.info["nodegraph.workflow"])
            manifest = json.loads(png.info["nodegraph.manifest"])
        assert workflow == ctx.workflow
        assert manifest["node_versions"] == {"SaveImage": 1, "LoadImage": 1}
        assert manifest["info"] == {"seeds": {"s": 7}, "models": ["m"]}
        assert manifest["batch_index"] == i and "torch" in manifest["packages"] and "pillow" in manifest["packages"]


def test_existing_files_are_never_overwritten(tmp_path):
    ctx = context(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "shot_00001.png").write_bytes(b"precious")
    (out / "shot_00007.png").write_bytes(b"precious too")
    save_image(torch.rand(1, 3, 4, 4), ctx, prefix="shot")
    assert (out / "shot_00001.png").read_bytes() == b"precious"
    assert (out / "shot_00007.png").read_bytes() == b"precious too"
    assert (out / "shot_00008.png").is_file()
    save_image(torch.rand(1, 3, 4, 4), ctx, prefix="shot")
    assert (out / "shot_00009.png").is_file()


def test_link_refuses_a_name_that_appears_meanwhile(tmp_path, monkeypatch):
    # Another writer takes the chosen name between the scan and the rename: the next number is used.
    import nodegraph.nodes.io as io

    ctx = context(tmp_path)
    (tmp_path / "out").mkdir()
    real = io.next_index

    def racing(folder, name):
        index = real(folder, name)
        (folder / f"{name}_{index:05d}.png").write_bytes(b"other writer")
        return index

    monkeypatch.setattr(io, "next_index", racing)
    save_image(torch.rand(1, 3, 4, 4), ctx, prefix="shot")
    assert (tmp_path / "out" / "shot_00001.png").read_bytes() == b"other writer"
    assert Image.open(tmp_path / "out" / "shot_00002.png").size == (4, 4)


def test_interrupted_write_leaves_no_file(tmp_path, monkeypatch):
    ctx = context(tmp_path)

    def broken_save(self, fp, *args, **kwargs):
        fp.write(b"\x89PNG half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(Image.Image, "save", broken_save)
    with pytest.raises(KeyboardInterrupt):
        save_image(torch.rand(1, 3, 4, 4), ctx, prefix="shot")
    assert list((tmp_path / "out").iterdir()) == []
    assert ctx.files == []


def test_subfolder_prefix(tmp_path):
    ctx = context(tmp_path)
    save_image(torch.rand(1, 3, 4, 4), ctx, prefix="runs/a/shot")
    assert (tmp_path / "out" / "runs" / "a" / "shot_00001.png").is_file()


@pytest.mark.parametrize("prefix,reason", [
    ("/tmp/x", "absolute"), ("../x", "'..'"), ("a/../../x", "'..'"), ("C:\\x", "absolute"), ("~/x", "absolute"),
    ("", "empty"), ("dir/", "file name"), ("a/..", "'..'")])
def test_escaping_prefixes_are_refused(tmp_path, prefix, reason):
    assert reason in prefix_problem(prefix)
    with pytest.raises(NodeError, match="prefix"):
        save_image(torch.rand(1, 3, 4, 4), context(tmp_path), prefix=prefix)
    assert not (tmp_path / "x").exists()


def test_prefix_through_a_link_outside_is_refused(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "elsewhere").mkdir()
    os.symlink(tmp_path / "elsewhere", tmp_path / "out" / "link")
    with pytest.raises(NodeError, match="outside the output folder"):
        save_image(torch.rand(1, 3, 4, 4), context(tmp_path), prefix="link/x")
    assert list((tmp_path / "elsewhere").iterdir()) == []


def test_prefix_checks_run_at_validation():
    from nodegraph.api import Engine
    from nodegraph.errors import WorkflowInvalid

    workflow = {"format": "nodegraph/1", "nodes": {
        "load": {"type": "LoadImage", "params": {"path": str(DATA / "chelsea_128.png")}},
        "save": {"type": "SaveImage", "inputs": {"image": "load.image"}, "params": {"prefix": "../escape"}}}}
    issues = Engine().validate(workflow)
    assert len(issues) == 1 and issues[0].field == "prefix" and "'..'" in issues[0].message
    assert "node 'save' (SaveImage): param 'prefix'" in str(issues[0])
    with pytest.raises(WorkflowInvalid):
        Engine().run(workflow)
