"""Mask nodes against independent references: Pillow / OpenCV blur, a naive dilation, binarize."""
from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from nodegraph.nodes.mask import mask_blur, mask_grow, mask_invert, mask_threshold
from tests.imaging import as_mask, random_masks, to_u8

H, W = 48, 64


@pytest.mark.parametrize("soft", [False, True])
@pytest.mark.parametrize("radius", [1.5, 4, 12])
def test_pil_blur_is_diffusers_blur(radius, soft):
    from diffusers.image_processor import VaeImageProcessor

    masks = random_masks(H, W, 3, seed=int(radius * 10) + soft, soft=soft)
    out = mask_blur(as_mask(*masks), radius=radius, method="pil")
    assert out.shape == (3, 1, H, W)
    for m, o in zip(masks, out):
        expected = np.asarray(VaeImageProcessor.blur(Image.fromarray(m), blur_factor=radius))
        assert np.abs(to_u8(o).astype(int) - expected).max() <= 1
        assert np.array_equal(to_u8(o), expected)  # in fact exact: same 8-bit Pillow filter


@pytest.mark.parametrize("kernel", [5, 10, 31])
def test_opencv_kernel_blur_is_the_seed_blur(kernel):
    masks = random_masks(H, W, 2, seed=kernel)
    out = mask_blur(as_mask(*masks), method="opencv", kernel_size=kernel)
    k = kernel + 1 if kernel % 2 == 0 else kernel  # the outpainting article bumps even sizes
    for m, o in zip(masks, out):
        expected = cv2.GaussianBlur(m, (k, k), 0)
        assert np.abs(o[0].numpy() * 255 - expected).max() <= 1.0
        assert np.array_equal(to_u8(o), expected)  # exact: the same 8-bit OpenCV blur


def test_opencv_sigma_blur():
    m = random_masks(H, W, 1, seed=3)[0]
    out = mask_blur(as_mask(m), radius=3.0, method="opencv")
    expected = cv2.GaussianBlur(m, (0, 0), 3.0)
    assert np.abs(out[0, 0].numpy() * 255 - expected).max() <= 1.0


def test_blur_changes_an_edge_and_leaves_input_alone():
    m = as_mask(random_masks(H, W, 1, seed=5)[0])
    before = m.clone()
    out = mask_blur(m, radius=4)
    assert torch.equal(m, before)
    assert ((out > 0) & (out < 1)).any()
    assert torch.equal(mask_blur(m, radius=0), m)


def naive_grow(m: np.ndarray, r: int, disk: bool, grow: bool) -> np.ndarray:
    """Max (or min) over every offset within distance r, ignoring pixels beyond the border."""
    h, w = m.shape
    fill = -np.inf if grow else np.inf
    padded = np.full((h + 2 * r, w + 2 * r), fill)
    padded[r:r + h, r:r + w] = m
    out = np.full((h, w), fill)
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            if disk and dy * dy + dx * dx > r * r:
                continue
            shifted = padded[r + dy:r + dy + h, r + dx:r + dx + w]
            out = np.maximum(out, shifted) if grow else np.minimum(out, shifted)
    return out


@pytest.mark.parametrize("pixels", [3, -3, 6])
@pytest.mark.parametrize("shape", ["disk", "square"])
def test_grow_matches_naive_dilation(pixels, shape):
    masks = random_masks(H, W, 2, seed=pixels + 10, soft=True)
    out = mask_grow(as_mask(*masks), pixels=pixels, shape=shape)
    for m, o in zip(masks, out):
        expected = naive_grow(m.astype(np.float64) / 255, abs(pixels), shape == "disk", pixels > 0)
        assert np.abs(o[0].numpy() - expected).max() < 1e-6
    assert torch.equal(mask_grow(as_mask(*masks), pixels=0), as_mask(*masks))


def test_grow_really_grows_and_shrinks():
    m = torch.zeros(1, 1, 21, 21)
    m[..., 8:13, 8:13] = 1
    assert mask_grow(m, pixels=2, shape="square").sum() == 81
    assert mask_grow(m, pixels=-1, shape="square").sum() == 9


def test_invert_and_threshold():
    masks = as_mask(*random_masks(H, W, 2, seed=7, soft=True))
    assert torch.allclose(mask_invert(masks), 1 - masks)
    from diffusers.image_processor import VaeImageProcessor

    expected = VaeImageProcessor.binarize(None, masks.clone())
    assert torch.equal(mask_threshold(masks, threshold=0.5), expected)
    high = mask_threshold(masks, threshold=0.9)
    assert torch.equal(high, (masks >= 0.9).float()) and high.sum() < expected.sum()


def test_mask_shape_errors_are_clear():
    from nodegraph.errors import NodeError

    with pytest.raises(NodeError, match="MASK tensor of shape"):
        mask_blur(torch.zeros(1, 3, 8, 8))
    with pytest.raises(NodeError, match="empty"):
        mask_invert(torch.zeros(1, 1, 0, 8))
