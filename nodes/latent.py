"""The LATENT value and the nodes that make and read it: EmptyLatent, VAEEncode, VAEDecode,
InpaintModelConditioning.

LATENT ``samples`` are already multiplied by the VAE's scaling factor (0.18215 for SD 1.x/2.x, 0.13025 for
SDXL), as
diffusers keeps latents between ``vae.encode`` and the UNet; VAEDecode divides it out again. Pixel
sizes must be multiples of the VAE factor (8): images of other sizes are an error rather than silently
resized, so that later crops and overlays line up.

The diffusers img2img and inpaint pipelines draw the VAE sample of the image from the caller's generator
before the initial noise. VAEEncode / InpaintModelConditioning mode "sampler" reproduces that: the LATENT
holds the posterior's mean in ``samples`` and its std in ``sample_std`` (``masked_image_std``), and the
sampler draws from its own seeded generator in the pipeline's order (``nodes.denoise.prepare``).
"""
from __future__ import annotations

from nodegraph.lazy import lazy

from dataclasses import dataclass, replace
from typing import Annotated, Literal, Optional

torch = lazy("torch")
F = lazy("torch.nn.functional")
from pydantic import Field

from nodegraph.context import RunContext
from nodegraph.errors import NodeError
from nodegraph.limits import current_limits
from nodegraph import node
from nodegraph.serialize import disk_cacheable
from nodegraph.sockets import IMAGE, LATENT, MASK, Image, Latent, Mask, SpaceRule, Vae

from ._memory import compute_device, on_device, tiled
from ._params import Seed
from ._families import family, space_mismatch
from ._pixels import match_batches

LATENT_FACTOR = 8  # SD 1.x/2.x/XL VAEs downsample by 8 (4 blocks, 3 downsamples)
LATENT_CHANNELS = 4


@disk_cacheable
@dataclass
class Latents:
    """LATENT: (B, C, H/8, W/8) latents, scaled by the VAE's scaling factor."""

    samples: torch.Tensor
    vae_scale_factor: int = LATENT_FACTOR
    empty: bool = False  # made by EmptyLatent: samplers start text2img from pure noise
    # Inpainting-UNet conditioning (InpaintModelConditioning): mask at latent size and masked-image latents.
    inpaint_mask: Optional[torch.Tensor] = None
    masked_image_latents: Optional[torch.Tensor] = None
    # Mode "sampler": the VAE posterior's std, scaled like the latents, which then hold its mean. The sampler
    # draws mean + std * eps from its own seeded generator, where the diffusers pipeline draws it.
    sample_std: Optional[torch.Tensor] = None
    masked_image_std: Optional[torch.Tensor] = None
    # The latent space (a Family's ``space``: "Stable Diffusion", "Kandinsky 2.2 MoVQ"); None for an EmptyLatent,
    # which fits any. Samplers and VAEDecode refuse a latent of another space.
    space: Optional[str] = None

    @property
    def pixel_size(self) -> tuple[int, int]:
        """(height, width) in pixels."""
        return self.samples.shape[-2] * self.vae_scale_factor, self.samples.shape[-1] * self.vae_scale_factor

    @property
    def has_inpaint_conditioning(self) -> bool:
        return self.inpaint_mask is not None and self.masked_image_latents is not None

    def with_samples(self, samples: torch.Tensor, keep_inpaint: bool = False, space: Optional[str] = None) -> "Latents":
        """A plain latent holding ``samples`` (in ``space``, default this latent's); ``keep_inpaint`` keeps the
        inpainting-model conditioning (a partly denoised result that an inpainting model continues with
        denoising_start), its masked-image latents fixed at the posterior's mean."""
        plain = replace(self, samples=samples, empty=False, sample_std=None, masked_image_std=None,
                        space=space or self.space)
        return plain if keep_inpaint else replace(plain, inpaint_mask=None, masked_image_latents=None)


# ---------------------------------------------------------------------------------------------- arithmetic

