"""CropToMask, PasteCrop and Overlay against diffusers' get_crop_region, preprocess(resize_mode="fill")
and apply_overlay, on real photographs and random masks."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from nodegraph.errors import NodeError
from nodegraph.nodes.crop import CropRegion, crop_region, crop_to_mask_node, overlay_node, paste_crop
from tests.imaging import PHOTOS, as_image, as_mask, photo_array, random_masks, to_u8


@pytest.fixture(scope="module")
def processors():
    from diffusers.image_processor import VaeImageProcessor

    image = VaeImageProcessor(vae_scale_factor=8)
    mask = VaeImageProcessor(vae_scale_factor=8, do_normalize=False, do_binarize=True, do_convert_grayscale=True)
    soft_mask = VaeImageProcessor(vae_scale_factor=8, do_normalize=False, do_convert_grayscale=True)
    return image, mask, soft_mask


def edge_masks(h: int, w: int) -> list[np.ndarray]:
    """Masks that push the region against each border and into thin shapes."""
    shapes = []
    for box in [(0, 0, 3, h), (w - 2, 0, w, 5), (0, h - 1, w, h), (10, 10, 11, 11), (0, 0, w, h), (5, 2, 60, 9)]:
        m = np.zeros((h, w), np.uint8)
        x1, y1, x2, y2 = box
        m[y1:y2, x1:x2] = 255
        shapes.append(m)
    return shapes


@pytest.mark.parametrize("width,height", [(512, 512), (64, 32), (32, 64), (96, 40), (8, 200)])
@pytest.mark.parametrize("pad", [0, 7, 32])
def test_region_is_get_crop_region(processors, width, height, pad):
    h, w = 85, 128
    masks = random_masks(h, w, 12, seed=width + height + pad, soft=True) + edge_masks(h, w)
    for m in masks:
        expected = processors[1].get_crop_region(Image.fromarray(m), width, height, pad=pad)
        assert crop_region(m, width, height, pad) == tuple(expected)


@pytest.mark.parametrize("name", PHOTOS)
def test_crop_pixels_are_the_pipeline_preprocessing(processors, name):
    image_proc, mask_proc, soft_proc = processors
    rgb = photo_array(name)
    masks = random_masks(*rgb.shape[:2], count=2, seed=len(name), soft=True)
    out = crop_to_mask_node(as_image(rgb), as_mask(*masks), padding=6, width=64, height=48)
    assert out["image"].shape == (2, 3, 48, 64) and out["mask"].shape == (2, 1, 48, 64)
    for i, m in enumerate(masks):
        box = processors[1].get_crop_region(Image.fromarray(m), 64, 48, pad=6)
        assert out["region"].boxes[i] == tuple(box)
        want = image_proc.preprocess(Image.fromarray(rgb), height=48, width=64, crops_coords=box, resize_mode="fill")
        assert torch.allclose(out["image"][i], (want[0] + 1) / 2, atol=1e-6)
        hard = mask_proc.preprocess(Image.fromarray(m), height=48, width=64, crops_coords=box, resize_mode="fill")
        assert torch.equal((out["mask"][i] >= 0.5).float(), hard[0])
        soft = soft_proc.preprocess(Image.fromarray(m), height=48, width=64, crops_coords=box, resize_mode="fill")
        assert torch.allclose(out["mask"][i], soft[0], atol=1e-6)


def test_empty_mask_is_a_clear_error():
    with pytest.raises(NodeError, match="mask is empty"):
        crop_to_mask_node(torch.rand(1, 3, 16, 16), torch.zeros(1, 1, 16, 16), width=16, height=16)


def apply_overlay(mask: np.ndarray, init: np.ndarray, image: np.ndarray, box=None) -> np.ndarray:
    from diffusers.image_processor import VaeImageProcessor

    out = VaeImageProcessor().apply_overlay(Image.fromarray(mask), Image.fromarray(init), Image.fromarray(image), box)
    return np.asarray(out)


@pytest.mark.parametrize("name", PHOTOS)
def test_overlay_is_apply_overlay_for_hard_masks(name):
    rgb = photo_array(name)
    rng = np.random.default_rng(1)
    new = rng.integers(0, 256, rgb.shape, dtype=np.uint8)
    masks = random_masks(*rgb.shape[:2], count=3, seed=3)
    out = overlay_node(as_image(rgb), as_image(new), as_mask(*masks))
    assert out.shape[0] == 3
    for m, o in zip(masks, out):
        assert np.array_equal(to_u8(o), apply_overlay(m, rgb, new))


def test_overlay_soft_masks_within_one_level_of_apply_overlay():
    rgb = photo_array()
    new = np.random.default_rng(2).integers(0, 256, rgb.shape, dtype=np.uint8)
    masks = random_masks(*rgb.shape[:2], count=4, seed=4, soft=True)
    out = overlay_node(as_image(rgb), as_image(new), as_mask(*masks))
    for m, o in zip(masks, out):
        expected = apply_overlay(m, rgb, new)
        assert np.abs(to_u8(o).astype(int) - expected).max() <= 1
        # and it is the exact float blend of the two
        a = m[..., None] / 255.0
        assert np.allclose(o.permute(1, 2, 0).numpy(), rgb / 255.0 * (1 - a) + new / 255.0 * a, atol=1e-6)


def test_outside_the_mask_the_original_floats_survive():
    original, new = torch.rand(2, 3, 32, 40), torch.rand(2, 3, 32, 40)
    mask = as_mask(*random_masks(32, 40, 2, seed=9, soft=True))
    out = overlay_node(original, new, mask)
    keep = (mask == 0).expand_as(original)
    assert torch.equal(out[keep], original[keep])
    assert not torch.equal(out, original)


@pytest.mark.parametrize("name", PHOTOS)
def test_paste_crop_is_apply_overlay_with_crop_coords(name):
    rgb = photo_array(name)
    masks = random_masks(*rgb.shape[:2], count=2, seed=11)
    crop = crop_to_mask_node(as_image(rgb), as_mask(*masks), padding=4, width=48, height=48)
    processed = np.random.default_rng(5).integers(0, 256, (2, 48, 48, 3), dtype=np.uint8)
    out = paste_crop(as_image(rgb), as_image(*processed), as_mask(*masks), crop["region"])
    via_overlay = overlay_node(as_image(rgb), as_image(*processed), as_mask(*masks), crop["region"])
    assert torch.equal(out, via_overlay)
    for i, m in enumerate(masks):
        expected = apply_overlay(m, rgb, processed[i], crop["region"].boxes[i])
        assert np.array_equal(to_u8(out[i]), expected)
        assert np.array_equal(to_u8(out[i])[m == 0], rgb[m == 0])


def test_overlay_size_errors():
    with pytest.raises(NodeError, match="image is 20x10"):
        overlay_node(torch.rand(1, 3, 16, 16), torch.rand(1, 3, 10, 20), torch.zeros(1, 1, 16, 16))
    with pytest.raises(NodeError, match="mask is 8x8"):
        overlay_node(torch.rand(1, 3, 16, 16), torch.rand(1, 3, 16, 16), torch.zeros(1, 1, 8, 8))
    region = CropRegion(((0, 0, 8, 8),), 32, 32)
    with pytest.raises(NodeError, match="crop region was made on a 32x32 image"):
        paste_crop(torch.rand(1, 3, 16, 16), torch.rand(1, 3, 8, 8), torch.zeros(1, 1, 16, 16), region)


def test_region_survives_the_disk_cache_format():
    from nodegraph.serialize import flatten, unflatten

    region = CropRegion(((1, 2, 30, 40), (0, 0, 8, 8)), 64, 48)
    structure, tensors = flatten({"region": region})
    assert unflatten(structure, tensors)["region"] == region
