"""The padding_mask_crop path (docs/design.md §4.7) and overlaying a result onto its original.

CropToMask finds the region around the mask (diffusers' ``VaeImageProcessor.get_crop_region``),
crops it and resizes it to the processing size (diffusers' ``resize_mode="fill"``); the
model works on that crop at full resolution; PasteCrop / Overlay resize it back
(``resize_mode="crop"``) and paste it into the original through the mask
(``VaeImageProcessor.apply_overlay``).
"""
from __future__ import annotations

from nodegraph.lazy import lazy

from dataclasses import dataclass
from typing import Annotated, Optional

np = lazy("numpy")
torch = lazy("torch")
PILImage = lazy("PIL.Image")
from pydantic import Field

from nodegraph.errors import NodeError
from nodegraph.limits import current_limits
from nodegraph import node
from nodegraph.serialize import disk_cacheable
from nodegraph.sockets import IMAGE, MASK, Image, Mask, socket

from ._pixels import check_image, check_mask, check_same_size, from_pil, match_batches, size_text, to_pil, to_uint8

CROP_REGION = "CROP_REGION"


@disk_cacheable
@dataclass(frozen=True)
class CropRegion:
    """Where CropToMask cut each batch item from a ``width`` x ``height`` image.

    ``boxes[i] = (x1, y1, x2, y2)`` in pixels, right/bottom exclusive (PIL's crop box,
    diffusers' ``crops_coords``); one box per batch item.
    """

    boxes: tuple[tuple[int, int, int, int], ...]
    width: int
    height: int

    def box(self, index: int) -> tuple[int, int, int, int]:
        return self.boxes[index if len(self.boxes) > 1 else 0]


CropRegionInput = socket(CROP_REGION, CropRegion)


# --------------------------------------------------------------------------- arithmetic

def crop_region(mask: np.ndarray, width: int, height: int, pad: int = 0) -> tuple[int, int, int, int]:
    """Bounding box of the non-zero pixels of an 8-bit (H, W) mask, padded by ``pad``, then
    widened (or heightened) to the ``width / height`` aspect, kept inside the image.

    The same arithmetic, with the same integer truncations, as diffusers'
    ``VaeImageProcessor.get_crop_region``; the bounding box is found with array reductions.
    """
    h, w = mask.shape
    cols, rows = np.flatnonzero(mask.any(axis=0)), np.flatnonzero(mask.any(axis=1))
    if cols.size == 0:
        raise NodeError("the mask is empty (all 0): there is nothing to crop to")
    x1, y1 = max(int(cols[0]) - pad, 0), max(int(rows[0]) - pad, 0)
    x2, y2 = min(int(cols[-1]) + 1 + pad, w), min(int(rows[-1]) + 1 + pad, h)
    ratio_crop, ratio_processing = (x2 - x1) / (y2 - y1), width / height
    if ratio_crop > ratio_processing:
        y1, y2 = _widen(y1, y2, int((x2 - x1) / ratio_processing - (y2 - y1)), h)
    else:
        x1, x2 = _widen(x1, x2, int((y2 - y1) * ratio_processing - (x2 - x1)), w)
    return x1, y1, x2, y2


def _widen(lo: int, hi: int, grow: int, limit: int) -> tuple[int, int]:
    """Grow [lo, hi) by ``grow`` split around its centre, shifted back inside [0, limit)."""
    lo -= grow // 2
    hi += grow - grow // 2
    if hi >= limit:
        lo, hi = lo - (hi - limit), limit
    if lo < 0:
        lo, hi = 0, hi - lo
    return lo, min(hi, limit)


