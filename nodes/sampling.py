"""Sampler nodes: Sampler (text2img / img2img / inpainting checkpoint), LatentBlendSampler, DifferentialSampler.

Thin wrappers over ``nodes.denoise``; they share one loop. Steps are reported to the run's progress,
which also stops between steps on interrupt. A negative conditioning is optional: without one the
sampler uses the default negative carried by the positive conditioning (the empty prompt's embedding;
zeros for SDXL), as diffusers does. SD 1.x/2.x and SDXL models go through the same nodes.

Refiner hand-off (docs/design.md §4.9; diffusers' denoising_start / denoising_end): a sampler with
``denoising_end`` 0.8 stops at 80 % of the schedule and returns still noisy latents; a sampler (e.g. with
the SDXL refiner) with ``denoising_start`` 0.8 and the same steps and scheduler finishes them.
"""
from __future__ import annotations

from typing import Annotated, Optional

from pydantic import Field

from nodegraph.context import RunContext
from nodegraph import node
from nodegraph.sockets import LATENT, Conditioning, Latent, Mask, Model, SpaceRule

from . import denoise
from ._memory import on_device
from ._params import DenoisingEnd, DenoisingStart, EndStep, Guidance, Seed, StartStep, Steps, Strength
from .schedulers import SchedulerName

SCHEDULER_HELP = ("diffusers scheduler by its usual UI name; a suffix picks the sigmas (_karras, _exponential) or "
                  "the timestep spacing (_linspace, _trailing); docs/comfy.md")


# the model, its conditioning and the latent must share one latent space; the result stays in it
SAMPLER_SPACE = SpaceRule(("model", "positive", "negative", "latent"))


def _check_fractions(params: dict):
    stepped = [n for n in ("start_step", "end_step") if isinstance(params.get(n), int) and params[n] > 0]
    for name, off in (("strength", 1.0), ("denoising_start", 0.0), ("denoising_end", 1.0)):
        if stepped and isinstance(params.get(name), (int, float)) and params[name] != off:
            yield name, f"give either {stepped[0]} or {name}, not both (both choose the steps to run)"
    start, end = params.get("start_step"), params.get("end_step")
    if isinstance(start, int) and isinstance(end, int) and end > 0 and start >= end:
        yield "start_step", f"must be below end_step ({end})"
    if "denoising_start" not in params or "denoising_end" not in params:
        return  # one comes through a link
    start, end = params["denoising_start"], params["denoising_end"]
    if isinstance(start, (int, float)) and isinstance(end, (int, float)) and 0 < start and end < 1 and start >= end:
        yield "denoising_start", f"must be below denoising_end ({end})"


def _record(ctx: RunContext, **facts) -> None:
    ctx.record("samplers", facts)


@node("Sampler", version=1, space=SAMPLER_SPACE, category="sampling", outputs={"latent": LATENT}, check=_check_fractions,
      reference="diffusers StableDiffusion(XL)Pipeline / StableDiffusion(XL)Img2ImgPipeline / "
                "StableDiffusion(XL)InpaintPipeline (9-channel UNet)")
def sampler_node(
    model: Model,
    positive: Conditioning,
    latent: Latent,
    ctx: RunContext,
    negative: Optional[Conditioning] = None,
    seed: Seed = 0,
    steps: Steps = 25,
    guidance_scale: Guidance = 7.5,
    scheduler: Annotated[SchedulerName, Field(description=SCHEDULER_HELP)] = "euler",
    strength: Strength = 1.0,
    denoising_start: DenoisingStart = 0.0,
    denoising_end: DenoisingEnd = 1.0,
    start_step: StartStep = 0,
    end_step: EndStep = 0,
    add_noise: Annotated[bool, Field(description="noise an image latent before the first step; off: continue a "
                                                 "noisy latent as it is (ComfyUI's add_noise)")] = True,
):
    """Denoise a latent: text2img from an EmptyLatent, img2img from an image latent (strength < 1 keeps more).

    With an inpainting checkpoint (9-channel UNet) the latent must come from InpaintModelConditioning;
    the UNet then sees cat([x, mask, masked_image_latents]) at every step (diffusers'
    StableDiffusionInpaintPipeline). SDXL models get their pooled embedding and time ids. Hand-off:
    denoising_end < 1 stops early (noisy latent out, inpainting conditioning kept); denoising_start > 0
    continues such a latent, e.g. with the SDXL refiner. The same by step number (ComfyUI's KSamplerAdvanced):
    start_step / end_step run only those steps of the schedule, add_noise off takes the latent as it is. Arithmetic and noise match diffusers for the same seed;
    for a photo, encode it with mode "sampler" and the sampler also draws its VAE sample(s) where the pipeline does."""
    _record(ctx, seed=seed, steps=steps, scheduler=scheduler, strength=strength, guidance_scale=guidance_scale,
            denoising_start=denoising_start, denoising_end=denoising_end, start_step=start_step, end_step=end_step,
            add_noise=add_noise)
    with on_device(ctx, *model.modules()):
        samples = denoise.sample(model, positive, negative, latent, seed=seed, steps=steps, guidance_scale=guidance_scale,
                                 scheduler=scheduler, strength=strength, denoising_start=denoising_start,
                                 denoising_end=denoising_end, start_step=start_step, end_step=end_step,
                                 add_noise=add_noise, progress=ctx.progress)
    stopped = denoising_end < 1 or 0 < end_step < steps
    return latent.with_samples(samples.float(), keep_inpaint=stopped and model.inpainting, space=model.kind.space)


