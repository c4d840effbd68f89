"""Mask nodes: blur, grow/shrink, invert, threshold, shapes, and conversions to and from images.

MASK is float32 (B, 1, H, W) in [0, 1] with 1 = repaint. Every
function here works per batch item and returns a new tensor.
"""
from __future__ import annotations

from nodegraph.lazy import lazy

from typing import Annotated, Literal

np = lazy("numpy")
torch = lazy("torch")
from pydantic import Field

from nodegraph.errors import NodeError
from nodegraph import node
from nodegraph.limits import current_limits
from nodegraph.sockets import IMAGE, MASK, Image, Mask

from ._pixels import check_image, check_mask, from_pil, from_uint8, to_pil, to_uint8
from .io import MAX_SIDE


# --------------------------------------------------------------------------- arithmetic

def odd_kernel(size: int) -> int:
    """OpenCV Gaussian kernels must be odd: an even size grows by one (as the outpainting article does)."""
    return size + 1 if size % 2 == 0 else size


def blur_mask(mask: torch.Tensor, radius: float = 4.0, method: str = "pil", kernel_size: int = 0) -> torch.Tensor:
    """Gaussian blur of each mask in the batch.

    ``method="pil"``: Pillow's ``ImageFilter.GaussianBlur(radius)`` on the 8-bit mask, exactly
    what diffusers' ``VaeImageProcessor.blur(mask, blur_factor=radius)`` does (the diffusers inpainting guide);
    the result has 8-bit levels.
    ``method="opencv"``: ``cv2.GaussianBlur`` on the 8-bit mask, as the outpainting article does
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
    """A (2r+1)-square kernel: every offset for "square", offsets with dy² + dx² <= r² for "disk",
    |dy| + |dx| <= r for "diamond" (a 3x3 cross applied r times, as ComfyUI's GrowMask with tapered corners)."""
    offsets = np.arange(-radius, radius + 1)
    if shape == "square":
        return np.ones((2 * radius + 1, 2 * radius + 1), np.uint8)
    yy, xx = np.meshgrid(offsets, offsets, indexing="ij")
    if shape == "diamond":
        return (np.abs(yy) + np.abs(xx) <= radius).astype(np.uint8)
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


def feather_mask(mask: torch.Tensor, left: int = 0, top: int = 0, right: int = 0, bottom: int = 0,
                 ramp: str = "linear") -> torch.Tensor:
    """The mask multiplied by linear ramps along its edges: over ``left`` columns, column k (from the edge,
    0-based) is scaled by (k + 1) / left; likewise for the other sides. Each width is capped at the mask's size.

    ``ramp="comfyui"`` indexes the right and bottom ramps as ComfyUI's FeatherMask does (step k scales the
    column ``-k``): the outermost column gets 2 / right rather than 1 / right, the ramp's last step lands on
    the first column instead, and likewise for rows. The sides are applied in ComfyUI's order (left, right,
    top, bottom), one multiplication per row or column, so results match it bit for bit."""
    out = check_mask(mask)[:, 0].clone()
    h, w = out.shape[-2:]
    left, right, top, bottom = min(left, w), min(right, w), min(top, h), min(bottom, h)
    shift = 0 if ramp == "comfyui" else 1  # column -(k + shift) gets step k
    for k in range(left):
        out[:, :, k] *= (k + 1.0) / left
    for k in range(right):
        out[:, :, -(k + shift)] *= (k + 1) / right
    for k in range(top):
        out[:, k, :] *= (k + 1) / top
    for k in range(bottom):
        out[:, -(k + shift), :] *= (k + 1) / bottom
    return out[:, None]


def invert_mask(mask: torch.Tensor) -> torch.Tensor:
    """1 - mask: repaint what was kept and keep what was repainted."""
    return 1.0 - check_mask(mask)


def threshold_mask(mask: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """1 where mask >= threshold, else 0 (diffusers' ``binarize`` at 0.5)."""
    mask = check_mask(mask)
    return (mask >= threshold).float()


def shape_problems(width: int, height: int, x: int, y: int, w: int, h: int) -> list[tuple[str, str]]:
    """(param, message) for a canvas that is too large or a box that misses the canvas entirely."""
    problems = []
    too_big = current_limits().pixels_problem(width, height)
    if too_big:
        problems.append(("width", f"the canvas: {too_big}"))
    if x >= width or y >= height or x + w <= 0 or y + h <= 0:
        problems.append(("x", f"the box at x={x}, y={y} of size {w}x{h} lies entirely outside the {width}x{height} "
                              "canvas, so the mask would be empty; move the box or resize it to overlap the canvas"))
    return problems


def shape_mask(width: int, height: int, shape: str, x: int, y: int, w: int, h: int,
               value: float = 1.0, invert: bool = False) -> torch.Tensor:
    """A (1, 1, height, width) mask: ``value`` inside a rectangle or ellipse, 0 outside (swapped with ``invert``).

    The box covers pixel columns x .. x+w-1 and rows y .. y+h-1, as ``cv2.rectangle`` filled
    from (x, y) to (x+w-1, y+h-1). The ellipse is the one inscribed in the box's outer edges:
    a pixel is inside when its centre is, so it never spills outside the box. Parts of the box
    beyond the canvas are clipped.
    """
    if shape == "rectangle":
        inside = torch.zeros(height, width, dtype=torch.bool)
        inside[max(y, 0):max(y + h, 0), max(x, 0):max(x + w, 0)] = True
    elif shape == "ellipse":
        cols = (torch.arange(width, dtype=torch.float64) + 0.5 - (x + w / 2)) / (w / 2)
        rows = (torch.arange(height, dtype=torch.float64) + 0.5 - (y + h / 2)) / (h / 2)
        inside = rows[:, None] ** 2 + cols[None, :] ** 2 <= 1
    else:
        raise ValueError(f"unknown shape {shape!r}")
    if invert:
        inside = ~inside
    return (inside.float() * value)[None, None]


# Pillow's convert("L") in fixed point: L = (R*19595 + G*38470 + B*7471 + 2^15) >> 16 on 8-bit levels.
_LUMA_WEIGHTS = (19595, 38470, 7471)


def image_to_mask(image: torch.Tensor, channel: str = "luminance") -> torch.Tensor:
    """(B, 1, H, W) mask from one channel of an image, or from its luma.

    "luminance" is Pillow's ``convert("L")`` (ITU-R 601-2) computed the way Pillow does, on the
    8-bit levels, so it equals what LoadMask reads from the same file; a colour channel is taken
    as it is, like ComfyUI's ImageToMask.
    """
    image = check_image(image)
    if channel != "luminance":
        return image[:, ("red", "green", "blue").index(channel)][:, None].clone()
    levels = (image.clamp(0, 1) * 255).round().to(torch.int32)
    luma = sum(levels[:, c] * weight for c, weight in enumerate(_LUMA_WEIGHTS))
    return ((luma + (1 << 15)) >> 16)[:, None].float() / 255.0


def mask_to_image(mask: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) grey image: the mask in all three channels (white = 1), like ComfyUI's MaskToImage."""
    return check_mask(mask).repeat(1, 3, 1, 1)


# --------------------------------------------------------------------------- nodes

@node("MaskBlur", version=1, category="mask", outputs={"mask": MASK},
      reference="PIL ImageFilter.GaussianBlur (diffusers VaeImageProcessor.blur) / cv2.GaussianBlur")
def mask_blur(
    mask: Mask,
    radius: Annotated[float, Field(ge=0, le=1024, description="Gaussian radius (sigma) in pixels; the blur_factor of diffusers' VaeImageProcessor.blur")] = 4.0,
    method: Annotated[Literal["pil", "opencv"], Field(description="pil: Pillow GaussianBlur (diffusers); opencv: cv2.GaussianBlur (the outpainting article); both on 8-bit levels")] = "pil",
    kernel_size: Annotated[int, Field(ge=0, le=4095, description="opencv only: kernel side in pixels (even sizes grow by one), sigma derived from it, as the outpainting article's blur_radius; 0 = use radius")] = 0,
) -> torch.Tensor:
    """Gaussian-blur a mask to feather its edge.

    method "pil" is Pillow's GaussianBlur with the given radius on the 8-bit mask, pixel for
    pixel what diffusers' `VaeImageProcessor.blur(mask, blur_factor=radius)` returns (the
    diffusers inpainting guide). method "opencv" is `cv2.GaussianBlur` on the 8-bit mask: with `kernel_size` it is
    the outpainting article's `cv2.GaussianBlur(mask, (k, k), 0)` (its `blur_radius`, even sizes
    grow by one); with `kernel_size` 0 the sigma is `radius`. Polarity is unchanged (1 = repaint).
    """
    return blur_mask(mask, radius, method, kernel_size)


@node("MaskGrow", version=1, category="mask", outputs={"mask": MASK},
      reference="grey-level dilation / erosion (cv2.dilate / cv2.erode) with an explicit disk or square")
def mask_grow(
    mask: Mask,
    pixels: Annotated[int, Field(ge=-1024, le=1024, description="grow by this many pixels; negative shrinks")] = 8,
    shape: Annotated[Literal["disk", "square", "diamond"], Field(description="kernel shape: disk (dy²+dx² <= r²), square, or diamond (|dy|+|dx| <= r)")] = "disk",
) -> torch.Tensor:
    """Grow (dilate) or shrink (erode) the repaint area of a mask by a number of pixels.

    Positive `pixels` dilates: each pixel becomes the maximum of the mask within that distance
    (a disk, a square or a diamond); negative `pixels` erodes with the minimum. Pixels beyond the
    image border never count. Soft masks stay soft. Polarity is unchanged (1 = repaint).
    "diamond" and "square" equal ComfyUI's GrowMask with and without tapered corners (its 3x3
    cross or square applied |pixels| times).
    """
    return grow_mask(mask, pixels, shape)


_Ramp = Annotated[int, Field(ge=0, le=MAX_SIDE)]


@node("MaskFeather", version=1, category="mask", outputs={"mask": MASK},
      reference="ComfyUI FeatherMask (comfy_extras/nodes_mask.py)")
def mask_feather(
    mask: Mask,
    left: Annotated[_Ramp, Field(description="columns the mask fades in over from the left edge")] = 0,
    top: Annotated[_Ramp, Field(description="rows the mask fades in over from the top edge")] = 0,
    right: Annotated[_Ramp, Field(description="columns the mask fades in over from the right edge")] = 0,
    bottom: Annotated[_Ramp, Field(description="rows the mask fades in over from the bottom edge")] = 0,
    ramp: Annotated[Literal["linear", "comfyui"], Field(description="linear: symmetric ramps; comfyui: ComfyUI FeatherMask's indexing of the right and bottom ramps (off by one)")] = "linear",
) -> torch.Tensor:
    """Fade a mask towards its edges with linear ramps, as ComfyUI's FeatherMask.

    Over `left` columns from the left edge the mask is multiplied by 1/left, 2/left, ... 1 (outermost
    first); the other sides likewise, and corners get both factors. With `ramp` "comfyui" the right
    and bottom ramps are placed as ComfyUI places them: one step inwards, the outermost column getting
    2/right, and the first column (row) of the mask scaled by 1/right (1/bottom).
    """
    return feather_mask(mask, left, top, right, bottom, ramp)


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


def _check_shape(params: dict):
    if {"width", "height", "x", "y", "w", "h"} <= set(params):  # a linked one is checked at run time
        yield from shape_problems(*(params[k] for k in ("width", "height", "x", "y", "w", "h")))


_Coord = Annotated[int, Field(ge=-MAX_SIDE, le=MAX_SIDE)]
_Size = Annotated[int, Field(ge=1, le=MAX_SIDE)]


@node("MaskShape", version=1, category="mask", outputs={"mask": MASK}, check=_check_shape,
      reference="cv2.rectangle / cv2.ellipse, filled (thickness=-1)")
def mask_shape(
    width: Annotated[_Size, Field(description="canvas width in pixels")] = 512,
    height: Annotated[_Size, Field(description="canvas height in pixels")] = 512,
    shape: Annotated[Literal["rectangle", "ellipse"], Field(description="a filled rectangle, or the ellipse inscribed in the box")] = "rectangle",
    x: Annotated[_Coord, Field(description="left edge of the box (may be negative: the box is clipped)")] = 128,
    y: Annotated[_Coord, Field(description="top edge of the box (may be negative: the box is clipped)")] = 128,
    w: Annotated[_Size, Field(description="box width in pixels")] = 256,
    h: Annotated[_Size, Field(description="box height in pixels")] = 256,
    value: Annotated[float, Field(ge=0, le=1, description="mask value inside the shape (1 = repaint)")] = 1.0,
    invert: Annotated[bool, Field(description="swap: the shape is kept (0) and everything else gets value")] = False,
) -> torch.Tensor:
    """Draw a filled rectangle or ellipse as a mask on a blank canvas.

    The box is x, y, w, h in pixels: columns x .. x+w-1, rows y .. y+h-1, the pixels
    `cv2.rectangle` fills from (x, y) to (x+w-1, y+h-1). The ellipse is inscribed in the box:
    a pixel belongs to it when its centre does, so it matches `cv2.ellipse` (filled) up to
    its boundary pixels and never spills outside the box. Parts outside the canvas are
    clipped; a box entirely outside, or a canvas over 2^27 pixels, is refused at validation.
    The edge is hard; feather it with MaskBlur. The result is one mask (batch 1), `value` in
    the shape and 0 elsewhere (the other way round with `invert`).
    """
    for _, message in shape_problems(width, height, x, y, w, h):
        raise NodeError(message)
    return shape_mask(width, height, shape, x, y, w, h, value, invert)


@node("ImageToMask", version=1, category="mask", outputs={"mask": MASK},
      reference="PIL.Image.convert('L') (as LoadMask) / ComfyUI ImageToMask (one channel)")
def image_to_mask_node(
    image: Image,
    channel: Annotated[Literal["luminance", "red", "green", "blue"], Field(description="luminance: Pillow's ITU-R 601-2 luma on 8-bit levels, white = 1; or one colour channel as it is")] = "luminance",
) -> torch.Tensor:
    """Turn an image into a mask: its luma, or one of its colour channels.

    luminance is exactly Pillow's `convert("L")` (ITU-R 601-2 luma, computed on the 8-bit
    levels as Pillow does), so LoadImage -> ImageToMask gives what LoadMask gives for the same
    file. red, green and blue take that channel unchanged, as ComfyUI's ImageToMask does.
    White (1) is repaint.
    """
    return image_to_mask(image, channel)


@node("MaskToImage", version=1, category="mask", outputs={"image": IMAGE},
      reference="ComfyUI MaskToImage (the mask repeated into 3 channels)")
def mask_to_image_node(mask: Mask) -> torch.Tensor:
    """Turn a mask into a grey image (the mask in R, G and B), to view it or use it with image nodes.

    White is 1 (repaint), black 0 (keep). SaveImage of the result writes the same levels as
    SaveMask, in an RGB file.
    """
    return mask_to_image(mask)
