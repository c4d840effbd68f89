"""PreviewImage and SaveMask: where the files go, what they hold, and LoadMask round trips."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from nodegraph.context import RunContext
from nodegraph.errors import NodeError
from nodegraph.nodes.io import load_mask, preview_dir, preview_image, save_image, save_mask
from tests.imaging import as_image, as_mask, photo_array, random_masks, to_u8


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
