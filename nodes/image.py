"""Image geometry nodes: resize (images and masks), batch, grid."""
from __future__ import annotations

from nodegraph.lazy import lazy

import math
from typing import Annotated, Literal

np = lazy("numpy")
torch = lazy("torch")
from pydantic import Field

from nodegraph.errors import NodeError
from nodegraph.limits import current_limits
from nodegraph import node
from nodegraph.sockets import IMAGE, INT, MASK, Image, Mask

from ._pixels import check_image, check_mask, from_uint8, size_text, to_uint8

MAX_SIDE = 16384
Filter = Literal["lanczos", "bicubic", "bilinear", "nearest", "area"]
Backend = Literal["pil", "opencv"]


# --------------------------------------------------------------------------- arithmetic

def target_size(src_w: int, src_h: int, width: int = 0, height: int = 0, long_side: int = 0,
                keep_aspect: bool = True, multiple_of: int = 1) -> tuple[int, int]:
    """The (width, height) an image of ``src_w`` x ``src_h`` is resized to.

    - ``long_side``: the long side becomes ``long_side``, the short one ``int(long_side / aspect)``
      (truncated, as the outpainting article's ``image_resize`` computes it).
    - ``width`` and ``height``: exactly that size, or with ``keep_aspect`` the largest size of the
      same aspect that fits inside (the constrained side exact, the other truncated).
    - only ``width`` (or only ``height``): the other side follows the aspect (truncated), or stays
      as it is without ``keep_aspect``.
    Then each side is rounded down to a multiple of ``multiple_of`` (at least one multiple),
    as diffusers rounds sizes down to the VAE factor.
    """
    aspect = src_w / src_h
    if long_side:
        if src_w == src_h:
            w, h = long_side, long_side
        elif src_w > src_h:
            w, h = long_side, int(long_side / aspect)
        else:
            w, h = int(long_side * aspect), long_side
    elif width and height:
        if not keep_aspect:
            w, h = width, height
        elif width / src_w <= height / src_h:
            w, h = width, int(width / aspect)
        else:
            w, h = int(height * aspect), height
    elif width:
        w, h = width, (int(width / aspect) if keep_aspect else src_h)
    elif height:
        w, h = (int(height * aspect) if keep_aspect else src_w), height
    else:
        raise NodeError("give width, height or long_side (all are 0)")
    w, h = max(1, w), max(1, h)
    if multiple_of > 1:
        w, h = (max(multiple_of, v - v % multiple_of) for v in (w, h))
    if w > MAX_SIDE or h > MAX_SIDE:
        raise NodeError(f"resizing to {w}x{h} exceeds the limit of {MAX_SIDE} px a side")
    return w, h


def resize_pixels(t: torch.Tensor, width: int, height: int, resample: str = "lanczos", backend: str = "pil") -> torch.Tensor:
    """Resize each (C, H, W) item of a batch (C = 3 image or 1 mask) on its 8-bit levels.

    ``pil``: ``PIL.Image.resize((w, h), resample)`` ("area" is Pillow's BOX filter).
    ``opencv``: ``cv2.resize(x, (w, h), interpolation)`` ("lanczos" is INTER_LANCZOS4, as in
    the outpainting article). Going through 8 bits is what both references do; results equal theirs.
    """
    if tuple(t.shape[-2:]) == (height, width):
        return t.clone()
    current_limits().check_pixels(width, height, t.shape[0], "the resized image")
    arrays = to_uint8(t)
    if backend == "pil":
        from PIL import Image as PILImage

        filters = {"lanczos": PILImage.Resampling.LANCZOS, "bicubic": PILImage.Resampling.BICUBIC,
                   "bilinear": PILImage.Resampling.BILINEAR, "nearest": PILImage.Resampling.NEAREST,
                   "area": PILImage.Resampling.BOX}
        out = [np.asarray(PILImage.fromarray(a[..., 0] if a.shape[-1] == 1 else a).resize((width, height), filters[resample]))
               for a in arrays]
    elif backend == "opencv":
        import cv2

        flags = {"lanczos": cv2.INTER_LANCZOS4, "bicubic": cv2.INTER_CUBIC, "bilinear": cv2.INTER_LINEAR,
                 "nearest": cv2.INTER_NEAREST, "area": cv2.INTER_AREA}
        out = [cv2.resize(a, (width, height), interpolation=flags[resample]) for a in arrays]
    else:
        raise ValueError(f"unknown resize backend {backend!r}")
    out = [o[..., None] if o.ndim == 2 else o for o in out]
    return from_uint8(np.stack(out), t.device)


