"""ExpandCanvas, SliceForIPAdapter and Merge against fresh, plain re-implementations of seed
article 002's process_image, slice_image and merge_images (numpy + OpenCV on 8-bit BGR
images, as the article works)."""
from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from nodegraph.errors import NodeError
from nodegraph.nodes.outpaint import expand_canvas_node, merge, slice_for_ip_adapter
from tests.imaging import PHOTOS, as_image, photo_array, to_u8


# --------------------------------------------------------------------------- the article's functions

def article_process_image(bgr, fill=(0, 0, 0), offset=50, blur=500, grow=256, side="left", grey=50, limit=1024):
    """Grow a BGR canvas, mark the new area in a white-is-keep map, blur it, Telea-fill the new area.

    Returns (filled BGR canvas, blurred keep-map, hard new-area map), all uint8.
    """
    h, w = bgr.shape[:2]
    canvas_h = h + grow if side in ("top", "bottom") else h
    canvas_w = w + grow if side in ("left", "right") else w
    if canvas_h > limit:  # too tall: drop rows on the side away from the growth
        bgr = bgr[:limit] if side == "top" else bgr[canvas_h - limit:] if side == "bottom" else bgr
        canvas_h = limit
    if canvas_w > limit:
        bgr = bgr[:, :limit] if side == "left" else bgr[:, canvas_w - limit:] if side == "right" else bgr
        canvas_w = limit
    h, w = bgr.shape[:2]
    canvas = np.empty((canvas_h, canvas_w, 3), np.uint8)
    canvas[:, :] = fill
    keep = np.full((canvas_h, canvas_w), 255, np.uint8)
    new = np.zeros((canvas_h, canvas_w), np.uint8)
    if side == "left":
        canvas[:, grow:] = bgr[:, :limit - grow]
        keep[:, :grow + offset] = grey
        new[:, :grow] = 255
    elif side == "right":
        canvas[:, :w] = bgr
        keep[:, w - offset:] = grey
        new[:, w:] = 255
    elif side == "top":
        canvas[grow:, :] = bgr[:limit - grow, :]
        keep[:grow + offset, :] = grey
        new[:grow, :] = 255
    else:
        canvas[:h, :] = bgr
        keep[h - offset:, :] = grey
        new[h:, :] = 255
    k = blur if blur % 2 else blur + 1
    keep = cv2.GaussianBlur(keep, (k, k), 0)
    _, holes = cv2.threshold(new, 128, 255, cv2.THRESH_BINARY | cv2.THRESH_OTSU)
    return cv2.inpaint(canvas, holes, 3, cv2.INPAINT_TELEA), keep, new


def article_slice_image(image, cols=2, rows=3):
    """Squares of side min(w // cols, h // rows), row by row; a last one sticking out moves back in."""
    h, w = image.shape[:2]
    side = min(w // cols, h // rows)
    out = []
    for r in range(rows):
        for c in range(cols):
            x0, y0 = c * side, r * side
            x1, y1 = x0 + side, y0 + side
            if c == cols - 1 and x1 > w:
                x0, x1 = x0 - (x1 - w), w
            if r == rows - 1 and y1 > h:
                y0, y1 = y0 - (y1 - h), h
            out.append(image[y0:y1, x0:x1])
    return out


def article_merge_images(original, new, offset, side):
    """The panorama grown by offset pixels on one side, then the new tile flush with that edge."""
    h, w = original.shape[:2]
    if side in ("left", "right"):
        merged = np.zeros((h, w + offset, 3), np.uint8)
    else:
        merged = np.zeros((h + offset, w, 3), np.uint8)
    if side == "left":
        merged[:, offset:] = original
        merged[:, :new.shape[1]] = new
    elif side == "right":
        merged[:, :w] = original
        merged[:, w + offset - new.shape[1]:w + offset] = new
    elif side == "top":
        merged[offset:, :] = original
        merged[:new.shape[0], :] = new
    else:
        merged[:h, :] = original
        merged[h + offset - new.shape[0]:h + offset, :] = new
    return merged


# --------------------------------------------------------------------------- comparisons

CASES = [  # (direction, expand, max_size, offset, blur, grey, fill RGB); vertical cases use a portrait photo
    ("right", 64, 1024, 20, 31, 50, (0, 0, 0)),
    ("left", 48, 1024, 10, 50, 90, (127, 30, 200)),
    ("top", 30, 1024, 12, 21, 0, (255, 255, 255)),
    ("bottom", 40, 1024, 25, 8, 200, (10, 20, 30)),
    ("right", 64, 160, 20, 31, 50, (0, 0, 0)),      # 128 + 64 > 160: cropped on the left
    ("left", 64, 160, 30, 15, 50, (0, 0, 0)),       # cropped on the right
    ("top", 40, 150, 10, 15, 60, (0, 0, 0)),        # 128 + 40 > 150: cropped at the bottom
    ("bottom", 40, 150, 10, 15, 60, (0, 0, 0)),     # cropped at the top
    ("right", 96, 1024, 50, 500, 50, (0, 0, 0)),    # the article's defaults: kernel far wider than the image
]


@pytest.mark.parametrize("direction,expand,max_size,offset,blur,grey,fill", CASES)
def test_expand_canvas_is_process_image(direction, expand, max_size, offset, blur, grey, fill):
    rgb = photo_array()  # 128 x 85
    if direction in ("top", "bottom"):
        rgb = np.ascontiguousarray(rgb.transpose(1, 0, 2))  # 85 x 128
    bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    filled, keep, new = article_process_image(bgr, fill[::-1], offset, blur, expand, direction, grey, max_size)
    out = expand_canvas_node(as_image(rgb), direction=direction, expand_pixels=expand, max_size=max_size,
                             fill_color=fill, mask_offset=offset, blur_kernel=blur, inpaint_mask_color=grey)
    canvas, change, new_area = out["image"][0], out["change"][0, 0], out["new_area"][0, 0]
    assert canvas.shape[-2:] == keep.shape
    assert np.array_equal(to_u8(canvas), cv2.cvtColor(filled, cv2.COLOR_BGR2RGB))
    # polarity: the article's map is white = keep, so change = 1 - map / 255
    assert (change.numpy() - (1 - keep / 255.0)).__abs__().max() <= 1 / 255 + 1e-6
    assert np.array_equal(new_area.numpy(), new / 255.0)


def test_expand_canvas_batches_and_prefill_none():
    a, b = photo_array(), photo_array()[::-1].copy()
    out = expand_canvas_node(as_image(a, b), direction="right", expand_pixels=32, blur_kernel=9, mask_offset=8,
                             prefill="none", fill_color=(10, 200, 30))
    assert out["image"].shape == (2, 3, 85, 160)
    for i, rgb in enumerate((a, b)):
        filled, keep, _ = article_process_image(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), (30, 200, 10), 8, 9, 32, "right")
        assert np.abs(out["change"][i, 0].numpy() - (1 - keep / 255.0)).max() <= 1 / 255 + 1e-6
        assert np.array_equal(to_u8(out["image"][i])[:, :128], rgb)
    assert torch.equal(out["image"][:, :, :, 128:], torch.tensor([10, 200, 30.0]).view(1, 3, 1, 1).expand(2, 3, 85, 32) / 255)