def resize_fill(image: PILImage.Image, width: int, height: int) -> PILImage.Image:
    """Fit inside ``width`` x ``height`` keeping the aspect, centre, and fill the margins by
    stretching the edge rows or columns (diffusers' ``resize_mode="fill"``, Lanczos)."""
    ratio, src_ratio = width / height, image.width / image.height
    # at least 1 px: a strip much thinner than the target's aspect would otherwise shrink to nothing
    src_w = width if ratio < src_ratio else max(1, image.width * height // image.height)
    src_h = height if ratio >= src_ratio else max(1, image.height * width // image.width)
    resized = image.resize((src_w, src_h), resample=PILImage.Resampling.LANCZOS)
    out = PILImage.new(image.mode, (width, height))
    out.paste(resized, box=(width // 2 - src_w // 2, height // 2 - src_h // 2))
    if ratio < src_ratio:
        fill = height // 2 - src_h // 2
        if fill > 0:
            out.paste(resized.resize((width, fill), box=(0, 0, width, 0)), box=(0, 0))
            out.paste(resized.resize((width, fill), box=(0, resized.height, width, resized.height)),
                      box=(0, fill + src_h))
    elif ratio > src_ratio:
        fill = width // 2 - src_w // 2
        if fill > 0:
            out.paste(resized.resize((fill, height), box=(0, 0, 0, height)), box=(0, 0))
            out.paste(resized.resize((fill, height), box=(resized.width, 0, resized.width, height)),
                      box=(fill + src_w, 0))
    return out


def resize_crop(image: PILImage.Image, width: int, height: int) -> PILImage.Image:
    """Cover ``width`` x ``height`` keeping the aspect and centre-crop the excess
    (diffusers' ``resize_mode="crop"``, Lanczos)."""
    ratio, src_ratio = width / height, image.width / image.height
    src_w = width if ratio > src_ratio else max(1, image.width * height // image.height)
    src_h = height if ratio <= src_ratio else max(1, image.height * width // image.width)
    resized = image.resize((src_w, src_h), resample=PILImage.Resampling.LANCZOS)
    out = PILImage.new(image.mode, (width, height))
    out.paste(resized, box=(width // 2 - src_w // 2, height // 2 - src_h // 2))
    return out


def crop_to_mask(image: torch.Tensor, mask: torch.Tensor, padding: int, width: int, height: int
                 ) -> tuple[torch.Tensor, torch.Tensor, CropRegion]:
    """Per batch item: region around the mask, then image and mask cut there and resized to
    ``width`` x ``height`` on their 8-bit levels (as diffusers' inpaint pipeline preprocesses
    them with ``padding_mask_crop``)."""
    image, mask = check_image(image), check_mask(mask)
    check_same_size(image, mask)
    image, mask = match_batches(image, mask, names=("image", "mask"))
    current_limits().check_pixels(width, height, image.shape[0], "the resized crop")
    levels = to_uint8(mask)[..., 0]
    boxes, images, masks = [], [], []
    for i in range(image.shape[0]):
        box = crop_region(levels[i], width, height, padding)
        boxes.append(box)
        images.append(from_pil(resize_fill(to_pil(image[i]).crop(box), width, height)))
        masks.append(from_pil(resize_fill(to_pil(mask[i]).crop(box), width, height)))
    region = CropRegion(tuple(boxes), image.shape[-1], image.shape[-2])
    return torch.cat(images).to(image.device), torch.cat(masks).to(image.device), region


def overlay(original: torch.Tensor, image: torch.Tensor, mask: torch.Tensor, region: CropRegion | None = None
            ) -> torch.Tensor:
    """``original * (1 - mask) + image * mask``, after putting ``image`` back into its crop region.

    With a region, ``image`` (any size) is resized to each box (``resize_mode="crop"``,
    Lanczos, 8-bit) and placed there on a black canvas, as diffusers' ``apply_overlay`` does
    with ``crop_coords``. Where the mask is 0 the result is the original exactly.
    """
    original, image, mask = check_image(original, "original"), check_image(image), check_mask(mask)
    check_same_size(original, mask, "original", "mask")
    if region is None:
        check_same_size(original, image, "original", "image")
    elif (region.width, region.height) != (original.shape[-1], original.shape[-2]):
        raise NodeError(f"the crop region was made on a {region.width}x{region.height} image but original is "
                        f"{size_text(original)}; link the same image that went into CropToMask")
    original, image, mask = match_batches(original, image.to(original.device), mask.to(original.device),
                                          names=("original", "image", "mask"))
    if region is not None:
        if len(region.boxes) not in (1, original.shape[0]):
            raise NodeError(f"the crop region holds {len(region.boxes)} boxes for a batch of {original.shape[0]}")
        pasted = torch.zeros_like(original)
        for i in range(original.shape[0]):
            x1, y1, x2, y2 = region.box(i)
            tile = from_pil(resize_crop(to_pil(image[i]), x2 - x1, y2 - y1), original.device)
            pasted[i, :, y1:y2, x1:x2] = tile[0]
        image = pasted
    return original * (1.0 - mask) + image * mask


# --------------------------------------------------------------------------- nodes

_Size = Annotated[int, Field(ge=8, le=8192, multiple_of=8)]  # the crop goes to the VAE


def _check_crop(params: dict):
    if isinstance(params.get("width"), int) and isinstance(params.get("height"), int):
        problem = current_limits().pixels_problem(params["width"], params["height"])
        if problem:
            yield "width", f"the resized crop: {problem}"


@node("CropToMask", version=1, category="image", outputs={"image": IMAGE, "mask": MASK, "region": CROP_REGION},
      check=_check_crop,
      reference="diffusers VaeImageProcessor.get_crop_region + preprocess(resize_mode='fill') (padding_mask_crop)")
def crop_to_mask_node(
    image: Image,
    mask: Mask,
    padding: Annotated[int, Field(ge=0, le=4096, description="pixels of context added around the mask's bounding box (padding_mask_crop)")] = 32,
    width: Annotated[_Size, Field(description="processing width the crop is resized to (the model's native size)")] = 512,
    height: Annotated[_Size, Field(description="processing height the crop is resized to")] = 512,
):
    """Cut out the region around the mask and scale it to the processing size (padding_mask_crop).

    The bounding box of the mask's non-zero pixels, padded by `padding` and widened to the
    width/height aspect inside the image, is exactly diffusers' `get_crop_region`. Image and
    mask are cropped there and resized to width x height with diffusers' "fill" mode
    (Lanczos, margins filled by stretching the edges), pixel for pixel like the inpaint
    pipeline's preprocessing. Inpaint the crop, then PasteCrop it back with `region`.
    The mask keeps its polarity (1 = repaint) and its soft values (threshold it if needed).
    """
    cropped, cropped_mask, region = crop_to_mask(image, mask, padding, width, height)
    return {"image": cropped, "mask": cropped_mask, "region": region}


@node("PasteCrop", version=1, category="image", outputs={"image": IMAGE},
      reference="diffusers VaeImageProcessor.apply_overlay with crop_coords")
def paste_crop(original: Image, image: Image, mask: Mask, region: CropRegionInput) -> torch.Tensor:
    """Paste a processed crop back into the original image through the mask.

    `image` (the inpainted crop, any size) is resized to the crop `region` from CropToMask
    (diffusers' "crop" mode, Lanczos), placed there, and blended in with the full-size
    `mask`: `original * (1 - mask) + placed * mask`. Outside the mask the original is
    untouched; a soft mask feathers the seam. Same pixels as diffusers' `apply_overlay(mask,
    original, image, crop_coords)` for hard masks (soft masks: see Overlay).
    """
    return overlay(original, image, mask, region)


@node("Overlay", version=1, category="image", outputs={"image": IMAGE},
      reference="diffusers VaeImageProcessor.apply_overlay")
def overlay_node(original: Image, image: Image, mask: Mask, region: Optional[CropRegionInput] = None) -> torch.Tensor:
    """Keep the original outside the mask: blend a repainted image over it through the mask.

    `original * (1 - mask) + image * mask` in float (1 = repaint): where the mask is 0 the
    result is the original pixel for pixel, where it is 1 the new image, and a soft mask
    feathers the seam. With a crop `region` (from CropToMask) the image is first resized
    into that region, as PasteCrop does. For hard masks this is diffusers' `apply_overlay`
    pixel for pixel; for soft masks it is the exact float blend, within 1/255 of diffusers,
    whose 8-bit premultiplied-alpha compositing rounds on the way.
    """
    return overlay(original, image, mask, region)