def batch_images(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Concatenate two IMAGE batches of the same size."""
    a, b = check_image(a, "a"), check_image(b, "b")
    if a.shape[-2:] != b.shape[-2:]:
        raise NodeError(f"a is {size_text(a)} but b is {size_text(b)}; resize one with ImageResize first")
    current_limits().check_pixels(a.shape[-1], a.shape[-2], a.shape[0] + b.shape[0], "the joined batch")
    return torch.cat([a, b.to(a.device)])


def grid_shape(count: int, rows: int = 0, cols: int = 0) -> tuple[int, int]:
    """Rows and columns for ``count`` images; 0 means "as many as needed" (near square when both are 0)."""
    if rows and cols:
        if rows * cols < count:
            raise NodeError(f"a {rows} x {cols} grid holds {rows * cols} images but the batch has {count}; "
                            f"raise rows or cols, or set one of them to 0")
        return rows, cols
    if cols:
        return math.ceil(count / cols), cols
    if rows:
        return rows, math.ceil(count / rows)
    cols = math.ceil(math.sqrt(count))
    return math.ceil(count / cols), cols


def image_grid(images: torch.Tensor, rows: int = 0, cols: int = 0) -> torch.Tensor:
    """The batch laid out left to right, top to bottom on a black canvas (diffusers' ``make_image_grid``)."""
    images = check_image(images, "images")
    count, _, h, w = images.shape
    rows, cols = grid_shape(count, rows, cols)
    if rows * h > MAX_SIDE or cols * w > MAX_SIDE:
        raise NodeError(f"the grid would be {cols * w}x{rows * h}, above the limit of {MAX_SIDE} px a side")
    current_limits().check_pixels(cols * w, rows * h, what="the grid")
    grid = images.new_zeros(1, 3, rows * h, cols * w)
    for i, image in enumerate(images):
        top, left = (i // cols) * h, (i % cols) * w
        grid[0, :, top:top + h, left:left + w] = image
    return grid


# --------------------------------------------------------------------------- nodes

def _check_resize(params: dict):
    if not {"width", "height", "long_side"} <= set(params):
        return  # some come through links
    width, height, long_side = (params[k] for k in ("width", "height", "long_side"))
    if long_side and (width or height):
        yield "long_side", "give either long_side or width/height, not both"
    if not (long_side or width or height):
        yield "width", "give width, height or long_side (all are 0)"


def _refuse_resize_problems(width: int, height: int, long_side: int) -> None:
    """The validation check again, for sizes that came through links (validation skips those)."""
    problems = [f"param '{name}': {message}" for name, message in
                _check_resize({"width": width, "height": height, "long_side": long_side})]
    if problems:
        raise NodeError("; ".join(problems))


_Side = Annotated[int, Field(ge=0, le=MAX_SIDE)]


@node("ImageResize", version=1, category="image", outputs={"image": IMAGE}, check=_check_resize,
      reference="PIL.Image.resize / cv2.resize; long_side with backend opencv is the outpainting article's image_resize")
def image_resize(
    image: Image,
    width: Annotated[_Side, Field(description="target width in pixels; 0 = from the height and the aspect")] = 0,
    height: Annotated[_Side, Field(description="target height in pixels; 0 = from the width and the aspect")] = 0,
    long_side: Annotated[_Side, Field(description="make the longer side this long, keeping the aspect (instead of width/height)")] = 0,
    keep_aspect: Annotated[bool, Field(description="with width and height: fit inside that box keeping the aspect; with one of them: scale the other side too")] = True,
    resample: Annotated[Filter, Field(description="resampling filter")] = "lanczos",
    backend: Annotated[Backend, Field(description="pil (diffusers' resizing) or opencv (the outpainting article's cv2.resize)")] = "pil",
    multiple_of: Annotated[int, Field(ge=1, le=256, description="round each side down to a multiple of this (8 for Stable Diffusion)")] = 1,
) -> torch.Tensor:
    """Resize images to a width/height or a long side, keeping the aspect or not.

    The side computed from the aspect is truncated, as the outpainting article's `image_resize`
    computes it; `long_side=1024, backend="opencv", resample="lanczos"` is that function
    (cv2.INTER_LANCZOS4). Resampling works on the 8-bit image like Pillow/OpenCV (and
    diffusers) do, so results equal `PIL.Image.resize` / `cv2.resize` pixel for pixel.
    `multiple_of` rounds each side down (at least one multiple), e.g. 8 for the VAE.
    """
    image = check_image(image)
    _refuse_resize_problems(width, height, long_side)
    w, h = target_size(image.shape[-1], image.shape[-2], width, height, long_side, keep_aspect, multiple_of)
    return resize_pixels(image, w, h, resample, backend)


@node("MaskResize", version=1, category="mask", outputs={"mask": MASK}, check=_check_resize,
      reference="PIL.Image.resize / cv2.resize on the 8-bit mask")
def mask_resize(
    mask: Mask,
    width: Annotated[_Side, Field(description="target width in pixels; 0 = from the height and the aspect")] = 0,
    height: Annotated[_Side, Field(description="target height in pixels; 0 = from the width and the aspect")] = 0,
    long_side: Annotated[_Side, Field(description="make the longer side this long, keeping the aspect")] = 0,
    keep_aspect: Annotated[bool, Field(description="as in ImageResize")] = True,
    resample: Annotated[Filter, Field(description="resampling filter; nearest keeps a hard mask hard")] = "lanczos",
    backend: Annotated[Backend, Field(description="pil or opencv")] = "pil",
    multiple_of: Annotated[int, Field(ge=1, le=256, description="round each side down to a multiple of this")] = 1,
) -> torch.Tensor:
    """Resize masks exactly like ImageResize resizes images (same sizes, same filters).

    Use it to bring a mask to its image's size. Polarity is unchanged (1 = repaint); smooth
    filters give a hard mask soft edges (follow with MaskThreshold, or use "nearest").
    """
    mask = check_mask(mask)
    _refuse_resize_problems(width, height, long_side)
    w, h = target_size(mask.shape[-1], mask.shape[-2], width, height, long_side, keep_aspect, multiple_of)
    return resize_pixels(mask, w, h, resample, backend)


@node("ImageBatch", version=1, category="image", outputs={"images": IMAGE}, reference="torch.cat")
def image_batch(a: Image, b: Image) -> torch.Tensor:
    """Join two image batches of the same size into one batch (a's images first).

    Chain it to collect images from several nodes for ImageGrid or SaveImage.
    """
    return batch_images(a, b)


@node("ImageGrid", version=1, category="image", outputs={"image": IMAGE}, reference="diffusers.utils.make_image_grid")
def image_grid_node(
    images: Image,
    rows: Annotated[int, Field(ge=0, le=256, description="rows; 0 = as many as the batch needs")] = 0,
    cols: Annotated[int, Field(ge=0, le=256, description="columns; 0 = as many as the batch needs (near square when rows is 0 too)")] = 0,
) -> torch.Tensor:
    """Lay the images of a batch side by side in rows and columns, as one image.

    The input is one IMAGE batch (all images the same size; join sources with ImageBatch).
    Images fill the grid left to right, then top to bottom; unused cells stay black. With
    rows x cols equal to the batch size it matches diffusers' `make_image_grid` pixel for pixel.
    """
    return image_grid(images, rows, cols)


@node("ImageSize", version=1, category="image", outputs={"width": INT, "height": INT}, reference="tensor.shape")
def image_size(image: Image) -> tuple[int, int]:
    """The width and height of an image, to derive other sizes (with IntMath) from it."""
    image = check_image(image)
    return int(image.shape[-1]), int(image.shape[-2])