def test_expand_canvas_keeps_original_floats_exactly():
    image = torch.rand(1, 3, 30, 40)
    out = expand_canvas_node(image, direction="top", expand_pixels=10, blur_kernel=5, mask_offset=3)
    assert torch.equal(out["image"][..., 10:, :], image)
    assert out["change"][..., 0, :].min() > 0.5 and out["change"][..., -1, :].max() < 0.01


def test_the_other_axis_is_never_cropped():
    # The article's code fails on an image wider than max_size grown upwards; here it is kept whole.
    out = expand_canvas_node(torch.rand(1, 3, 20, 50), direction="top", expand_pixels=10, max_size=40, blur_kernel=3)
    assert out["image"].shape == (1, 3, 30, 50)


def test_expand_larger_than_max_size_is_refused():
    with pytest.raises(NodeError, match="smaller than max_size"):
        expand_canvas_node(torch.rand(1, 3, 8, 8), expand_pixels=64, max_size=64)


@pytest.mark.parametrize("name", PHOTOS)
def test_slices_are_slice_image(name):
    rgb = photo_array(name)
    out = slice_for_ip_adapter(as_image(rgb))
    expected = article_slice_image(rgb)
    assert out.shape[0] == 6
    for got, want in zip(out, expected):
        assert np.array_equal(to_u8(got), want)


@pytest.mark.parametrize("cols,rows", [(3, 1), (1, 2), (4, 4)])
def test_slices_other_grids(cols, rows):
    rgb = photo_array()
    out = slice_for_ip_adapter(as_image(rgb, rgb[::-1].copy()), cols=cols, rows=rows)
    expected = article_slice_image(rgb, cols, rows) + article_slice_image(rgb[::-1].copy(), cols, rows)
    assert out.shape[0] == len(expected) == 2 * cols * rows
    for got, want in zip(out, expected):
        assert np.array_equal(to_u8(got), want)


def test_spread_slices_cover_the_whole_image():
    rgb = photo_array()  # 128 x 85: side = min(64, 28) = 28
    out = slice_for_ip_adapter(as_image(rgb), cols=2, rows=3, layout="spread")
    assert out.shape == (6, 3, 28, 28)
    assert np.array_equal(to_u8(out[0]), rgb[:28, :28])
    assert np.array_equal(to_u8(out[1]), rgb[:28, 100:])      # last column at the right edge
    assert np.array_equal(to_u8(out[5]), rgb[57:, 100:])      # last row at the bottom edge
    with pytest.raises(NodeError, match="too small"):
        slice_for_ip_adapter(torch.rand(1, 3, 2, 8), rows=3)


@pytest.mark.parametrize("direction", ["left", "right", "top", "bottom"])
@pytest.mark.parametrize("tile_len,offset", [(96, 32), (40, 40), (20, 30)])
def test_merge_is_merge_images(direction, tile_len, offset):
    rng = np.random.default_rng(tile_len + offset)
    panorama = photo_array()
    horizontal = direction in ("left", "right")
    shape = (85, tile_len, 3) if horizontal else (tile_len, 128, 3)
    tile = rng.integers(0, 256, shape, dtype=np.uint8)
    out = merge(as_image(panorama), as_image(tile), offset=offset, direction=direction)
    assert np.array_equal(to_u8(out[0]), article_merge_images(panorama, tile, offset, direction))


def test_merge_refuses_mismatched_tiles():
    with pytest.raises(NodeError, match="heights must match"):
        merge(torch.rand(1, 3, 20, 30), torch.rand(1, 3, 21, 10), offset=5, direction="right")
    with pytest.raises(NodeError, match="raise the offset"):
        merge(torch.rand(1, 3, 20, 30), torch.rand(1, 3, 20, 40), offset=5, direction="left")
