"""Pasting one image onto another at a position, through an optional mask (ComfyUI's ImageCompositeMasked)."""
from __future__ import annotations

from nodegraph.lazy import lazy

import math
from typing import Annotated, Optional

torch = lazy("torch")
F = lazy("torch.nn.functional")
from pydantic import Field

from nodegraph import node
from nodegraph.sockets import IMAGE, Image, Mask

from ._pixels import check_image, check_mask

MAX_SIDE = 16384


def repeat_to_batch(t: torch.Tensor, batch: int) -> torch.Tensor:
    """The first ``batch`` items of ``t``, repeating the batch as often as needed."""
    if t.shape[0] < batch:
        t = t.repeat(math.ceil(batch / t.shape[0]), *([1] * (t.ndim - 1)))
    return t[:batch]


def composite(destination: torch.Tensor, source: torch.Tensor, x: int, y: int, mask: torch.Tensor | None = None,
              resize_source: bool = False) -> torch.Tensor:
    """``source`` pasted with its top-left corner at (x, y) into a copy of ``destination``, blended through
    ``mask`` (1 = source): ``mask * source + (1 - mask) * destination``.

    The source (optionally first stretched bilinearly to the destination's size) takes the destination's
    batch size, repeating or dropping items; the mask is stretched bilinearly to the source's size; the parts
    beyond the destination's right and bottom edges are dropped."""
    out = destination.clone()
    source = source.to(out.device)
    if resize_source:
        source = F.interpolate(source, size=tuple(out.shape[-2:]), mode="bilinear")
    source = repeat_to_batch(source, out.shape[0])
    src_h, src_w = source.shape[-2:]
    left, top = max(0, min(x, out.shape[-1])), max(0, min(y, out.shape[-2]))
    if mask is None:
        mask = torch.ones_like(source)
    else:
        mask = F.interpolate(mask.to(out.device, torch.float32), size=(src_h, src_w), mode="bilinear")
        mask = repeat_to_batch(mask, source.shape[0])
    visible_w, visible_h = out.shape[-1] - left, out.shape[-2] - top
    mask = mask[:, :, :visible_h, :visible_w]
    region = out[..., top:top + src_h, left:left + src_w]
    out[..., top:top + src_h, left:left + src_w] = (mask * source[..., :visible_h, :visible_w]
                                                     + (torch.ones_like(mask) - mask) * region)
    return out


_Offset = Annotated[int, Field(ge=0, le=MAX_SIDE)]


@node("Composite", version=1, category="image", outputs={"image": IMAGE},
      reference="ComfyUI ImageCompositeMasked (comfy_extras/nodes_mask.py composite)")
def composite_node(
    destination: Image,
    source: Image,
    mask: Optional[Mask] = None,
    x: Annotated[_Offset, Field(description="left edge of the source in the destination, in pixels")] = 0,
    y: Annotated[_Offset, Field(description="top edge of the source in the destination, in pixels")] = 0,
    resize_source: Annotated[bool, Field(description="stretch the source (bilinear) to the destination's size first")] = False,
) -> torch.Tensor:
    """Paste a source image onto a destination at (x, y), through an optional mask, as ComfyUI's ImageCompositeMasked.

    The result is `mask * source + (1 - mask) * destination` where the source lies and the destination
    elsewhere. The mask (1 = take the source; any size) is stretched bilinearly to the source's size;
    without one the source covers its rectangle. The source takes the destination's batch size (repeated
    or cut); parts beyond the destination's edges are dropped.
    """
    destination, source = check_image(destination, "destination"), check_image(source, "source")
    mask = check_mask(mask) if mask is not None else None
    return composite(destination, source, x, y, mask, resize_source)
