"""Scaling images and latents with torch's interpolation, the way ComfyUI's ImageScale / LatentUpscale nodes do.

ImageResize resamples 8-bit levels with Pillow or OpenCV; these nodes interpolate the float tensors themselves
(``torch.nn.functional.interpolate``, align_corners off, no antialiasing), so bicubic results may overshoot
[0, 1] slightly, as ComfyUI's do. Sizes follow ComfyUI's rules: a 0 side follows the aspect (rounded), "center"
crops the source to the target's aspect before scaling.
"""
from __future__ import annotations

from nodegraph.lazy import lazy

from dataclasses import replace
from typing import Annotated, Literal

np = lazy("numpy")
torch = lazy("torch")
F = lazy("torch.nn.functional")
from pydantic import Field

from nodegraph import node
from nodegraph.errors import NodeError
from nodegraph.limits import current_limits
from nodegraph.sockets import IMAGE, LATENT, Image, Latent, SpaceRule

from ._pixels import check_image

MAX_SIDE = 16384
ImageMethod = Literal["nearest-exact", "bilinear", "area", "bicubic", "lanczos"]
LatentMethod = Literal["nearest-exact", "bilinear", "area", "bicubic", "bislerp"]
Crop = Literal["disabled", "center"]


# --------------------------------------------------------------------------- arithmetic

