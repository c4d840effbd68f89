"""Our samplers on SDXL against diffusers' SDXL pipelines on tiny random models (fp32, CPU).

Same seed, same initial noise, same image latents on both sides; final latents must agree within 1e-4.
The pipelines get prompts (not our embeddings), so the SDXL prompt encoding, the zero default negative
and the time ids are checked along with the loop. Differential diffusion is checked against a fresh,
plain implementation of docs/design.md §4.5 written here, with SDXL's added conditioning made by hand.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nodegraph.nodes import denoise
from nodegraph.nodes.conditioning import encode_prompt, with_size
from nodegraph.nodes.latent import Latents, empty_latent, encode_pixels, inpaint_conditioning
from tests.test_diffusion_parity import assert_close, centre_mask, diffusers_scheduler, photo

PROMPT = "a stone castle on a hill and the sea"
NEGATIVE = "blurry"
TWO = ["euler", "dpmpp_2m_karras"]


def pipeline(cls_name, handles, scheduler, **config):
    import diffusers

    model, clip, vae = handles
    pipe = getattr(diffusers, cls_name)(
        vae=vae.vae, text_encoder=clip.text_encoder, text_encoder_2=clip.text_encoder_2, tokenizer=clip.tokenizer,
        tokenizer_2=clip.tokenizer_2, unet=model.unet, scheduler=diffusers_scheduler(scheduler, model.scheduler_config),
        **config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def refiner_pipeline(handles, scheduler):
    return pipeline("StableDiffusionXLImg2ImgPipeline", handles, scheduler, requires_aesthetics_score=True,
                    force_zeros_for_empty_prompt=False)


def gen(seed):
    return torch.Generator("cpu").manual_seed(seed)


# ---------------------------------------------------------------------------------------------- prompts

def test_prompt_encoding_matches_encode_prompt(xl):
    model, clip, _ = xl
    pipe = pipeline("StableDiffusionXLPipeline", xl, "euler")
    pos = encode_prompt(clip, PROMPT)
    pe, ne, pp, npp = pipe.encode_prompt(PROMPT, device="cpu", num_images_per_prompt=1,
                                         do_classifier_free_guidance=True)
    assert pos.embeds.shape == (1, 77, 80) and pos.pooled.shape == (1, 40)
    assert torch.equal(pos.embeds, pe) and torch.equal(pos.pooled, pp)
    # no negative prompt: zeros (force_zeros_for_empty_prompt), for the embeddings and the pooled embedding
    assert torch.equal(pos.uncond.embeds, ne) and torch.equal(pos.uncond.pooled, npp)
    assert not pos.uncond.embeds.any() and not pos.uncond.pooled.any()
    # a negative prompt and prompt_2 / clip_skip are encoded as diffusers does
    neg = encode_prompt(clip, NEGATIVE)
    _, ne2, _, npp2 = pipe.encode_prompt(PROMPT, device="cpu", do_classifier_free_guidance=True,
                                         negative_prompt=NEGATIVE)
    assert torch.equal(neg.embeds, ne2) and torch.equal(neg.pooled, npp2)
    two = encode_prompt(clip, PROMPT, text_2="a red door", clip_skip=1)
    pe3, _, pp3, _ = pipe.encode_prompt(PROMPT, prompt_2="a red door", device="cpu", do_classifier_free_guidance=False,
                                        clip_skip=1)
    assert torch.equal(two.embeds, pe3) and torch.equal(two.pooled, pp3)
    assert not torch.equal(two.embeds[..., 32:], pos.embeds[..., 32:])  # the second encoder saw prompt_2
    assert torch.equal(encode_prompt(clip, PROMPT, text_2="a red door").embeds[..., :32], pos.embeds[..., :32])


def test_refiner_prompt_encoding_uses_the_second_encoder_and_the_empty_prompt(refiner):
    model, clip, _ = refiner
    pipe = refiner_pipeline(refiner, "euler")
    pos = encode_prompt(clip, PROMPT)
    pe, ne, pp, npp = pipe.encode_prompt(PROMPT, device="cpu", do_classifier_free_guidance=True)
    assert torch.equal(pos.embeds, pe) and torch.equal(pos.pooled, pp)
    assert torch.equal(pos.uncond.embeds, ne) and torch.equal(pos.uncond.pooled, npp)
    assert pos.uncond.embeds.abs().sum() > 0  # the refiner's config: "" is encoded, not zeroed


# ---------------------------------------------------------------------------------------------- text2img

@pytest.mark.parametrize("scheduler", TWO + ["euler_a", "ddim"])
def test_text2img_matches_sdxl_pipeline(xl, scheduler):
    model, clip, _ = xl
    pipe = pipeline("StableDiffusionXLPipeline", xl, scheduler)
    ours = denoise.sample(model, encode_prompt(clip, PROMPT), None, empty_latent(64, 48), seed=3, steps=3,
                          guidance_scale=7.5, scheduler=scheduler, strength=1.0)
    ref = pipe(prompt=PROMPT, generator=gen(3), num_inference_steps=3, height=48, width=64, guidance_scale=7.5,
               output_type="latent").images
    assert_close(ours, ref)


def test_text2img_negative_batch_and_size_conditioning(xl):
    model, clip, _ = xl
    pipe = pipeline("StableDiffusionXLPipeline", xl, "dpmpp_2m_karras")
    kwargs = dict(seed=11, steps=3, guidance_scale=5.0, scheduler="dpmpp_2m_karras", strength=1.0)
    pos, neg = encode_prompt(clip, PROMPT), encode_prompt(clip, NEGATIVE)
    ours = denoise.sample(model, pos, neg, empty_latent(64, 64, batch=2), **kwargs)
    ref = pipe(prompt=PROMPT, negative_prompt=NEGATIVE, num_images_per_prompt=2, generator=gen(11),
               num_inference_steps=3, height=64, width=64, guidance_scale=5.0, output_type="latent").images
    assert_close(ours, ref)
    # SDXLSizeConditioning's values on both sides. (One image: with several, StableDiffusionXLPipeline repeats
    # [negative, positive] time ids as a pair, out of step with its [negatives..., positives...] batch.)
    sized_pos = with_size(pos, original_size=(512, 384), crop=(16, 8), target_size=(256, 256))
    sized_neg = with_size(neg, original_size=(128, 128), target_size=(64, 64))
    ours = denoise.sample(model, sized_pos, sized_neg, empty_latent(64, 64), **kwargs)
    ref = pipe(prompt=PROMPT, negative_prompt=NEGATIVE, generator=gen(11), num_inference_steps=3, height=64,
               width=64, guidance_scale=5.0, original_size=(512, 384), crops_coords_top_left=(16, 8),
               target_size=(256, 256), negative_original_size=(128, 128), negative_crops_coords_top_left=(16, 8),
               negative_target_size=(64, 64), output_type="latent").images
    assert_close(ours, ref)
    # the time ids matter: the default (sampled size) conditioning gives another result
    plain = denoise.sample(model, pos, neg, empty_latent(64, 64), **kwargs)
    assert (plain - ours).abs().max() > 1e-3


def test_no_guidance_matches_pipeline(xl):
    model, clip, _ = xl
    pipe = pipeline("StableDiffusionXLPipeline", xl, "euler")
    ours = denoise.sample(model, encode_prompt(clip, PROMPT), None, empty_latent(64, 64), seed=2, steps=3,
                          guidance_scale=1.0, scheduler="euler", strength=1.0)
    ref = pipe(prompt=PROMPT, generator=gen(2), num_inference_steps=3, height=64, width=64, guidance_scale=1.0,
               output_type="latent").images
    assert_close(ours, ref)


# ---------------------------------------------------------------------------------------------- img2img

@pytest.mark.parametrize("scheduler", TWO)
@pytest.mark.parametrize("strength", [1.0, 0.6])
def test_img2img_matches_sdxl_img2img_pipeline(xl, scheduler, strength):
    model, clip, vae = xl
    pipe = pipeline("StableDiffusionXLImg2ImgPipeline", xl, scheduler)
    x0 = encode_pixels(vae, photo())
    ours = denoise.sample(model, encode_prompt(clip, PROMPT), None, Latents(x0), seed=5, steps=4, guidance_scale=7.5,
                          scheduler=scheduler, strength=strength)
    ref = pipe(prompt=PROMPT, image=x0, strength=strength, generator=gen(5), num_inference_steps=4,
               guidance_scale=7.5, output_type="latent").images
    assert_close(ours, ref)


@pytest.mark.parametrize("scheduler", TWO + ["euler_a"])
def test_handoff_text2img_end_then_img2img_start(xl, refiner, scheduler):
    """Base text2img with denoising_end, then img2img with denoising_start (diffusers' base + refiner)."""
    model, clip, _ = xl
    base = pipeline("StableDiffusionXLPipeline", xl, scheduler)
    half = denoise.sample(model, encode_prompt(clip, PROMPT), None, empty_latent(64, 64), seed=8, steps=6,
                          guidance_scale=5.0, scheduler=scheduler, strength=1.0, denoising_end=0.6)
    ref_half = base(prompt=PROMPT, generator=gen(8), num_inference_steps=6, height=64, width=64,
                    denoising_end=0.6, output_type="latent").images
    assert_close(half, ref_half)
    # the same model finishes it...
    img2img = pipeline("StableDiffusionXLImg2ImgPipeline", xl, scheduler)
    done = denoise.sample(model, encode_prompt(clip, PROMPT), None, Latents(half), seed=9, steps=6,
                          guidance_scale=5.0, scheduler=scheduler, strength=0.3, denoising_start=0.6)
    ref_done = img2img(prompt=PROMPT, image=ref_half, generator=gen(9), num_inference_steps=6, strength=0.3,
                       denoising_start=0.6, output_type="latent").images
    assert_close(done, ref_done)
    # ...and so does the refiner (second encoder only, aesthetic-score time ids)
    r_model, r_clip, _ = refiner
    refined = denoise.sample(r_model, encode_prompt(r_clip, PROMPT), None, Latents(half), seed=9, steps=6,
                             guidance_scale=5.0, scheduler=scheduler, strength=0.3, denoising_start=0.6)
    ref_refined = refiner_pipeline(refiner, scheduler)(
        prompt=PROMPT, image=ref_half, generator=gen(9), num_inference_steps=6, denoising_start=0.6,
        output_type="latent").images
    assert_close(refined, ref_refined)
    # a handed-off run does only the rest of the schedule: less change than a full img2img
    assert (done - half).abs().mean() < (img2img(prompt=PROMPT, image=ref_half, generator=gen(9),
                                                 num_inference_steps=6, strength=1.0,
                                                 output_type="latent").images - half).abs().mean()


def test_refiner_img2img_with_aesthetic_scores(refiner):
    model, clip, vae = refiner
    pipe = refiner_pipeline(refiner, "euler")
    x0 = encode_pixels(vae, photo(seed=6))
    pos = with_size(encode_prompt(clip, PROMPT), aesthetic_score=7.5)
    neg = with_size(encode_prompt(clip, NEGATIVE), aesthetic_score=1.0)
    ours = denoise.sample(model, pos, neg, Latents(x0), seed=4, steps=4, guidance_scale=6.0, scheduler="euler",
                          strength=0.5)
    ref = pipe(prompt=PROMPT, negative_prompt=NEGATIVE, image=x0, strength=0.5, generator=gen(4), num_inference_steps=4,
               guidance_scale=6.0, aesthetic_score=7.5, negative_aesthetic_score=1.0, output_type="latent").images
    assert_close(ours, ref)
    default = denoise.sample(model, encode_prompt(clip, PROMPT), None, Latents(x0), seed=4, steps=4,
                             guidance_scale=6.0, scheduler="euler", strength=0.5)
    ref_default = pipe(prompt=PROMPT, image=x0, strength=0.5, generator=gen(4), num_inference_steps=4,
                       guidance_scale=6.0, output_type="latent").images  # aesthetic 6.0 / 2.5
    assert_close(default, ref_default)


# ---------------------------------------------------------------------------------------------- inpainting

@pytest.mark.parametrize("scheduler", TWO)
@pytest.mark.parametrize("strength", [1.0, 0.6])
def test_latent_blend_matches_sdxl_inpaint_pipeline_4ch(xl, scheduler, strength):
    model, clip, vae = xl
    pipe = pipeline("StableDiffusionXLInpaintPipeline", xl, scheduler)
    x0 = encode_pixels(vae, photo(seed=1))
    mask = centre_mask()
    ours = denoise.blend_inpaint(model, encode_prompt(clip, PROMPT), None, Latents(x0), mask, seed=7, steps=4,
                                 guidance_scale=7.5, scheduler=scheduler, strength=strength)
    ref = pipe(prompt=PROMPT, image=x0, mask_image=mask, masked_image_latents=x0, height=64, width=64,
               strength=strength, generator=gen(7), num_inference_steps=4, guidance_scale=7.5,
               output_type="latent").images
    assert_close(ours, ref)
    keep = F.interpolate((mask >= 0.5).float(), size=(8, 8)) == 0
    assert torch.equal(ours[keep.expand_as(ours)], x0[keep.expand_as(x0)])


@pytest.mark.parametrize("scheduler", TWO)
@pytest.mark.parametrize("strength", [1.0, 0.6])
def test_inpainting_checkpoint_matches_sdxl_inpaint_pipeline_9ch(xl_inpaint, scheduler, strength):
    model, clip, vae = xl_inpaint
    assert model.inpainting and model.label == "SDXL inpainting"
    pipe = pipeline("StableDiffusionXLInpaintPipeline", xl_inpaint, scheduler)
    image, mask = photo(seed=2), centre_mask()
    latents = inpaint_conditioning(vae, image, mask)
    ours = denoise.sample(model, encode_prompt(clip, PROMPT), None, latents, seed=9, steps=4, guidance_scale=7.5,
                          scheduler=scheduler, strength=strength)
    ref = pipe(prompt=PROMPT, image=latents.samples, mask_image=mask,
               masked_image_latents=latents.masked_image_latents, height=64, width=64, strength=strength,
               generator=gen(9), num_inference_steps=4, guidance_scale=7.5, output_type="latent").images
    assert_close(ours, ref)


def test_inpaint_then_refiner_handoff(xl, xl_inpaint, refiner):
    """The inpainting guide's chain in latent space: inpaint with denoising_end, the refiner inpaints the rest."""
    mask = centre_mask()
    model, clip, vae = xl_inpaint
    latents = inpaint_conditioning(vae, photo(seed=3), mask)
    pipe = pipeline("StableDiffusionXLInpaintPipeline", xl_inpaint, "euler")
    half = denoise.sample(model, encode_prompt(clip, PROMPT), None, latents, seed=12, steps=5, guidance_scale=7.5,
                          scheduler="euler", strength=1.0, denoising_end=0.7)
    ref_half = pipe(prompt=PROMPT, image=latents.samples, mask_image=mask,
                    masked_image_latents=latents.masked_image_latents, height=64, width=64, strength=1.0,
                    generator=gen(12), num_inference_steps=5, denoising_end=0.7, output_type="latent").images
    assert_close(half, ref_half)
    # the 9-channel model can also continue itself (its conditioning travels with the latent)
    more = denoise.sample(model, encode_prompt(clip, PROMPT), None,
                          Latents(half, inpaint_mask=latents.inpaint_mask,
                                  masked_image_latents=latents.masked_image_latents),
                          seed=13, steps=5, guidance_scale=7.5, scheduler="euler", strength=1.0, denoising_start=0.7)
    ref_more = pipe(prompt=PROMPT, image=ref_half, mask_image=mask, masked_image_latents=latents.masked_image_latents,
                    height=64, width=64, generator=gen(13), num_inference_steps=5, denoising_start=0.7,
                    output_type="latent").images
    assert_close(more, ref_more)
    r_model, r_clip, _ = refiner
    refined = denoise.blend_inpaint(r_model, encode_prompt(r_clip, PROMPT), None, Latents(half), mask, seed=13,
                                    steps=5, guidance_scale=7.5, scheduler="euler", strength=1.0, denoising_start=0.7)
    r_pipe = pipeline("StableDiffusionXLInpaintPipeline", refiner, "euler", requires_aesthetics_score=True,
                      force_zeros_for_empty_prompt=False)
    ref_refined = r_pipe(prompt=PROMPT, image=ref_half, mask_image=mask, masked_image_latents=ref_half, height=64,
                         width=64, generator=gen(13), num_inference_steps=5, denoising_start=0.7,
                         output_type="latent").images
    assert_close(refined, ref_refined)


# ---------------------------------------------------------------------------------------------- differential

def reference_differential_xl(unet, make_scheduler, x0, noise, change, cond, pooled, guidance, steps, strength,
                              end=None):
    """docs/design.md §4.5 written out plainly for SDXL: O[i] = add_noise(x0, eps, t_i); start at O[0]; before step
    i >= 1 reset pixels with (1 - c) > i/N to O[i]; c averaged over each 8x8 footprint. The UNet also gets
    the pooled embeds and time ids (original = target = the image size, crop 0), made here by hand."""
    scheduler = make_scheduler()
    scheduler.set_timesteps(steps)
    t_start = steps - min(int(steps * strength), steps)
    timesteps = scheduler.timesteps[t_start * scheduler.order:]
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(t_start * scheduler.order)
    noiser = make_scheduler()
    noiser.set_timesteps(steps)
    originals = [noiser.add_noise(x0, noise, t.reshape(1)) for t in timesteps]
    keep = 1 - F.avg_pool2d(change, 8)
    height, width = x0.shape[-2] * 8, x0.shape[-1] * 8
    added = {"text_embeds": pooled, "time_ids": torch.tensor([[height, width, 0, 0, height, width]] * 2).float()}
    total = len(timesteps)
    if end is not None:  # a hand-off: stop at the timestep cutoff of the fraction; the thresholds keep N
        timesteps = [t for t in timesteps if t >= round(1000 - end * 1000)]
    x = originals[0]
    with torch.no_grad():
        for i, t in enumerate(timesteps):
            if i >= 1:
                reset = (keep > i / total).float()
                x = originals[i] * reset + x * (1 - reset)
            eps = unet(scheduler.scale_model_input(torch.cat([x, x]), t), t, encoder_hidden_states=cond,
                       added_cond_kwargs=added).sample
            uncond, text = eps.chunk(2)
            x = scheduler.step(uncond + guidance * (text - uncond), t, x).prev_sample
    return x


@pytest.mark.parametrize("scheduler,strength,end", [("euler", 1.0, None), ("euler", 0.6, None),
                                                    ("dpmpp_2m_karras", 1.0, None), ("dpmpp_2m_karras", 0.6, None),
                                                    ("dpmpp_2m_karras", 1.0, 0.7)])
def test_differential_matches_plain_reimplementation(xl, scheduler, strength, end):
    model, clip, vae = xl
    x0 = encode_pixels(vae, photo(seed=4))
    levels = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0, 0.5, 0.25, 0.0])
    change = levels.repeat_interleave(8).repeat(64, 1)[None, None].clone()
    change[..., 48:, :] = torch.linspace(0, 1, 64)
    pos = encode_prompt(clip, PROMPT)
    ours = denoise.differential(model, pos, None, Latents(x0), change, seed=13, steps=4, guidance_scale=4.0,
                                scheduler=scheduler, strength=strength, denoising_end=end or 1.0)
    noise = torch.randn(x0.shape, generator=gen(13))
    cond = torch.cat([torch.zeros_like(pos.embeds), pos.embeds])  # SDXL's default negative: zeros
    pooled = torch.cat([torch.zeros_like(pos.pooled), pos.pooled])
    ref = reference_differential_xl(model.unet, lambda: diffusers_scheduler(scheduler, model.scheduler_config), x0,
                                    noise, change, cond, pooled, 4.0, 4, strength, end)
    assert_close(ours, ref)