def empty_latent(width: int, height: int, batch: int = 1, channels: int = LATENT_CHANNELS,
                 factor: int = LATENT_FACTOR) -> Latents:
    return Latents(torch.zeros(batch, channels, height // factor, width // factor), factor, empty=True)


def _check_image(image: torch.Tensor, factor: int, what: str = "image") -> None:
    if image.ndim != 4 or image.shape[1] != 3:
        raise NodeError(f"{what} must be an IMAGE (B, 3, H, W), got shape {tuple(image.shape)}")
    height, width = image.shape[-2:]
    if height % factor or width % factor:
        raise NodeError(f"{what} is {width}x{height} px; the VAE needs width and height that are multiples of "
                        f"{factor}: resize or crop it first (e.g. to {max(factor, width // factor * factor)}x"
                        f"{max(factor, height // factor * factor)})")


EncodeMode = Literal["mean", "sample", "sampler"]
ENCODE_MODE_HELP = ("mean: the posterior's mean; sample: a draw from seed; sampler: the sampler draws it from its "
                    "own seed where the diffusers pipeline does, so the same seed gives the pipeline's image")


def encode_pixels(vae, image: torch.Tensor, mode: str = "mean", seed: int = 0) -> torch.Tensor:
    """IMAGE in [0, 1] -> scaled latents. ``mode``: "mean" (deterministic) or "sample" (seeded draw); "sampler"
    gives the mean here (``encode_image`` keeps the std for the sampler's draw)."""
    return encode_image(vae, image, mode, seed).samples


def encode_image(vae, image: torch.Tensor, mode: str = "mean", seed: int = 0) -> Latents:
    """IMAGE in [0, 1] -> LATENT; mode "sampler" also carries the posterior's std (``Latents.sample_std``)."""
    _check_image(image, vae.scale_factor)
    samples, std = _encode_signed(vae, image * 2.0 - 1.0, mode, seed)
    return Latents(samples, vae.scale_factor, sample_std=std, space=family(vae.family).space)


def _compute_module(vae):
    """The module to run (a float32 copy for a float16 VAE with force_upcast, like SDXL's)."""
    return vae.compute_module() if hasattr(vae, "compute_module") else vae.vae


def _encode_signed(vae, pixels: torch.Tensor, mode: str, seed: int) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Pixels in [-1, 1] -> scaled latents in the VAE's dtype (computed in float32 when it upcasts), and for mode
    "sampler" the posterior's scaled std in the dtype diffusers draws the sample's noise in."""
    module = _compute_module(vae)
    pixels = pixels.to(device=compute_device(module), dtype=module.dtype)
    with torch.inference_mode(), tiled(module, pixels.shape[0] * pixels.shape[-1] * pixels.shape[-2]):
        encoded = module.encode(pixels)
        dist = getattr(encoded, "latent_dist", None)
        if dist is None:  # a VQ autoencoder (MoVQ): its encoding is deterministic, every mode gives it
            latents, std = encoded.latents, None
        elif mode == "sample":
            latents = dist.sample(generator=torch.Generator("cpu").manual_seed(seed))
        else:
            latents = dist.mode()
        if dist is not None:
            std = (dist.std * vae.scaling_factor).to(_draw_dtype(vae, module)) if mode == "sampler" else None
    latents = latents.to(vae.vae.dtype).clone()  # clone: a normal tensor again, outside inference mode
    if vae.shift_factor is not None:
        latents = latents - vae.shift_factor
    return latents * vae.scaling_factor, None if std is None else std.clone()


def _draw_dtype(vae, module) -> torch.dtype:
    """The dtype diffusers draws a VAE sample in: the VAE's own, or float32 where the SDXL pipelines upcast it
    (force_upcast). The SD 1.x/2.x pipelines encode in float16 even where ``compute_module`` upcasts, and
    CPU ``randn`` gives other values in float16 for sizes that are not multiples of 16."""
    return module.dtype if family(vae.family).upcast_vae_draws() else vae.vae.dtype


def decode_latents(vae, samples: torch.Tensor) -> torch.Tensor:
    """Scaled latents -> IMAGE float32 in [0, 1] (diffusers' decode + postprocess denormalisation).

    A float16 VAE whose config says force_upcast (SDXL's, which overflows in float16) decodes in float32."""
    module = _compute_module(vae)
    z = samples.to(device=compute_device(module), dtype=module.dtype) / vae.scaling_factor
    if vae.shift_factor is not None:
        z = z + vae.shift_factor
    with torch.inference_mode(), tiled(module, z.shape[0] * z.shape[-1] * z.shape[-2] * vae.scale_factor**2):
        pixels = module.decode(z, return_dict=False, **getattr(vae, "decode_kwargs", {}))[0]
    return (pixels * 0.5 + 0.5).clamp(0, 1).float()


def binary_mask(mask: torch.Tensor, pixel_size: tuple[int, int]) -> torch.Tensor:
    """diffusers' mask_processor on a tensor: nearest resize to the pixel size, then 1 where >= 0.5."""
    if mask.ndim != 4 or mask.shape[1] != 1:
        raise NodeError(f"mask must be a MASK (B, 1, H, W), got shape {tuple(mask.shape)}")
    mask = mask.float()
    if tuple(mask.shape[-2:]) != tuple(pixel_size):
        mask = F.interpolate(mask, size=pixel_size)
    return (mask >= 0.5).to(mask.dtype)


def latent_mask(mask: torch.Tensor, latent_size: tuple[int, int], factor: int = LATENT_FACTOR,
                grow: bool = False) -> torch.Tensor:
    """MASK (1 = repaint) -> binary mask at latent size, as StableDiffusionInpaintPipeline.prepare_mask_latents;
    ``grow``: then grown by one latent pixel as Kandinsky 2.2's inpaint pipeline does (``grow_repaint``)."""
    pixel_size = (latent_size[0] * factor, latent_size[1] * factor)
    small = F.interpolate(binary_mask(mask, pixel_size), size=tuple(latent_size))
    return grow_repaint(small) if grow else small


def grow_repaint(repaint: torch.Tensor) -> torch.Tensor:
    """Grow a binary repaint mask (B, 1, h, w) by one pixel towards six of its eight neighbours, as diffusers'
    Kandinsky ``prepare_mask`` does: every repaint pixel also marks the pixels above, left, above-left, below,
    right and below-right of it (not above-right or below-left)."""
    padded = F.pad(repaint, (1, 1, 1, 1))
    h, w = repaint.shape[-2:]
    grown = repaint.clone()
    # the six offsets are their own mirror image, so "marked by a neighbour at (dy, dx)" is the same set
    for dy, dx in ((1, 0), (0, 1), (1, 1), (-1, 0), (0, -1), (-1, -1)):
        grown = torch.maximum(grown, padded[..., 1 + dy:1 + dy + h, 1 + dx:1 + dx + w])
    return grown


def inpaint_conditioning(vae, image: torch.Tensor, mask: torch.Tensor, mode: str = "mean", seed: int = 0) -> Latents:
    """Latents for an inpainting UNet: x0, the mask at latent size and the masked image's latents.

    masked image = image * (mask < 0.5) in [-1, 1] (diffusers' StableDiffusionInpaintPipeline). Mode
    "sampler" keeps both posteriors' std for the sampler's draws."""
    _check_image(image, vae.scale_factor)
    factor = vae.scale_factor
    pixel_size = tuple(image.shape[-2:])
    keep = 1.0 - binary_mask(mask, pixel_size)
    if keep.shape[0] not in (1, image.shape[0]):
        raise NodeError(f"mask batch {keep.shape[0]} does not match image batch {image.shape[0]}")
    signed = image * 2.0 - 1.0
    kind = family(vae.family)
    x0, x0_std = _encode_signed(vae, signed, mode, seed)
    latent_size = (pixel_size[0] // factor, pixel_size[1] // factor)
    small = latent_mask(mask, latent_size, factor, grow=kind.latent_space_masking).to(x0.device, x0.dtype)
    if kind.latent_space_masking:  # Kandinsky 2.2: the image's latents with the (grown) mask area zeroed
        masked, masked_std = x0 * (1 - small), None
    else:
        masked, masked_std = _encode_signed(vae, signed * keep.to(signed.device), mode, seed)  # masked pixels: 0 (grey)
    return Latents(x0, factor, inpaint_mask=small, masked_image_latents=masked,
                   sample_std=x0_std, masked_image_std=masked_std, space=kind.space)


# ---------------------------------------------------------------------------------------------- nodes

def _check_size(params: dict):
    for name in ("width", "height"):
        value = params.get(name)
        if isinstance(value, int) and value % LATENT_FACTOR:
            yield name, (f"must be a multiple of {LATENT_FACTOR} (the VAE's factor); try "
                         f"{max(LATENT_FACTOR, round(value / LATENT_FACTOR) * LATENT_FACTOR)}")
    sizes = [params.get(name) for name in ("width", "height", "batch")]
    if all(isinstance(v, int) for v in sizes):
        too_big = current_limits().pixels_problem(*sizes)
        if too_big:
            yield "width", f"the image to make: {too_big}"


@node("EmptyLatent", version=1, category="latent", outputs={"latent": LATENT}, check=_check_size,
      reference="diffusers prepare_latents (text2img)")
def empty_latent_node(
    width: Annotated[int, Field(ge=8, le=16384, description="pixels, a multiple of 8")] = 512,
    height: Annotated[int, Field(ge=8, le=16384, description="pixels, a multiple of 8")] = 512,
    batch: Annotated[int, Field(ge=1, le=64, description="images made at once (each with its own noise)")] = 1,
):
    """An empty latent of width x height pixels: samplers start text2img from pure noise on it."""
    # linked sizes skip the validation check; without this one a 63 px width would silently become 56
    sizes = {"width": width, "height": height}
    problems = [f"param '{name}' = {sizes[name]}: {message}" for name, message in _check_size(sizes)]
    if problems:
        raise NodeError("; ".join(problems))
    current_limits().check_pixels(width, height, batch, "the image to make")
    return empty_latent(width, height, batch)


@node("VAEEncode", version=1, space=SpaceRule(("vae", "latent")), category="latent", outputs={"latent": LATENT},
      reference="diffusers AutoencoderKL.encode * scaling_factor (float32 when force_upcast, as the SDXL pipelines)")
def vae_encode_node(
    vae: Vae,
    image: Image,
    mode: Annotated[EncodeMode, Field(description=ENCODE_MODE_HELP)] = "mean",
    seed: Annotated[Seed, Field(description="only for mode 'sample'")] = 0,
    ctx: RunContext = None,
):
    """Encode an image into scaled latents (the distribution's mean by default; a seeded sample on request).

    Mode "sampler" leaves the draw to the sampler, which makes it from its own seed before the noise, as the
    diffusers img2img and inpaint pipelines do: the same seed then gives the pipeline's image. A float16 VAE
    whose config says force_upcast (SDXL's) runs in float32, as diffusers does."""
    with on_device(ctx, ("vae", vae.compute_module())):
        return encode_image(vae, image, mode, seed)


@node("VAEDecode", version=1, space=SpaceRule(("vae", "latent")), category="latent", outputs={"image": IMAGE},
      reference="diffusers AutoencoderKL.decode(latents / scaling_factor) + VaeImageProcessor.postprocess "
                "(float32 when force_upcast, as the SDXL pipelines)")
def vae_decode_node(vae: Vae, latent: Latent, ctx: RunContext = None):
    """Decode latents into an image in [0, 1].

    A float16 VAE whose config says force_upcast (SDXL's, which overflows in float16) runs in float32."""
    samples = latent.samples
    mismatch = space_mismatch(latent.space, family(vae.family).space, "this VAE")
    if mismatch:
        raise NodeError(mismatch)
    if samples.shape[1] != vae.latent_channels:
        raise NodeError(f"latent has {samples.shape[1]} channels but this VAE expects {vae.latent_channels}")
    with on_device(ctx, ("vae", vae.compute_module())):
        pixels = decode_latents(vae, samples)
    if not torch.isfinite(pixels).all():  # saved as it is, NaN would be a black image and no word of why
        raise NodeError("the VAE decoded to NaN or infinite values (a float16 overflow, or damaged weights); run in "
                        "float32 (--dtype float32) or use a VAE made for float16")
    return pixels


@node("InpaintModelConditioning", version=1, space=SpaceRule(("vae", "latent")), category="latent", outputs={"latent": LATENT},
      reference="diffusers StableDiffusionInpaintPipeline.prepare_mask_latents (9-channel UNet)")
def inpaint_model_conditioning_node(
    vae: Vae,
    image: Image,
    mask: Mask,
    mode: Annotated[EncodeMode, Field(description=ENCODE_MODE_HELP)] = "mean",
    seed: Annotated[Seed, Field(description="only for mode 'sample'")] = 0,
    ctx: RunContext = None,
):
    """Latents for an inpainting checkpoint (9-channel UNet): the image, the mask and the masked image.

    Feed the result to Sampler with the inpainting model: each step the UNet sees
    cat([x, mask, masked_image_latents]); masked image = image * (mask < 0.5), mask 1 = repaint. Mode
    "sampler" leaves both VAE draws to the sampler, which makes them where StableDiffusion(XL)InpaintPipeline
    does (image, noise, masked image), so the same seed gives the pipeline's image."""
    with on_device(ctx, ("vae", vae.compute_module())):
        return inpaint_conditioning(vae, image, mask, mode, seed)


def grey_masked(image: torch.Tensor, mask: torch.Tensor, grow_by: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ComfyUI's VAEEncodeForInpaint before the encode: the mask resized (bilinear) to the image, the pixels
    under its rounded value set to grey 0.5, and the noise mask: the rounded mask grown by a ``grow_by`` x
    ``grow_by`` box (padding ceil((grow_by - 1) / 2), so an even box reaches one pixel further up and left)."""
    import math

    if mask.ndim != 4 or mask.shape[1] != 1:
        raise NodeError(f"mask must be a MASK (B, 1, H, W), got shape {tuple(mask.shape)}")
    match_batches(image, mask, names=("image", "mask"))  # only refuses batches that differ; broadcasting stays ComfyUI's
    size = tuple(image.shape[-2:])
    mask = F.interpolate(mask.float(), size=size, mode="bilinear")
    hard = mask.round()
    grown = mask
    if grow_by > 0:
        box = torch.ones((1, 1, grow_by, grow_by), dtype=hard.dtype)
        grown = F.conv2d(hard, box, padding=math.ceil((grow_by - 1) / 2)).clamp(0, 1)[..., :size[0], :size[1]]
    grey = (image - 0.5) * (1.0 - hard).to(image.device) + 0.5
    return grey, grown.round()


@node("VAEEncodeForInpaint", version=1, space=SpaceRule(("vae", "latent")), category="latent", outputs={"latent": LATENT, "mask": MASK},
      reference="ComfyUI VAEEncodeForInpaint (grey masked pixels, noise mask grown by a box)")
def vae_encode_for_inpaint_node(
    vae: Vae,
    image: Image,
    mask: Mask,
    grow_mask_by: Annotated[int, Field(ge=0, le=64, description="grow the returned mask by this box size in "
                                                                "pixels (ComfyUI's grow_mask_by)")] = 6,
    ctx: RunContext = None,
):
    """Encode an image for inpainting, as ComfyUI does: masked pixels become grey.

    Pixels where the mask rounds to 1 are set to 0.5 before the encode, so the sampler does not see what
    was there; the mask output is the rounded mask grown by grow_mask_by, for LatentBlendSampler (ComfyUI's
    noise_mask). For an inpainting checkpoint the latent also carries the UNet's extra channels as ComfyUI
    makes them from such a latent: the grown mask resized (bilinear) to the latent and rounded, and the latent
    itself as the masked image. The image's sides must be multiples of 8 (ComfyUI crops them; resize or crop
    first)."""
    grey, grown = grey_masked(image, mask, grow_mask_by)
    with on_device(ctx, ("vae", vae.compute_module())):
        latent = encode_image(vae, grey)
    small = F.interpolate(grown, size=tuple(latent.samples.shape[-2:]), mode="bilinear").round()
    latent = replace(latent, inpaint_mask=small.to(latent.samples.device, latent.samples.dtype),
                     masked_image_latents=latent.samples)
    return {"latent": latent, "mask": grown}
