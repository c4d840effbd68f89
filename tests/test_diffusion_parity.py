"""Our samplers against diffusers' pipelines on tiny random SD 1.x models (fp32, CPU).

Same seed, same initial noise, same image latents on both sides; final latents must agree within 1e-4.
Differential diffusion is checked against a fresh, plain implementation of docs/design.md §4.5 written here.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nodegraph.nodes import denoise
from nodegraph.nodes.conditioning import encode_prompt
from nodegraph.nodes.latent import Latents, empty_latent, encode_pixels, inpaint_conditioning

TOL = 1e-4
PROMPT = "a stone castle on a hill and the sea"
NEGATIVE = "blurry"
SCHEDULERS = {
    "euler": ("EulerDiscreteScheduler", {}),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True, "algorithm_type": "dpmsolver++"}),
    "ddim": ("DDIMScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
}
TWO = ["euler", "dpmpp_2m_karras"]


def diffusers_scheduler(name, config):
    import diffusers

    cls, kwargs = SCHEDULERS[name]
    return getattr(diffusers, cls).from_config(config, **kwargs)


def pipeline(cls_name, handles, scheduler):
    import diffusers

    model, clip, vae = handles
    pipe = getattr(diffusers, cls_name)(vae=vae.vae, text_encoder=clip.text_encoder, tokenizer=clip.tokenizer,
                                        unet=model.unet, scheduler=diffusers_scheduler(scheduler, model.scheduler_config),
                                        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def photo(height=64, width=64, seed=0):
    """A smooth synthetic image in [0, 1] (no file needed for the arithmetic tests)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, height // 16, width // 16, generator=g)
    return F.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False).clamp(0, 1)