@node("LatentBlendSampler", version=1, space=SAMPLER_SPACE, category="sampling", outputs={"latent": LATENT}, check=_check_fractions,
      reference="diffusers StableDiffusion(XL)InpaintPipeline with a 4-channel UNet (the latent-blending article)")
def latent_blend_sampler_node(
    model: Model,
    positive: Conditioning,
    latent: Latent,
    mask: Mask,
    ctx: RunContext,
    negative: Optional[Conditioning] = None,
    seed: Seed = 0,
    steps: Steps = 25,
    guidance_scale: Guidance = 7.5,
    scheduler: Annotated[SchedulerName, Field(description=SCHEDULER_HELP)] = "euler",
    strength: Strength = 1.0,
    denoising_start: DenoisingStart = 0.0,
    denoising_end: DenoisingEnd = 1.0,
):
    """Inpaint with a normal checkpoint: after each step the unmasked latents are replaced by the original
    noised to the next timestep (the latent-blending article), so only the mask (1 = repaint) changes.

    The mask is binarised at 0.5 and resized to latent size (nearest), as diffusers does. Strength 1
    starts the masked area from pure noise; lower strength starts from the noised original. Hand-off as
    in Sampler: with denoising_start the given latent is continued and blended back outside the mask
    (StableDiffusionXLInpaintPipeline with a refiner). A photo encoded with VAEEncode mode "sampler" gives
    StableDiffusion(XL)InpaintPipeline's result for the same seed (its VAE draws are made in the pipeline's order).
    An inpainting checkpoint takes the latent of InpaintModelConditioning and is blended the same way
    (ComfyUI's InpaintModelConditioning with noise_mask)."""
    _record(ctx, seed=seed, steps=steps, scheduler=scheduler, strength=strength, guidance_scale=guidance_scale,
            denoising_start=denoising_start, denoising_end=denoising_end)
    with on_device(ctx, *model.modules()):
        samples = denoise.blend_inpaint(model, positive, negative, latent, mask, seed=seed, steps=steps,
                                        guidance_scale=guidance_scale, scheduler=scheduler, strength=strength,
                                        denoising_start=denoising_start, denoising_end=denoising_end,
                                        progress=ctx.progress)
    return latent.with_samples(samples.float(), space=model.kind.space)


@node("DifferentialSampler", version=1, space=SAMPLER_SPACE, category="sampling", outputs={"latent": LATENT},
      reference="differential diffusion (the outpainting article; diffusers community "
                "pipeline_stable_diffusion_xl_differential_img2img, whose map is 1 - change_map)")
def differential_sampler_node(
    model: Model,
    positive: Conditioning,
    latent: Latent,
    change_map: Mask,
    ctx: RunContext,
    negative: Optional[Conditioning] = None,
    seed: Seed = 0,
    steps: Steps = 25,
    guidance_scale: Guidance = 7.5,
    scheduler: Annotated[SchedulerName, Field(description=SCHEDULER_HELP)] = "euler",
    strength: Strength = 1.0,
    denoising_end: DenoisingEnd = 1.0,
):
    """Differential diffusion: a soft change map says how much each pixel may change.

    change_map is a MASK (1 = change fully, 0 = keep, 0.3 = change a little); the outpainting article's map is
    the opposite (white = keep), converted here. A pixel with change c follows the noised original and is
    free only for the last c*N of the N steps. The map is averaged to latent size. Works the same on SDXL
    (the outpainting article). denoising_end < 1 stops early for a hand-off (thresholds still count all N steps)."""
    _record(ctx, seed=seed, steps=steps, scheduler=scheduler, strength=strength, guidance_scale=guidance_scale,
            denoising_end=denoising_end)
    with on_device(ctx, *model.modules()):
        samples = denoise.differential(model, positive, negative, latent, change_map, seed=seed, steps=steps,
                                       guidance_scale=guidance_scale, scheduler=scheduler, strength=strength,
                                       denoising_end=denoising_end, progress=ctx.progress)
    return latent.with_samples(samples.float(), space=model.kind.space)
