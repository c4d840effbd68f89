"""Mask nodes: blur, grow/shrink, invert, threshold.

MASK is float32 (B, 1, H, W) in [0, 1] with 1 = repaint (DESIGN §2). Every
function here works per batch item and returns a new tensor.
"""
from __future__ import annotations

from typing import Annotated, Literal

import numpy as np
import torch
from pydantic import Field

from nodegraph.node import node
from nodegraph.sockets import MASK, Mask

from ._pixels import check_mask, from_pil, from_uint8, to_pil, to_uint8


# --------------------------------------------------------------------------- arithmetic

def odd_kernel(size: int) -> int:
    """OpenCV Gaussian kernels must be odd: an even size grows by one (as seed article 002 does)."""
    return size + 1 if size % 2 == 0 else size


def blur_mask(mask: torch.Tensor, radius: float = 4.0, method: str = "pil", kernel_size: int = 0) -> torch.Tensor:
    """Gaussian blur of each mask in the batch.

    ``method="pil"``: Pillow's ``ImageFilter.GaussianBlur(radius)`` on the 8-bit mask, exactly
    what diffusers' ``VaeImageProcessor.blur(mask, blur_factor=radius)`` does (seed article 001);
    the result has 8-bit levels.
    ``method="opencv"``: ``cv2.GaussianBlur`` on the 8-bit mask, as seed article 002 does
    (OpenCV's 8-bit path is fixed-point and can differ from the exact float blur by up to
    ~2 levels; matching the article matters more here). With ``kernel_size > 0`` the kernel
    is ``kernel_size`` square (even sizes grow by one) and the sigma follows from it, as in
    the article's ``blur_radius``; with ``kernel_size = 0`` the sigma is ``radius``.
    """
    mask = check_mask(mask)
    if method == "pil":
        if radius == 0:
            return mask.clone()
        from PIL import ImageFilter

        blurred = [from_pil(to_pil(m).filter(ImageFilter.GaussianBlur(radius))) for m in mask]
        return torch.cat(blurred).to(mask.device)
    if method != "opencv":
        raise ValueError(f"unknown blur method {method!r}")
    import cv2

    if kernel_size > 0:
        k = odd_kernel(kernel_size)
        ksize, sigma = (k, k), 0.0
    elif radius > 0:
        ksize, sigma = (0, 0), float(radius)
    else:
        return mask.clone()
    levels = to_uint8(mask)[..., 0]
    return from_uint8(np.stack([cv2.GaussianBlur(m, ksize, sigma) for m in levels])[..., None], mask.device)


def structuring_element(radius: int, shape: str) -> np.ndarray:
    """A (2r+1)-square kernel: every offset for "square", offsets with dy² + dx² <= r² for "disk"."""
    offsets = np.arange(-radius, radius + 1)
    if shape == "square":
        return np.ones((2 * radius + 1, 2 * radius + 1), np.uint8)
    yy, xx = np.meshgrid(offsets, offsets, indexing="ij")
    return (yy * yy + xx * xx <= radius * radius).astype(np.uint8)


def grow_mask(mask: torch.Tensor, pixels: int, shape: str = "disk") -> torch.Tensor:
    """Grey-level dilation (``pixels`` > 0) or erosion (< 0) by a disk or square of radius |pixels|.

    Each output pixel is the max (dilate) or min (erode) of the mask over the kernel placed on
    it; pixels outside the image never count. Soft masks stay soft.
    """
    mask = check_mask(mask)
    if pixels == 0:
        return mask.clone()
    import cv2

    kernel = structuring_element(abs(pixels), shape)
    op = cv2.dilate if pixels > 0 else cv2.erode
    array = mask[:, 0].detach().cpu().numpy().astype(np.float32)
    out = np.stack([op(m, kernel) for m in array])
    return torch.from_numpy(out)[:, None].to(mask.device)


def invert_mask(mask: torch.Tensor) -> torch.Tensor:
    """1 - mask: repaint what was kept and keep what was repainted."""
    return 1.0 - check_mask(mask)


def threshold_mask(mask: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """1 where mask >= threshold, else 0 (diffusers' ``binarize`` at 0.5)."""
    mask = check_mask(mask)
    return (mask >= threshold).float()


# --------------------------------------------------------------------------- nodes

@node("MaskBlur", version=1, category="mask", outputs={"mask": MASK},
      reference="PIL ImageFilter.GaussianBlur (diffusers VaeImageProcessor.blur) / cv2.GaussianBlur")
def mask_blur(
    mask: Mask,
    radius: Annotated[float, Field(ge=0, le=1024, description="Gaussian radius (sigma) in pixels; the blur_factor of diffusers' VaeImageProcessor.blur")] = 4.0,
    method: Annotated[Literal["pil", "opencv"], Field(description="pil: Pillow GaussianBlur (diffusers); opencv: cv2.GaussianBlur (seed article 002); both on 8-bit levels")] = "pil",
    kernel_size: Annotated[int, Field(ge=0, le=4095, description="opencv only: kernel side in pixels (even sizes grow by one), sigma derived from it, as seed article 002's blur_radius; 0 = use radius")] = 0,
) -> torch.Tensor:
    """Gaussian-blur a mask to feather its edge.

    method "pil" is Pillow's GaussianBlur with the given radius on the 8-bit mask, pixel for
    pixel what diffusers' `VaeImageProcessor.blur(mask, blur_factor=radius)` returns (seed
    article 001). method "opencv" is `cv2.GaussianBlur` on the 8-bit mask: with `kernel_size` it is
    seed article 002's `cv2.GaussianBlur(mask, (k, k), 0)` (its `blur_radius`, even sizes
    grow by one); with `kernel_size` 0 the sigma is `radius`. Polarity is unchanged (1 = repaint).
    """
    return blur_mask(mask, radius, method, kernel_size)


@node("MaskGrow", version=1, category="mask", outputs={"mask": MASK},
      reference="grey-level dilation / erosion (cv2.dilate / cv2.erode) with an explicit disk or square")
def mask_grow(
    mask: Mask,
    pixels: Annotated[int, Field(ge=-1024, le=1024, description="grow by this many pixels; negative shrinks")] = 8,
    shape: Annotated[Literal["disk", "square"], Field(description="kernel shape: disk (dy²+dx² <= r²) or square")] = "disk",
) -> torch.Tensor:
    """Grow (dilate) or shrink (erode) the repaint area of a mask by a number of pixels.

    Positive `pixels` dilates: each pixel becomes the maximum of the mask within that distance
    (a disk, or a square); negative `pixels` erodes with the minimum. Pixels beyond the image
    border never count. Soft masks stay soft. Polarity is unchanged (1 = repaint).
    """
    return grow_mask(mask, pixels, shape)


@node("MaskInvert", version=1, category="mask", outputs={"mask": MASK}, reference="1 - mask")
def mask_invert(mask: Mask) -> torch.Tensor:
    """Invert a mask: repaint what was kept, keep what was repainted (1 - mask)."""
    return invert_mask(mask)


@node("MaskThreshold", version=1, category="mask", outputs={"mask": MASK},
      reference="diffusers VaeImageProcessor.binarize (threshold 0.5)")
def mask_threshold(
    mask: Mask,
    threshold: Annotated[float, Field(ge=0, le=1, description="pixels at or above this become 1, the rest 0")] = 0.5,
) -> torch.Tensor:
    """Make a hard mask: 1 where the mask is at or above the threshold, 0 elsewhere.

    At the default 0.5 this is diffusers' `VaeImageProcessor.binarize`.
    """
    return threshold_mask(mask, threshold)
