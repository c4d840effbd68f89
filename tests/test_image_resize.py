"""ImageResize / MaskResize / ImageGrid / ImageBatch against Pillow, OpenCV, the outpainting article's image_resize
and diffusers' make_image_grid."""
from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from nodegraph.errors import NodeError
from nodegraph.nodes.image import image_batch, image_grid_node, image_resize, mask_resize, target_size
from tests.imaging import PHOTOS, as_image, as_mask, photo_array, random_masks, to_u8


def seed_image_resize(image: np.ndarray, new_size: int) -> np.ndarray:
    """The outpainting article's image_resize, written out again: long side to new_size, Lanczos-4."""
    height, width = image.shape[:2]
    ratio = width / height
    new_w = new_h = new_size
    if ratio != 1:
        if width > height:
            new_h = int(new_size / ratio)
        else:
            new_w = int(new_size * ratio)
    return cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LANCZOS4)


@pytest.mark.parametrize("name", PHOTOS)
@pytest.mark.parametrize("size", [50, 77, 160])
def test_long_side_opencv_lanczos_is_the_seed_image_resize(name, size):
    rgb = photo_array(name)
    out = image_resize(as_image(rgb), long_side=size, backend="opencv", resample="lanczos")
    assert np.array_equal(to_u8(out[0]), seed_image_resize(rgb, size))


def test_portrait_long_side_is_the_seed_image_resize():
    rgb = np.ascontiguousarray(photo_array().transpose(1, 0, 2))  # 85 wide, 128 tall
    out = image_resize(as_image(rgb), long_side=100, backend="opencv")
    assert np.array_equal(to_u8(out[0]), seed_image_resize(rgb, 100))


@pytest.mark.parametrize("resample,pil_filter", [
    ("lanczos", Image.Resampling.LANCZOS), ("bicubic", Image.Resampling.BICUBIC),
    ("bilinear", Image.Resampling.BILINEAR), ("nearest", Image.Resampling.NEAREST), ("area", Image.Resampling.BOX)])
def test_pil_backend_is_pillow_resize(resample, pil_filter):
    rgb = photo_array("astronaut_96.png")
    out = image_resize(as_image(rgb, rgb[::-1].copy()), width=61, height=40, keep_aspect=False, resample=resample)
    assert out.shape == (2, 3, 40, 61)
    assert np.array_equal(to_u8(out[0]), np.asarray(Image.fromarray(rgb).resize((61, 40), pil_filter)))
    assert np.array_equal(to_u8(out[1]), np.asarray(Image.fromarray(rgb[::-1].copy()).resize((61, 40), pil_filter)))


def test_sizes_keep_aspect_fit_and_snap():
    assert target_size(128, 85, width=64) == (64, 42)
    assert target_size(128, 85, height=40) == (60, 40)
    assert target_size(128, 85, width=64, keep_aspect=False) == (64, 85)
    assert target_size(128, 85, width=100, height=100) == (100, 66)        # fits inside the box
    assert target_size(128, 85, width=100, height=50) == (75, 50)
    assert target_size(128, 85, width=100, height=50, keep_aspect=False) == (100, 50)
    assert target_size(640, 427, long_side=1024) == (1024, 683)
    assert target_size(640, 427, long_side=1024, multiple_of=8) == (1024, 680)
    assert target_size(5, 3, width=4, multiple_of=8) == (8, 8)
    with pytest.raises(NodeError, match="give width, height or long_side"):
        target_size(10, 10)
    with pytest.raises(NodeError, match="limit"):
        target_size(10, 1, width=20000)


def test_mask_resize_matches_pillow_on_the_mask():
    m = random_masks(48, 64, 1, seed=2, soft=True)[0]
    out = mask_resize(as_mask(m), width=32, resample="nearest")
    assert out.shape == (1, 1, 24, 32)
    assert np.array_equal(to_u8(out[0]), np.asarray(Image.fromarray(m).resize((32, 24), Image.Resampling.NEAREST)))


def test_grid_is_diffusers_make_image_grid():
    from diffusers.utils import make_image_grid

    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, (20, 30, 3), dtype=np.uint8) for _ in range(6)]
    grid = image_grid_node(as_image(*arrays), rows=2, cols=3)
    expected = np.asarray(make_image_grid([Image.fromarray(a) for a in arrays], rows=2, cols=3))
    assert grid.shape == (1, 3, 40, 90)
    assert np.array_equal(to_u8(grid[0]), expected)


def test_grid_auto_shape_and_empty_cells_black():
    images = torch.rand(5, 3, 8, 10) * 0.5 + 0.5
    grid = image_grid_node(images)  # 5 images -> 3 columns, 2 rows
    assert grid.shape == (1, 3, 16, 30)
    assert torch.equal(grid[0, :, 8:, 20:], torch.zeros(3, 8, 10))
    assert torch.equal(grid[0, :, 8:, 10:20], images[4])
    assert image_grid_node(images, cols=1).shape == (1, 3, 40, 10)
    with pytest.raises(NodeError, match="holds 4 images but the batch has 5"):
        image_grid_node(images, rows=2, cols=2)


def test_batch_joins_and_refuses_other_sizes():
    a, b = torch.rand(2, 3, 8, 8), torch.rand(1, 3, 8, 8)
    assert torch.equal(image_batch(a, b), torch.cat([a, b]))
    with pytest.raises(NodeError, match="resize one with ImageResize"):
        image_batch(a, torch.rand(1, 3, 8, 9))


def test_image_size_reports_width_and_height():
    from nodegraph.nodes.image import image_size

    assert image_size(torch.zeros(2, 3, 40, 72)) == (72, 40)