def center_crop(t: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """The centre of ``t`` cut to the aspect of width x height: the margin cut from each side is rounded."""
    old_w, old_h = t.shape[-1], t.shape[-2]
    old_aspect, new_aspect = old_w / old_h, width / height
    x = y = 0
    if old_aspect > new_aspect:
        x = round((old_w - old_w * (new_aspect / old_aspect)) / 2)
    elif old_aspect < new_aspect:
        y = round((old_h - old_h * (old_aspect / new_aspect)) / 2)
    # a target far more extreme than the source would round the kept part to nothing: keep at least one pixel
    x, y = min(x, (old_w - 1) // 2), min(y, (old_h - 1) // 2)
    return t[..., y:old_h - y, x:old_w - x]


def lanczos_levels(t: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """Pillow's Lanczos resize of each (3, H, W) image; levels are truncated (not rounded) to 8 bits first."""
    from PIL import Image as PILImage

    out = []
    for item in t:
        levels = np.clip(255.0 * item.movedim(0, -1).detach().cpu().numpy(), 0, 255).astype(np.uint8)
        resized = PILImage.fromarray(levels).resize((width, height), resample=PILImage.Resampling.LANCZOS)
        out.append(torch.from_numpy(np.array(resized).astype(np.float32) / 255.0).movedim(-1, 0))
    return torch.stack(out).to(t.device, t.dtype)


def _slerp(a: torch.Tensor, b: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation of the rows of (N, C) ``a`` and ``b`` by (N, 1) ``r``, with the norms
    interpolated linearly; (nearly) equal directions give ``a``, (nearly) opposite ones the linear blend."""
    channels = a.shape[-1]
    norm_a, norm_b = a.norm(dim=-1, keepdim=True), b.norm(dim=-1, keepdim=True)
    unit_a, unit_b = a / norm_a, b / norm_b
    unit_a[norm_a.expand(-1, channels) == 0.0] = 0.0  # a zero vector has no direction
    unit_b[norm_b.expand(-1, channels) == 0.0] = 0.0
    dot = (unit_a * unit_b).sum(1)
    omega = torch.acos(dot)
    sin_omega = torch.sin(omega)
    out = ((torch.sin((1.0 - r.squeeze(1)) * omega) / sin_omega).unsqueeze(1) * unit_a
           + (torch.sin(r.squeeze(1) * omega) / sin_omega).unsqueeze(1) * unit_b)
    out *= (norm_a * (1.0 - r) + norm_b * r).expand(-1, channels)
    same, opposite = dot > 1 - 1e-5, dot < 1e-5 - 1
    out[same] = a[same]
    out[opposite] = (a * (1.0 - r) + b * r)[opposite]
    return out


def _linear_taps(old: int, new: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For each of ``new`` positions: the fraction between its two source pixels and their indices, the
    positions being those of torch's bilinear interpolation (align_corners off)."""
    first = torch.arange(old, dtype=torch.float32, device=device).reshape(1, 1, 1, -1)
    first = F.interpolate(first, size=(1, new), mode="bilinear")
    fraction = first - first.floor()
    second = torch.arange(old, dtype=torch.float32, device=device).reshape(1, 1, 1, -1) + 1
    second[..., -1] -= 1  # the last pixel has no right neighbour: pair it with itself
    second = F.interpolate(second, size=(1, new), mode="bilinear")
    return fraction, first.to(torch.int64), second.to(torch.int64)


def bislerp(samples: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """Bilinear resize that slerps each pixel's channel vector between its two neighbours (first along the
    width, then along the height), so latent vectors keep their length; ComfyUI's "bislerp"."""
    dtype = samples.dtype
    samples = samples.float()
    n, c, h, w = samples.shape

    fraction, i1, i2 = _linear_taps(w, width, samples.device)
    left = samples.gather(-1, i1.expand(n, c, h, -1)).movedim(1, -1).reshape(-1, c)
    right = samples.gather(-1, i2.expand(n, c, h, -1)).movedim(1, -1).reshape(-1, c)
    ratio = fraction.expand(n, 1, h, -1).movedim(1, -1).reshape(-1, 1)
    rows = _slerp(left, right, ratio).reshape(n, h, width, c).movedim(-1, 1)

    fraction, i1, i2 = _linear_taps(h, height, samples.device)
    top = rows.gather(-2, i1.reshape(1, 1, -1, 1).expand(n, c, -1, width)).movedim(1, -1).reshape(-1, c)
    bottom = rows.gather(-2, i2.reshape(1, 1, -1, 1).expand(n, c, -1, width)).movedim(1, -1).reshape(-1, c)
    ratio = fraction.reshape(1, 1, -1, 1).expand(n, 1, -1, width).movedim(1, -1).reshape(-1, 1)
    out = _slerp(top, bottom, ratio).reshape(n, height, width, c).movedim(-1, 1)
    return out.to(dtype)


def upscale(t: torch.Tensor, width: int, height: int, method: str = "bilinear", crop: str = "disabled") -> torch.Tensor:
    """(B, C, H, W) -> (B, C, height, width): ComfyUI's ``common_upscale`` (optional centre crop, then
    bislerp, Lanczos on 8-bit levels, or ``F.interpolate`` with the method's name as its mode)."""
    if width < 1 or height < 1:
        raise NodeError(f"the scaled size would be {width}x{height}; each side must be at least 1 pixel")
    if width > MAX_SIDE or height > MAX_SIDE:
        raise NodeError(f"scaling to {width}x{height} exceeds the limit of {MAX_SIDE} px a side")
    if crop == "center":
        t = center_crop(t, width, height)
    if method == "bislerp":
        return bislerp(t, width, height)
    if method == "lanczos":
        return lanczos_levels(t, width, height)
    return F.interpolate(t, size=(height, width), mode=method)


def image_size_rule(src_w: int, src_h: int, width: int, height: int) -> tuple[int, int]:
    """ComfyUI's ImageScale sizes: a 0 side follows the aspect, rounded (at least 1)."""
    if width == 0:
        width = max(1, round(src_w * height / src_h))
    elif height == 0:
        height = max(1, round(src_h * width / src_w))
    return width, height


def latent_size_rule(lat_w: int, lat_h: int, width: int, height: int, factor: int) -> tuple[int, int]:
    """ComfyUI's LatentUpscale sizes, in latent pixels: pixel sides at least 64, a 0 side following the
    aspect (rounded), then divided by the VAE factor (floored)."""
    if width == 0:
        height = max(64, height)
        width = max(64, round(lat_w * height / lat_h))
    elif height == 0:
        width = max(64, width)
        height = max(64, round(lat_h * width / lat_w))
    else:
        width, height = max(64, width), max(64, height)
    return width // factor, height // factor


def _scale_image(image: torch.Tensor, width: int, height: int, method: str, crop: str) -> torch.Tensor:
    current_limits().check_pixels(width, height, image.shape[0], "the scaled image")
    return upscale(image, width, height, method, crop)


def _scale_latent(latent, width: int, height: int, method: str, crop: str):
    samples = latent.samples
    current_limits().check_pixels(width * latent.vae_scale_factor, height * latent.vae_scale_factor,
                                  samples.shape[0], "the scaled latent")
    out = upscale(samples, width, height, method, crop)
    # inpainting conditioning and a pending VAE draw no longer fit the new size; an empty latent stays empty
    return replace(latent.with_samples(out), empty=latent.empty)


# --------------------------------------------------------------------------- nodes

_Side = Annotated[int, Field(ge=0, le=MAX_SIDE)]
_Scale = Annotated[float, Field(ge=0.01, le=8.0, description="factor applied to each side (rounded)")]


@node("ImageScale", version=1, category="image", outputs={"image": IMAGE},
      reference="ComfyUI ImageScale (comfy.utils.common_upscale)")
def image_scale(
    image: Image,
    width: Annotated[_Side, Field(description="target width; 0 = from the height and the aspect")] = 512,
    height: Annotated[_Side, Field(description="target height; 0 = from the width and the aspect")] = 512,
    method: Annotated[ImageMethod, Field(description="torch interpolate mode, or lanczos (Pillow on 8-bit levels)")] = "nearest-exact",
    crop: Annotated[Crop, Field(description="center: cut the image to the target's aspect first")] = "disabled",
) -> torch.Tensor:
    """Scale images with torch's interpolation to a width and height, as ComfyUI's ImageScale does.

    A side of 0 follows the aspect (rounded); both 0 returns the images unchanged. `crop` "center"
    cuts the image to the target's aspect (the margin rounded) before scaling, so nothing is
    stretched. Methods are `F.interpolate` modes on the float image (align_corners off, no
    antialiasing; bicubic may overshoot [0, 1] a little, as in ComfyUI) or "lanczos": Pillow's
    Lanczos on the levels truncated to 8 bits. For resampling on 8-bit levels with Pillow or
    OpenCV, use ImageResize.
    """
    image = check_image(image)
    if width == 0 and height == 0:
        return image
    width, height = image_size_rule(image.shape[-1], image.shape[-2], width, height)
    return _scale_image(image, width, height, method, crop)


@node("ImageScaleBy", version=1, category="image", outputs={"image": IMAGE},
      reference="ComfyUI ImageScaleBy (comfy.utils.common_upscale)")
def image_scale_by(
    image: Image,
    scale_by: _Scale = 1.0,
    method: Annotated[ImageMethod, Field(description="as in ImageScale")] = "nearest-exact",
) -> torch.Tensor:
    """Scale images by a factor, as ComfyUI's ImageScaleBy: each side becomes round(side * scale_by)."""
    image = check_image(image)
    width, height = round(image.shape[-1] * scale_by), round(image.shape[-2] * scale_by)
    return _scale_image(image, width, height, method, "disabled")


@node("LatentScale", version=1, space=SpaceRule(("latent",)), category="latent", outputs={"latent": LATENT},
      reference="ComfyUI LatentUpscale (comfy.utils.common_upscale, bislerp)")
def latent_scale(
    latent: Latent,
    width: Annotated[_Side, Field(description="target width in image pixels (at least 64); 0 = from the height and the aspect")] = 512,
    height: Annotated[_Side, Field(description="target height in image pixels (at least 64); 0 = from the width and the aspect")] = 512,
    method: Annotated[LatentMethod, Field(description="torch interpolate mode, or bislerp (slerp between neighbours)")] = "nearest-exact",
    crop: Annotated[Crop, Field(description="center: cut the latent to the target's aspect first")] = "disabled",
):
    """Scale latents to an image size, as ComfyUI's LatentUpscale does (e.g. for a hires-fix pass).

    Sides are image pixels, at least 64, divided by the VAE factor (8) and floored; a 0 side
    follows the aspect (rounded), both 0 returns the latent unchanged. "bislerp" interpolates
    each latent vector's direction spherically and its length linearly. The result is a plain
    latent: inpainting conditioning from InpaintModelConditioning does not carry over.
    """
    if width == 0 and height == 0:
        return latent
    samples = latent.samples
    w, h = latent_size_rule(samples.shape[-1], samples.shape[-2], width, height, latent.vae_scale_factor)
    return _scale_latent(latent, w, h, method, crop)


@node("LatentScaleBy", version=1, space=SpaceRule(("latent",)), category="latent", outputs={"latent": LATENT},
      reference="ComfyUI LatentUpscaleBy (comfy.utils.common_upscale, bislerp)")
def latent_scale_by(
    latent: Latent,
    scale_by: _Scale = 1.5,
    method: Annotated[LatentMethod, Field(description="as in LatentScale")] = "nearest-exact",
):
    """Scale latents by a factor, as ComfyUI's LatentUpscaleBy: each latent side becomes round(side * scale_by)."""
    samples = latent.samples
    w, h = round(samples.shape[-1] * scale_by), round(samples.shape[-2] * scale_by)
    return _scale_latent(latent, w, h, method, "disabled")
