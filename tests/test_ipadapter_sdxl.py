"""IP-Adapter on SDXL against diffusers on tiny random models (fp32, CPU): the outpainting article's combination.

text2img with square slices of a photograph vs ``StableDiffusionXLPipeline(ip_adapter_image=[slices])``, and
differential diffusion with the adapter vs a plain loop written here around a UNet that diffusers'
``load_ip_adapter`` patched, fed diffusers' own ``prepare_ip_adapter_image_embeds``. Final latents within 1e-4.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from nodegraph.nodes import denoise
from nodegraph.nodes._pixels import to_pil
from nodegraph.nodes.conditioning import encode_prompt
from nodegraph.nodes.io import load_image_file
from nodegraph.nodes.ipadapter import apply_ip_adapter, load_ip_adapter
from nodegraph.nodes.latent import Latents, empty_latent, encode_pixels
from nodegraph.nodes.outpaint import square_slices
from tests.test_diffusion_parity import diffusers_scheduler
from tests.tiny_ipadapter import build_tiny_ipadapters

TOL = 1e-4
DATA = Path(__file__).parent / "data"
PROMPT = "a cat on a rug"


@pytest.fixture(scope="module")
def xl_ip(tiny_xl, xl, tmp_path_factory):
    """The session's tiny SDXL checkpoint with IP-Adapters that fit its UNet."""
    return tiny_xl.base, xl, build_tiny_ipadapters(tmp_path_factory.mktemp("ipadapter-sdxl"), xl[0].unet, seed=3)


@pytest.fixture(scope="module")
def slices():
    image, _ = load_image_file(DATA / "chelsea_128.png")
    return square_slices(image, 2, 3, "grid")


def xl_pipeline(folder: Path, handles, scheduler: str, adapters, kind: str, scale: float):
    """StableDiffusionXLPipeline on a fresh UNet copy with the adapter loaded by diffusers from the same file."""
    import diffusers
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    model, clip, vae = handles
    pipe = diffusers.StableDiffusionXLPipeline(
        vae=vae.vae, text_encoder=clip.text_encoder, text_encoder_2=clip.text_encoder_2, tokenizer=clip.tokenizer,
        tokenizer_2=clip.tokenizer_2, unet=diffusers.UNet2DConditionModel.from_pretrained(str(folder), subfolder="unet"),
        scheduler=diffusers_scheduler(scheduler, model.scheduler_config),
        feature_extractor=CLIPImageProcessor.from_pretrained(str(adapters.encoder)),
        image_encoder=CLIPVisionModelWithProjection.from_pretrained(str(adapters.encoder)))
    pipe.set_progress_bar_config(disable=True)
    path = getattr(adapters, kind)
    pipe.load_ip_adapter(str(path.parent), subfolder="", weight_name=path.name, image_encoder_folder=None)
    pipe.set_ip_adapter_scale(scale)
    return pipe


def assert_close(ours, ref):
    assert ours.shape == ref.shape
    assert torch.isfinite(ref).all()
    diff = (ours.float() - ref.float()).abs().max().item()
    assert diff <= TOL, f"max |ours - diffusers| = {diff}"


@pytest.mark.parametrize("kind,scheduler,scale", [
    ("plus", "dpmpp_2m_karras", 0.1),  # the outpainting article's adapter kind, scheduler and scale
    ("plain", "euler", 0.8),
])
def test_sdxl_text2img_with_slices_matches_pipeline(xl_ip, slices, kind, scheduler, scale):
    folder, handles, adapters = xl_ip
    model, clip, _ = handles
    patched = apply_ip_adapter(model, load_ip_adapter(getattr(adapters, kind), adapters.encoder), slices, scale)
    pos = encode_prompt(clip, PROMPT)
    ours = denoise.sample(patched, pos, None, empty_latent(64, 48), seed=3, steps=3, guidance_scale=4.0,
                          scheduler=scheduler, strength=1.0)
    pipe = xl_pipeline(folder, handles, scheduler, adapters, kind, scale)
    ref = pipe(prompt=PROMPT, ip_adapter_image=[[to_pil(s) for s in slices]], generator=torch.Generator().manual_seed(3),
               num_inference_steps=3, height=48, width=64, guidance_scale=4.0, output_type="latent").images
    assert_close(ours, ref)
    plain = denoise.sample(model, pos, None, empty_latent(64, 48), seed=3, steps=3, guidance_scale=4.0,
                           scheduler=scheduler, strength=1.0)
    assert (plain - ours).abs().max() > 1e-3


