"""TeleaFill against cv2.inpaint on real photographs and random masks."""
from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from nodegraph.errors import NodeError
from nodegraph.nodes.fill import telea_fill_node
from tests.imaging import PHOTOS, as_image, as_mask, photo_array, random_masks, to_u8


@pytest.mark.parametrize("name", PHOTOS)
@pytest.mark.parametrize("method,flag", [("telea", cv2.INPAINT_TELEA), ("ns", cv2.INPAINT_NS)])
def test_fill_is_cv2_inpaint_exactly(name, method, flag):
    rgb = photo_array(name)
    masks = random_masks(*rgb.shape[:2], count=2, seed=len(name))
    out = telea_fill_node(as_image(rgb), as_mask(*masks), radius=5.0, method=method)
    assert out.shape == (2, 3, *rgb.shape[:2])
    for m, o in zip(masks, out):
        expected = cv2.cvtColor(cv2.inpaint(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), m, 5.0, flag), cv2.COLOR_BGR2RGB)
        assert np.array_equal(to_u8(o), expected)
        assert (to_u8(o)[m > 0] != rgb[m > 0]).any()  # something was filled


def test_outside_the_mask_the_floats_are_untouched():
    image = torch.rand(1, 3, 40, 50)
    mask = torch.zeros(1, 1, 40, 50)
    mask[..., 10:20, 15:30] = 1
    before = image.clone()
    out = telea_fill_node(image, mask)
    assert torch.equal(image, before)
    assert torch.equal(out[..., :10, :], image[..., :10, :])
    assert torch.equal(out * (1 - mask), image * (1 - mask))


def test_soft_mask_is_filled_at_and_above_one_half():
    rgb = photo_array()
    soft = np.zeros(rgb.shape[:2], np.uint8)
    soft[20:40, 20:40] = 128  # 128/255 >= 0.5: filled
    soft[50:60, 50:60] = 127  # below: kept
    out = to_u8(telea_fill_node(as_image(rgb), as_mask(soft))[0])
    hard = np.where(soft >= 128, 255, 0).astype(np.uint8)
    expected = cv2.cvtColor(cv2.inpaint(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), hard, 3, cv2.INPAINT_TELEA), cv2.COLOR_BGR2RGB)
    assert np.array_equal(out, expected)
    assert np.array_equal(out[50:60, 50:60], rgb[50:60, 50:60])


def test_mask_of_another_size_is_a_clear_error():
    with pytest.raises(NodeError, match=r"mask is 32x16 .* image is 64x48"):
        telea_fill_node(torch.rand(1, 3, 48, 64), torch.ones(1, 1, 16, 32))


def test_batch_sizes_broadcast_from_one_and_otherwise_fail():
    image = as_image(photo_array(), photo_array())
    assert telea_fill_node(image, torch.ones(1, 1, 85, 128) * 0).shape == (2, 3, 85, 128)
    with pytest.raises(NodeError, match="batch sizes differ"):
        telea_fill_node(image, torch.zeros(3, 1, 85, 128))
