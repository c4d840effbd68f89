"""workflows/outpaint_differential_sdxl.json end to end on tiny SDXL + IP-Adapter components."""
from pathlib import Path

import numpy as np
import pytest
import torch

from nodegraph.api import Engine
from tests.tiny_ipadapter import build_tiny_ipadapters
from tests.tiny_sdxl import build_tiny_sdxl_set

REPO = Path(__file__).resolve().parent.parent
WORKFLOW = REPO / "workflows" / "outpaint_differential_sdxl.json"
SIZE, PIXELS, OFFSET = 64, 16, 4


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from diffusers import UNet2DConditionModel

    sdxl = build_tiny_sdxl_set()
    unet = UNet2DConditionModel.from_pretrained(str(sdxl.base / "unet"))
    adapters = build_tiny_ipadapters(tmp_path_factory.mktemp("ip"), unet)
    return sdxl.base, adapters


def overrides(models, repeat):
    base, adapters = models
    return {
        "ckpt.path": str(base),
        "ipadapter.path": str(adapters.plus),  # the outpainting article uses ip-adapter-plus_sdxl
        "ipadapter.image_encoder": str(adapters.encoder),
        "size.value": SIZE,
        "pixels.value": PIXELS,
        "expand.repeat": repeat,
        "group:widen/sample.steps": 2,
        "group:widen/canvas.blur_kernel": 9,
        "group:widen/canvas.mask_offset": OFFSET,
    }


def test_panorama_grows_and_keeps_the_photo(models, tmp_path):
    engine = Engine()
    targets = ["resize", "square[1]/canvas", "save"]
    result = engine.run(WORKFLOW, overrides=overrides(models, 2), out_dir=tmp_path, targets=targets)
    assert result.status["expand[2]/merge"] == "ran"
    assert result.status["save"] == "ran" and len(result.files) == 1

    from PIL import Image

    with Image.open(result.files[0]) as saved:
        assert saved.size == (SIZE + 2 * PIXELS, SIZE)  # squared to 64, then widened twice by 16
    photo = result.outputs["resize"]["image"]  # the photo at its working size, 48 x 64
    assert tuple(photo.shape[-2:]) == (SIZE, 48)
    change = result.outputs["square[1]/canvas"]["change"][0, 0]
    kept = (change == 0).all(dim=0)  # columns the change map leaves alone
    keep_columns = int(kept.long().cumprod(0).sum())
    assert 0 < keep_columns < 48
    with Image.open(result.files[0]) as saved:
        panorama = torch.from_numpy(np.array(saved.convert("RGB"))).permute(2, 0, 1)
    expected = (photo[0, :, :, :keep_columns] * 255).round().to(torch.uint8)
    assert torch.equal(panorama[:, :, :keep_columns], expected)
    assert not torch.equal(panorama[:, :, 48:], torch.zeros_like(panorama[:, :, 48:]))


def test_raising_repeat_reuses_the_cached_expansions(models, tmp_path):
    engine = Engine()
    engine.run(WORKFLOW, overrides=overrides(models, 2), out_dir=tmp_path)
    result = engine.run(WORKFLOW, overrides=overrides(models, 3), out_dir=tmp_path)
    ran = result.ran()
    assert {"expand[3]/sample", "expand[3]/merge", "save"} <= ran
    assert not any(node.startswith(("square[", "expand[1]", "expand[2]")) for node in ran), sorted(ran)
    assert result.status["expand[2]/merge"] == "cached"
    assert "ckpt" not in ran and "positive" not in ran


def test_workflow_mistakes_are_caught_at_validation(models):
    engine = Engine()
    issues = engine.validate(WORKFLOW, overrides={**overrides(models, 0), "ipadapter.image_encoder": "no/such/folder"})
    found = {(i.code, i.node_id, i.field) for i in issues}
    assert ("bad_repeat", "expand", "repeat") in found
    # a relative value of a model param is a path or a name in clip_vision/: found as neither, a missing model
    assert ("missing_model", "ipadapter", "image_encoder") in found
