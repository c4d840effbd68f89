"""Filling a masked area from its surroundings with OpenCV's classical inpainting."""
from __future__ import annotations

from nodegraph.lazy import lazy

from typing import Annotated, Literal

np = lazy("numpy")
torch = lazy("torch")
from pydantic import Field

from nodegraph import node
from nodegraph.sockets import IMAGE, Image, Mask

from ._pixels import check_image, check_mask, check_same_size, from_uint8, match_batches, to_uint8


def telea_fill(image: torch.Tensor, mask: torch.Tensor, radius: float = 3.0, method: str = "telea") -> torch.Tensor:
    """``cv2.inpaint`` of each image where ``mask >= 0.5``; other pixels are returned untouched.

    The image goes to 8-bit BGR (rounded, see ``_pixels``), the mask to 0/255 at 0.5, and
    ``cv2.inpaint(bgr, mask, radius, INPAINT_TELEA or INPAINT_NS)`` fills the masked pixels.
    Outside the mask the input floats are kept as they were (no 8-bit round trip there).
    """
    import cv2

    image, mask = check_image(image), check_mask(mask)
    check_same_size(image, mask)
    image, mask = match_batches(image, mask, names=("image", "mask"))
    flag = cv2.INPAINT_TELEA if method == "telea" else cv2.INPAINT_NS
    hard = (mask >= 0.5).to(image.device)  # the mask may come from the CPU, the image from the GPU
    rgb = to_uint8(image)
    holes = hard[:, 0].cpu().numpy().astype(np.uint8) * 255
    filled = []
    for pixels, hole in zip(rgb, holes):
        bgr = cv2.cvtColor(pixels, cv2.COLOR_RGB2BGR)
        out = cv2.inpaint(bgr, hole, float(radius), flag)
        filled.append(cv2.cvtColor(out, cv2.COLOR_BGR2RGB))
    filled_t = from_uint8(np.stack(filled), image.device)
    return torch.where(hard.expand_as(image), filled_t, image)


@node("TeleaFill", version=1, category="image", outputs={"image": IMAGE},
      reference="cv2.inpaint (INPAINT_TELEA / INPAINT_NS)")
def telea_fill_node(
    image: Image,
    mask: Mask,
    radius: Annotated[float, Field(gt=0, le=256, description="neighbourhood radius in pixels that each filled pixel draws from (cv2.inpaint inpaintRadius)")] = 3.0,
    method: Annotated[Literal["telea", "ns"], Field(description="telea: Telea's fast marching method; ns: Navier-Stokes")] = "telea",
) -> torch.Tensor:
    """Fill the masked area of an image from its surroundings (OpenCV Telea or Navier-Stokes).

    Pixels where the mask is >= 0.5 (1 = repaint) are filled by `cv2.inpaint` on the 8-bit
    image (rounded to the nearest level); every other pixel is returned as it came in. Use it
    to pre-fill new canvas before diffusion (the outpainting article), or alone to remove small things.
    The filled pixels equal `cv2.inpaint(bgr_uint8, mask_uint8, radius, flag)` exactly.
    """
    return telea_fill(image, mask, radius, method)
