"""Outpainting helpers (docs/design.md §4.8, after the outpainting article): grow the canvas, slice for
IP-Adapter, stitch tiles; and ComfyUI's grey padding with a feathered mask (PadImage).

The article's ``process_image`` returns a differential-diffusion ``map`` where white keeps
the original (255 outside the new area, ``inpaint_mask_color`` inside). Here masks follow
docs/design.md §2 (1 = change), so ExpandCanvas outputs ``change = 1 - map / 255``.
"""
from __future__ import annotations

from nodegraph.lazy import lazy

from typing import Annotated, Literal

np = lazy("numpy")
torch = lazy("torch")
from pydantic import Field

from nodegraph.errors import NodeError
from nodegraph.limits import current_limits
from nodegraph import node
from nodegraph.sockets import IMAGE, MASK, Image

from ._pixels import check_image, match_batches, size_text
from .fill import telea_fill
from .mask import blur_mask

Direction = Literal["left", "right", "top", "bottom"]
_Byte = Annotated[int, Field(ge=0, le=255)]


# --------------------------------------------------------------------------- arithmetic

def expand_canvas(
    image: torch.Tensor,
    direction: str = "right",
    expand_pixels: int = 256,
    max_size: int = 1024,
    fill_color: tuple[int, int, int] = (0, 0, 0),
    mask_offset: int = 50,
    blur_kernel: int = 500,
    inpaint_mask_color: int = 50,
    prefill: str = "telea",
    telea_radius: float = 3.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The outpainting article's ``process_image`` on a batch: returns (canvas, change map, new-area mask).

    1. The canvas grows by ``expand_pixels`` towards ``direction``. If that makes it longer
       than ``max_size`` along that axis (0 = no limit), the image is cropped on the opposite
       side so the canvas is exactly ``max_size``. The other axis is never cropped (the
       article's code fails there instead).
    2. The new area is ``fill_color`` (RGB), then filled by ``cv2.inpaint`` Telea (``prefill``).
    3. Change map: ``1 - inpaint_mask_color / 255`` over the new area plus ``mask_offset``
       pixels into the old image, 0 elsewhere, blurred with ``cv2.GaussianBlur`` of kernel
       ``blur_kernel`` (even sizes grow by one; 0 = no blur) on 8-bit levels as the article does.
    4. New-area mask: 1 exactly over the new pixels (what Telea filled).
    """
    image = check_image(image)
    _, _, h, w = image.shape
    horizontal = direction in ("left", "right")
    length = w if horizontal else h
    new_length = length + expand_pixels
    if max_size and new_length > max_size:
        if expand_pixels >= max_size:
            raise NodeError(f"expand_pixels ({expand_pixels}) must be smaller than max_size ({max_size})")
        keep = max_size - expand_pixels
        # Crop from the side opposite to the growth, as the article does.
        start = 0 if direction in ("left", "top") else length - keep
        image = image[..., start:start + keep] if horizontal else image[..., start:start + keep, :]
        new_length = max_size
    _, _, h, w = image.shape
    length = w if horizontal else h
    size = (h, new_length) if horizontal else (new_length, w)
    current_limits().check_pixels(size[1], size[0], image.shape[0], "the grown canvas")

    fill = torch.tensor(fill_color, dtype=torch.float32, device=image.device).view(1, 3, 1, 1) / 255.0
    canvas = fill.expand(image.shape[0], 3, *size).clone()
    change = image.new_zeros(image.shape[0], 1, *size)
    new_area = image.new_zeros(image.shape[0], 1, *size)
    level = 1.0 - inpaint_mask_color / 255.0
    offset = min(mask_offset, length)
    old, new = _spans(direction, length, expand_pixels)
    soft = (slice(0, expand_pixels + offset) if direction in ("left", "top")
            else slice(length - offset, new_length))
    if horizontal:
        canvas[..., old] = image
        change[..., soft] = level
        new_area[..., new] = 1.0
    else:
        canvas[..., old, :] = image
        change[..., soft, :] = level
        new_area[..., new, :] = 1.0

    if blur_kernel > 0:
        # Blur the article's own map (white = keep) on its 8-bit levels, then flip it, so the
        # result equals the article's cv2.GaussianBlur level for level.
        change = 1.0 - blur_mask(1.0 - change, method="opencv", kernel_size=blur_kernel)
    if prefill == "telea":
        canvas = telea_fill(canvas, new_area, telea_radius, "telea")
    return canvas, change, new_area


def pad_image(image: torch.Tensor, left: int, top: int, right: int, bottom: int,
              feathering: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """ComfyUI's ImagePadForOutpaint: the images on a grey (0.5) canvas grown by the given margins, and one mask
    that is 1 over the margins and, inside the old image, ``((f - d) / f) ** 2`` within ``f = feathering`` pixels
    of a padded side (``d``: the distance to that side, counted as ComfyUI does: row ``i`` is ``i`` from the top
    and ``h - i`` from the bottom), 0 beyond. No feathering unless ``2 * f`` is below both sides of the image."""
    image = check_image(image)
    b, _, h, w = image.shape
    size = (h + top + bottom, w + left + right)
    current_limits().check_pixels(size[1], size[0], b, "the padded image")
    canvas = torch.full((b, 3, *size), 0.5, dtype=torch.float32, device=image.device)
    canvas[..., top:top + h, left:left + w] = image
    inner = np.zeros((h, w), np.float64)
    if 0 < feathering and 2 * feathering < h and 2 * feathering < w:
        rows, cols = np.arange(h)[:, None], np.arange(w)[None, :]
        dist = np.minimum.reduce([np.broadcast_to(d, (h, w)) for d in (
            rows if top else np.full_like(rows, h), h - rows if bottom else np.full_like(rows, h),
            cols if left else np.full_like(cols, w), w - cols if right else np.full_like(cols, w))])
        ramp = (feathering - dist) / feathering
        inner = np.where(dist < feathering, ramp * ramp, 0.0)  # squared in double, then stored as float32
    mask = torch.ones((1, 1, *size), dtype=torch.float32)
    mask[0, 0, top:top + h, left:left + w] = torch.from_numpy(inner.astype(np.float32))
    return canvas, mask.to(image.device)


def _spans(direction: str, length: int, expand_pixels: int) -> tuple[slice, slice]:
    """Where the old image and the new strip lie along the growth axis."""
    if direction in ("left", "top"):
        return slice(expand_pixels, expand_pixels + length), slice(0, expand_pixels)
    return slice(0, length), slice(length, length + expand_pixels)


def square_slices(image: torch.Tensor, cols: int = 2, rows: int = 3, layout: str = "grid") -> torch.Tensor:
    """The outpainting article's ``slice_image``: ``cols`` x ``rows`` squares of side ``min(w // cols, h // rows)``.

    ``grid`` (the article): square (r, c) starts at (c * side, r * side); the article shifts a
    last square that would stick out back inside, which cannot happen with that side, so
    the squares cover the top-left ``cols*side`` x ``rows*side``. ``spread``: the squares
    are spaced evenly from edge to edge, so together they cover the whole image.
    Order: row by row, left to right; a batch of B images gives B * rows * cols squares.
    """
    image = check_image(image)
    _, _, h, w = image.shape
    side = min(w // cols, h // rows)
    if side < 1:
        raise NodeError(f"image is {size_text(image)}: too small for {cols} x {rows} squares")
    xs, ys = _positions(w, side, cols, layout), _positions(h, side, rows, layout)
    squares = [image[:, :, y:y + side, x:x + side] for y in ys for x in xs]
    return torch.stack(squares, dim=1).reshape(-1, 3, side, side)


def _positions(length: int, side: int, count: int, layout: str) -> list[int]:
    if layout == "spread" and count > 1:
        return [round(i * (length - side) / (count - 1)) for i in range(count)]
    # grid; a square past the end would be moved back inside (never happens: side <= length // count)
    return [min(i * side, length - side) for i in range(count)]


def merge_tile(panorama: torch.Tensor, tile: torch.Tensor, offset: int, direction: str) -> torch.Tensor:
    """The outpainting article's ``merge_images``: the panorama grown by ``offset`` towards ``direction``.

    The panorama is placed at the far side, then the tile flush with the new edge on top of
    it (the tile wins where they overlap); anything neither covers stays black.
    """
    panorama, tile = check_image(panorama, "panorama"), check_image(tile, "tile")
    panorama, tile = match_batches(panorama, tile.to(panorama.device), names=("panorama", "tile"))
    b, _, h, w = panorama.shape
    th, tw = tile.shape[-2:]
    horizontal = direction in ("left", "right")
    if horizontal and th != h or not horizontal and tw != w:
        side = "height" if horizontal else "width"
        raise NodeError(f"tile is {size_text(tile)} but panorama is {size_text(panorama)}: for direction "
                        f"'{direction}' their {side}s must match")
    length, tile_length = (w, tw) if horizontal else (h, th)
    if tile_length > length + offset:
        raise NodeError(f"tile is {tile_length} px long along the '{direction}' direction but the merged image "
                        f"is only {length + offset} (panorama {length} + offset {offset}); raise the offset or crop the tile")
    new_length = length + offset
    merged = panorama.new_zeros(b, 3, *((h, new_length) if horizontal else (new_length, w)))
    if direction in ("left", "top"):
        old, new = slice(offset, new_length), slice(0, tile_length)
    else:
        old, new = slice(0, length), slice(new_length - tile_length, new_length)
    if horizontal:
        merged[..., old] = panorama
        merged[..., new] = tile
    else:
        merged[..., old, :] = panorama
        merged[..., new, :] = tile
    return merged


# --------------------------------------------------------------------------- nodes

def _check_expand(params: dict):
    if "expand_pixels" not in params or "max_size" not in params:
        return  # one comes through a link: checked when it arrives
    expand, max_size = params["expand_pixels"], params["max_size"]
    if max_size and expand >= max_size:
        yield "expand_pixels", f"must be smaller than max_size ({max_size}); raise max_size or set it to 0 (no limit)"


@node("ExpandCanvas", version=1, category="outpaint", check=_check_expand,
      outputs={"image": IMAGE, "change": MASK, "new_area": MASK},
      reference="process_image of the outpainting article (change = 1 - mask / 255)")
def expand_canvas_node(
    image: Image,
    direction: Annotated[Direction, Field(description="side the canvas grows on")] = "right",
    expand_pixels: Annotated[int, Field(ge=1, le=8192, description="how many pixels to add")] = 256,
    max_size: Annotated[int, Field(ge=0, le=16384, description="longest canvas along the growth axis; beyond it the image is cropped on the opposite side (0 = no limit)")] = 1024,
    fill_color: Annotated[tuple[_Byte, _Byte, _Byte], Field(description="RGB colour of the new area before the Telea prefill")] = (0, 0, 0),
    mask_offset: Annotated[int, Field(ge=0, le=8192, description="pixels the change area reaches into the old image, so the seam is repainted too")] = 50,
    blur_kernel: Annotated[int, Field(ge=0, le=4095, description="cv2.GaussianBlur kernel size for the change map (the article's blur_radius; even grows by one; 0 = no blur)")] = 500,
    inpaint_mask_color: Annotated[int, Field(ge=0, le=255, description="grey level of the article's map over the new area: lighter keeps more of the prefill (change there = 1 - level/255)")] = 50,
    prefill: Annotated[Literal["telea", "none"], Field(description="telea: fill the new area with cv2.inpaint Telea; none: leave fill_color")] = "telea",
    telea_radius: Annotated[float, Field(gt=0, le=256, description="cv2.inpaint radius for the prefill")] = 3.0,
):
    """Grow the canvas for outpainting: new area pre-filled, soft change map, hard new-area mask.

    The outpainting article's `process_image`: the canvas grows by `expand_pixels` towards
    `direction` (cropping the opposite side beyond `max_size`), the new area is `fill_color`
    pre-filled with OpenCV Telea, and the change map covers the new area plus `mask_offset`
    pixels into the old image at level 1 - inpaint_mask_color/255, blurred by
    `cv2.GaussianBlur((blur_kernel, blur_kernel), 0)`. Polarity: the article's mask is white
    = keep (`mask = 255 * (1 - change)`); `change` here is 1 = change, ready for a
    differential sampler. `new_area` is 1 exactly on the added pixels (for TeleaFill/Overlay).
    Outputs match a plain re-implementation of `process_image` within 1/255.
    """
    canvas, change, new_area = expand_canvas(image, direction, expand_pixels, max_size, tuple(fill_color),
                                             mask_offset, blur_kernel, inpaint_mask_color, prefill, telea_radius)
    return {"image": canvas, "change": change, "new_area": new_area}


_Margin = Annotated[int, Field(ge=0, le=8192)]


@node("PadImage", version=1, category="outpaint", outputs={"image": IMAGE, "mask": MASK},
      reference="ComfyUI ImagePadForOutpaint (nodes.py)")
def pad_image_node(
    image: Image,
    left: Annotated[_Margin, Field(description="pixels added on the left")] = 0,
    top: Annotated[_Margin, Field(description="pixels added at the top")] = 0,
    right: Annotated[_Margin, Field(description="pixels added on the right")] = 0,
    bottom: Annotated[_Margin, Field(description="pixels added at the bottom")] = 0,
    feathering: Annotated[int, Field(ge=0, le=16384, description="pixels of the old image, next to a padded side, that the mask fades over")] = 40,
):
    """Pad images with grey for outpainting, with a mask of the new area, as ComfyUI's ImagePadForOutpaint.

    The canvas grows by the four margins; new pixels are grey (0.5). The mask (one for the batch) is 1
    over the margins; inside the old image it fades in over `feathering` pixels next to each padded
    side as ((feathering - d) / feathering)^2 (d = distance to that side, 0 on its outer row) and is 0
    beyond. Feathering applies only when twice it is less than both sides of the image; otherwise the
    old image's mask is all 0.
    """
    canvas, mask = pad_image(image, left, top, right, bottom, feathering)
    return {"image": canvas, "mask": mask}


@node("SliceForIPAdapter", version=1, category="outpaint", outputs={"images": IMAGE},
      reference="slice_image of the outpainting article")
def slice_for_ip_adapter(
    image: Image,
    cols: Annotated[int, Field(ge=1, le=16, description="squares across")] = 2,
    rows: Annotated[int, Field(ge=1, le=16, description="squares down")] = 3,
    layout: Annotated[Literal["grid", "spread"], Field(description="grid: the article's tiling from the top-left; spread: evenly spaced edge to edge, covering the whole image")] = "grid",
) -> torch.Tensor:
    """Cut an image into square slices to give IP-Adapter (which wants squares) a non-square image.

    The outpainting article's `slice_image`: squares of side min(w // cols, h // rows) on a cols x rows
    grid, returned as one IMAGE batch, row by row. The article's "shift the last square back
    inside" never triggers with that side, so `grid` covers the top-left area; `spread`
    spaces the squares evenly so the last column and row touch the right and bottom edges.
    IP-Adapter's image processor resizes each square (to 224 px) itself.
    """
    return square_slices(image, cols, rows, layout)


@node("Merge", version=1, category="outpaint", outputs={"image": IMAGE}, reference="merge_images of the outpainting article")
def merge(
    panorama: Image,
    tile: Image,
    offset: Annotated[int, Field(ge=0, le=16384, description="pixels the panorama grows by (the expand_pixels of this step)")] = 256,
    direction: Annotated[Direction, Field(description="side the panorama grows on")] = "right",
) -> torch.Tensor:
    """Stitch a newly generated tile onto the growing panorama.

    The outpainting article's `merge_images`: the result is the panorama grown by `offset` towards
    `direction`; the panorama keeps its pixels and the tile is laid flush with the new edge,
    over the panorama where they overlap. Across the growth axis the sizes must match.
    """
    return merge_tile(panorama, tile, offset, direction)