def centre_mask(height=64, width=64, soft=True):
    """1 = repaint in the centre; soft values on the border test the 0.5 binarisation."""
    mask = torch.zeros(1, 1, height, width)
    mask[..., height // 4: 3 * height // 4, width // 4: 3 * width // 4] = 1.0
    if soft:
        mask[..., height // 4 - 4: height // 4, :] = 0.3
        mask[..., :, 3 * width // 4: 3 * width // 4 + 4] = 0.7
    return mask


def embeds(pipe, negative=None):
    return pipe.encode_prompt(PROMPT, "cpu", 1, True, negative_prompt=negative)


def assert_close(ours, ref):
    assert ours.shape == ref.shape
    assert torch.isfinite(ref).all()
    diff = (ours.float() - ref.float()).abs().max().item()
    assert diff <= TOL, f"max |ours - diffusers| = {diff}"


@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
def test_text2img_matches_stable_diffusion_pipeline(sd, scheduler):
    model, clip, _ = sd
    pipe = pipeline("StableDiffusionPipeline", sd, scheduler)
    pos = encode_prompt(clip, PROMPT)
    ours = denoise.sample(model, pos, None, empty_latent(64, 48), seed=3, steps=3, guidance_scale=7.5,
                          scheduler=scheduler, strength=1.0)
    generator = torch.Generator("cpu").manual_seed(3)
    noise = torch.randn((1, 4, 6, 8), generator=generator)  # the pipeline gets the same noise and generator state
    pe, ne = embeds(pipe)
    ref = pipe(prompt_embeds=pe, negative_prompt_embeds=ne, latents=noise, generator=generator, num_inference_steps=3,
               height=48, width=64, guidance_scale=7.5, output_type="latent").images
    assert_close(ours, ref)


def test_text2img_negative_prompt_and_batch(sd):
    model, clip, _ = sd
    pipe = pipeline("StableDiffusionPipeline", sd, "euler")
    pos, neg = encode_prompt(clip, PROMPT), encode_prompt(clip, NEGATIVE)
    ours = denoise.sample(model, pos, neg, empty_latent(64, 64, batch=2), seed=11, steps=3, guidance_scale=5.0,
                          scheduler="euler", strength=1.0)
    ref = pipe(prompt=PROMPT, negative_prompt=NEGATIVE, num_images_per_prompt=2, generator=torch.Generator().manual_seed(11),
               num_inference_steps=3, height=64, width=64, guidance_scale=5.0, output_type="latent").images
    assert_close(ours, ref)
    # the negative prompt matters: without it the result differs
    plain = denoise.sample(model, pos, None, empty_latent(64, 64, batch=2), seed=11, steps=3, guidance_scale=5.0,
                           scheduler="euler", strength=1.0)
    assert (plain - ours).abs().max() > 1e-3


def test_no_guidance_matches_pipeline(sd):
    model, clip, _ = sd
    pipe = pipeline("StableDiffusionPipeline", sd, "ddim")
    ours = denoise.sample(model, encode_prompt(clip, PROMPT), None, empty_latent(64, 64), seed=2, steps=3,
                          guidance_scale=1.0, scheduler="ddim", strength=1.0)
    ref = pipe(prompt=PROMPT, generator=torch.Generator().manual_seed(2), num_inference_steps=3, height=64, width=64,
               guidance_scale=1.0, output_type="latent").images
    assert_close(ours, ref)


@pytest.mark.parametrize("scheduler", TWO + ["euler_a", "unipc"])
@pytest.mark.parametrize("strength", [1.0, 0.6])
def test_img2img_matches_img2img_pipeline(sd, scheduler, strength):
    model, clip, vae = sd
    pipe = pipeline("StableDiffusionImg2ImgPipeline", sd, scheduler)
    x0 = encode_pixels(vae, photo())
    ours = denoise.sample(model, encode_prompt(clip, PROMPT), None, Latents(x0), seed=5, steps=4, guidance_scale=7.5,
                          scheduler=scheduler, strength=strength)
    pe, ne = embeds(pipe)
    ref = pipe(prompt_embeds=pe, negative_prompt_embeds=ne, image=x0, strength=strength,
               generator=torch.Generator("cpu").manual_seed(5), num_inference_steps=4, guidance_scale=7.5,
               output_type="latent").images
    assert_close(ours, ref)


@pytest.mark.parametrize("scheduler", TWO + ["ddim"])
@pytest.mark.parametrize("strength", [1.0, 0.6])
def test_latent_blend_matches_inpaint_pipeline_4ch(sd, scheduler, strength):
    model, clip, vae = sd
    pipe = pipeline("StableDiffusionInpaintPipeline", sd, scheduler)
    x0 = encode_pixels(vae, photo(seed=1))
    mask = centre_mask()
    ours = denoise.blend_inpaint(model, encode_prompt(clip, PROMPT), None, Latents(x0), mask, seed=7, steps=4,
                                 guidance_scale=7.5, scheduler=scheduler, strength=strength)
    pe, ne = embeds(pipe)
    # image latents go in directly; masked_image_latents is unused by a 4-channel UNet but must be given
    ref = pipe(prompt_embeds=pe, negative_prompt_embeds=ne, image=x0, mask_image=mask, masked_image_latents=x0,
               height=64, width=64, strength=strength, generator=torch.Generator("cpu").manual_seed(7),
               num_inference_steps=4, guidance_scale=7.5, output_type="latent").images
    assert_close(ours, ref)
    # outside the mask the result is the original latent exactly (clean x0 after the last step)
    keep = F.interpolate((mask >= 0.5).float(), size=(8, 8)) == 0
    assert torch.equal(ours[keep.expand_as(ours)], x0[keep.expand_as(x0)])


@pytest.mark.parametrize("scheduler", TWO)
@pytest.mark.parametrize("strength", [1.0, 0.6])
def test_inpainting_checkpoint_matches_inpaint_pipeline_9ch(sd_inpaint, scheduler, strength):
    model, clip, vae = sd_inpaint
    assert model.inpainting
    pipe = pipeline("StableDiffusionInpaintPipeline", sd_inpaint, scheduler)
    image, mask = photo(seed=2), centre_mask()
    latents = inpaint_conditioning(vae, image, mask)
    ours = denoise.sample(model, encode_prompt(clip, PROMPT), None, latents, seed=9, steps=4, guidance_scale=7.5,
                          scheduler=scheduler, strength=strength)
    pe, ne = embeds(pipe)
    ref = pipe(prompt_embeds=pe, negative_prompt_embeds=ne, image=latents.samples, mask_image=mask,
               masked_image_latents=latents.masked_image_latents, height=64, width=64, strength=strength,
               generator=torch.Generator("cpu").manual_seed(9), num_inference_steps=4, guidance_scale=7.5,
               output_type="latent").images
    assert_close(ours, ref)


def test_inpaint_conditioning_matches_pipeline_mask_latents(sd_inpaint):
    """Mask at latent size and masked-image latents as diffusers prepares them from pixels."""
    model, clip, vae = sd_inpaint
    pipe = pipeline("StableDiffusionInpaintPipeline", sd_inpaint, "euler")
    image, mask = photo(seed=3), centre_mask()
    ours = inpaint_conditioning(vae, image, mask, mode="sample", seed=4)
    init_image = pipe.image_processor.preprocess(image, height=64, width=64)
    mask_condition = pipe.mask_processor.preprocess(mask, height=64, width=64)
    ref_mask, ref_masked = pipe.prepare_mask_latents(mask_condition, init_image * (mask_condition < 0.5), 1, 64, 64,
                                                     torch.float32, "cpu", torch.Generator().manual_seed(4), False)
    assert torch.equal(ours.inpaint_mask, ref_mask)
    assert_close(ours.masked_image_latents, ref_masked)


# ---------------------------------------------------------------------------------------------- differential

def reference_differential(unet, make_scheduler, x0, noise, change, cond, guidance, steps, strength):
    """docs/design.md §4.5 written out plainly: O[i] = add_noise(x0, eps, t_i); start at O[0]; before step i >= 1
    reset pixels with (1 - c) > i/N to O[i]. c is averaged over each 8x8 footprint."""
    scheduler = make_scheduler()
    scheduler.set_timesteps(steps)
    t_start = steps - min(int(steps * strength), steps)
    timesteps = scheduler.timesteps[t_start * scheduler.order:]
    if hasattr(scheduler, "set_begin_index"):  # sigma schedulers; DDIM indexes by timestep
        scheduler.set_begin_index(t_start * scheduler.order)
    noiser = make_scheduler()  # a second scheduler, no begin index: add_noise looks each t_i up itself
    noiser.set_timesteps(steps)
    originals = [noiser.add_noise(x0, noise, t.reshape(1)) for t in timesteps]
    keep = 1 - F.avg_pool2d(change, 8)
    total = len(timesteps)
    x = originals[0]
    with torch.no_grad():
        for i, t in enumerate(timesteps):
            if i >= 1:
                reset = (keep > i / total).float()
                x = originals[i] * reset + x * (1 - reset)
            eps = unet(scheduler.scale_model_input(torch.cat([x, x]), t), t, encoder_hidden_states=cond).sample
            uncond, text = eps.chunk(2)
            x = scheduler.step(uncond + guidance * (text - uncond), t, x).prev_sample
    return x


@pytest.mark.parametrize("scheduler", TWO + ["ddim"])
@pytest.mark.parametrize("strength", [1.0, 0.6])
def test_differential_matches_plain_reimplementation(sd, scheduler, strength):
    model, clip, vae = sd
    x0 = encode_pixels(vae, photo(seed=4))
    # 8x8 blocks of change 0, 1/4, ..., 1 (exact thresholds i/N with N = 4 or 2 steps) and a soft ramp
    levels = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0, 0.5, 0.25, 0.0])
    change = levels.repeat_interleave(8).repeat(64, 1)[None, None].clone()
    change[..., 48:, :] = torch.linspace(0, 1, 64)
    pos = encode_prompt(clip, PROMPT)
    ours = denoise.differential(model, pos, None, Latents(x0), change, seed=13, steps=4, guidance_scale=6.0,
                                scheduler=scheduler, strength=strength)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(13))
    cond = torch.cat([pos.uncond.embeds, pos.embeds])
    ref = reference_differential(model.unet, lambda: diffusers_scheduler(scheduler, model.scheduler_config), x0,
                                 noise, change, cond, 6.0, 4, strength)
    assert_close(ours, ref)


def test_differential_with_full_change_is_img2img(sd):
    """c = 1 everywhere: nothing is ever reset, so it is exactly img2img from the same noise."""
    model, clip, vae = sd
    x0 = encode_pixels(vae, photo(seed=5))
    pos = encode_prompt(clip, PROMPT)
    kwargs = dict(seed=21, steps=5, guidance_scale=7.5, scheduler="euler", strength=0.8)
    diff = denoise.differential(model, pos, None, Latents(x0), torch.ones(1, 1, 64, 64), **kwargs)
    img2img = denoise.sample(model, pos, None, Latents(x0), **kwargs)
    assert torch.equal(diff, img2img)
    # and a zero change map keeps the result close to the original, unlike img2img
    kept = denoise.differential(model, pos, None, Latents(x0), torch.zeros(1, 1, 64, 64), **kwargs)
    assert (kept - x0).abs().mean() < (img2img - x0).abs().mean()