def test_sdxl_negative_prompt_and_batch_match_pipeline(xl_ip, slices):
    folder, handles, adapters = xl_ip
    model, clip, _ = handles
    patched = apply_ip_adapter(model, load_ip_adapter(adapters.plus, adapters.encoder), slices[1:5], 0.5)
    ours = denoise.sample(patched, encode_prompt(clip, PROMPT), encode_prompt(clip, "blurry"), empty_latent(64, 64, 2),
                          seed=8, steps=3, guidance_scale=5.0, scheduler="euler", strength=1.0)
    pipe = xl_pipeline(folder, handles, "euler", adapters, "plus", 0.5)
    ref = pipe(prompt=PROMPT, negative_prompt="blurry", num_images_per_prompt=2,
               ip_adapter_image=[[to_pil(s) for s in slices[1:5]]], generator=torch.Generator().manual_seed(8),
               num_inference_steps=3, height=64, width=64, guidance_scale=5.0, output_type="latent").images
    assert_close(ours, ref)


def test_sdxl_differential_with_ip_adapter_matches_plain_loop(xl_ip, slices):
    """The outpainting article's generate_image: differential img2img, strength 1, guidance 4, IP-Adapter Plus at 0.1."""
    folder, handles, adapters = xl_ip
    model, clip, vae = handles
    image = F.interpolate(load_image_file(DATA / "chelsea_128.png")[0], size=(64, 64), mode="bilinear")
    x0 = encode_pixels(vae, image.clamp(0, 1))
    change = torch.zeros(1, 1, 64, 64)
    change[..., 40:] = 1.0
    change[..., 24:40] = torch.linspace(0.1, 0.9, 16)  # a blurred seam: partly changed columns
    pos = encode_prompt(clip, "")
    steps, guidance, scale = 4, 4.0, 0.1
    patched = apply_ip_adapter(model, load_ip_adapter(adapters.plus, adapters.encoder), slices, scale)
    ours = denoise.differential(patched, pos, None, Latents(x0), change, seed=13, steps=steps, guidance_scale=guidance,
                                scheduler="dpmpp_2m_karras", strength=1.0)

    # the reference: diffusers' UNet with the adapter loaded by diffusers, diffusers' image embeds, a plain loop
    pipe = xl_pipeline(folder, handles, "dpmpp_2m_karras", adapters, "plus", scale)
    embeds = pipe.prepare_ip_adapter_image_embeds([[to_pil(s) for s in slices]], None, "cpu", 1, True)
    prompt_embeds, negative, pooled, negative_pooled = pipe.encode_prompt("", device="cpu", num_images_per_prompt=1,
                                                                          do_classifier_free_guidance=True)
    added = {"text_embeds": torch.cat([negative_pooled, pooled]),
             "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2), "image_embeds": embeds}
    cond = torch.cat([negative, prompt_embeds])
    scheduler, noiser = (diffusers_scheduler("dpmpp_2m_karras", model.scheduler_config) for _ in range(2))
    scheduler.set_timesteps(steps)
    noiser.set_timesteps(steps)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(13))
    originals = [noiser.add_noise(x0, noise, t.reshape(1)) for t in scheduler.timesteps]
    keep = 1 - F.avg_pool2d(change, 8)
    x = originals[0]
    with torch.no_grad():
        for i, t in enumerate(scheduler.timesteps):
            if i >= 1:
                reset = (keep > i / steps).float()
                x = originals[i] * reset + x * (1 - reset)
            eps = pipe.unet(scheduler.scale_model_input(torch.cat([x, x]), t), t, encoder_hidden_states=cond,
                            added_cond_kwargs=added).sample
            uncond, text = eps.chunk(2)
            x = scheduler.step(uncond + guidance * (text - uncond), t, x).prev_sample
    assert_close(ours, x)
