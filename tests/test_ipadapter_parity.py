"""IP-Adapter sampling against diffusers' pipelines with ``ip_adapter_image`` on tiny random models (fp32, CPU).

Our side: LoadIPAdapter's loader + ApplyIPAdapter's patch + the shared sampler. diffusers' side: a pipeline on
a fresh copy of the same UNet, the adapter loaded with ``pipe.load_ip_adapter`` from the same file, the same
image encoder weights, and the slices given as 8-bit PIL images (the project's rounding). Same seed, same
initial noise; final latents must agree within 1e-4.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from nodegraph.nodes import denoise
from nodegraph.nodes._pixels import to_pil
from nodegraph.nodes.conditioning import encode_prompt
from nodegraph.nodes.io import load_image_file
from nodegraph.nodes.ipadapter import apply_ip_adapter, load_ip_adapter
from nodegraph.nodes.latent import empty_latent
from nodegraph.nodes.outpaint import square_slices
from tests.test_diffusion_parity import diffusers_scheduler
from tests.tiny_ipadapter import build_tiny_ipadapters

TOL = 1e-4
DATA = Path(__file__).parent / "data"
PROMPT = "a cat on a rug"


@pytest.fixture(scope="module")
def sd1(tiny, sd, tmp_path_factory):
    """The session's tiny SD 1.x checkpoint with IP-Adapters that fit its UNet."""
    return tiny.sd15, sd, build_tiny_ipadapters(tmp_path_factory.mktemp("ipadapter-sd1"), sd[0].unet)


@pytest.fixture(scope="module")
def slices():
    """The outpainting article's six squares (2 x 3) of a real photograph, 28 px each."""
    image, _ = load_image_file(DATA / "chelsea_128.png")
    return square_slices(image, 2, 3, "grid")


def pil_list(images: torch.Tensor) -> list:
    return [to_pil(image) for image in images]


def sd1_pipeline(folder: Path, handles, scheduler: str, encoder: Path, preprocessor: bool):
    """StableDiffusionPipeline on a fresh UNet copy (load_ip_adapter changes the UNet it is given)."""
    import diffusers
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    model, clip, vae = handles
    unet = diffusers.UNet2DConditionModel.from_pretrained(str(folder), subfolder="unet")
    pipe = diffusers.StableDiffusionPipeline(
        vae=vae.vae, text_encoder=clip.text_encoder, tokenizer=clip.tokenizer, unet=unet,
        scheduler=diffusers_scheduler(scheduler, model.scheduler_config), safety_checker=None,
        # without a feature extractor load_ip_adapter makes CLIP's default at the encoder's image size
        feature_extractor=CLIPImageProcessor.from_pretrained(str(encoder)) if preprocessor else None,
        image_encoder=CLIPVisionModelWithProjection.from_pretrained(str(encoder)), requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_adapters(pipe, files: list[Path], scales: list[float]):
    pipe.load_ip_adapter(str(files[0].parent), subfolder="", weight_name=[f.name for f in files],
                         image_encoder_folder=None)
    pipe.set_ip_adapter_scale(scales if len(scales) > 1 else scales[0])


def assert_close(ours, ref):
    assert ours.shape == ref.shape
    assert torch.isfinite(ref).all()
    diff = (ours.float() - ref.float()).abs().max().item()
    assert diff <= TOL, f"max |ours - diffusers| = {diff}"


@pytest.mark.parametrize("kind,scheduler,scale", [
    ("plain", "euler", 1.0),
    ("plain", "dpmpp_2m_karras", 0.1),  # the outpainting article's scheduler and scale
    ("plus", "dpmpp_2m_karras", 0.1),   # the outpainting article's adapter kind (ip-adapter-plus)
    ("plus", "euler", 0.6),
])
def test_sd1_text2img_with_slices_matches_pipeline(sd1, slices, kind, scheduler, scale):
    folder, handles, tiny = sd1
    model, clip, _ = handles
    adapter = load_ip_adapter(getattr(tiny, kind), tiny.encoder)
    patched = apply_ip_adapter(model, adapter, slices, scale)
    pos = encode_prompt(clip, PROMPT)
    ours = denoise.sample(patched, pos, None, empty_latent(64, 48), seed=3, steps=3, guidance_scale=4.0,
                          scheduler=scheduler, strength=1.0)
    pipe = sd1_pipeline(folder, handles, scheduler, tiny.encoder, preprocessor=True)
    load_adapters(pipe, [getattr(tiny, kind)], [scale])
    ref = pipe(prompt=PROMPT, ip_adapter_image=[pil_list(slices)], generator=torch.Generator("cpu").manual_seed(3),
               num_inference_steps=3, height=48, width=64, guidance_scale=4.0, output_type="latent").images
    assert_close(ours, ref)
    # the image prompt matters, and the MODEL it was applied to samples as before
    plain = denoise.sample(model, pos, None, empty_latent(64, 48), seed=3, steps=3, guidance_scale=4.0,
                           scheduler=scheduler, strength=1.0)
    assert (plain - ours).abs().max() > 1e-2


def test_sd1_batch_negative_prompt_and_default_processor(sd1, slices):
    """num_images_per_prompt copies of the image embeds; the encoder folder without preprocessor_config.json."""
    folder, handles, tiny = sd1
    model, clip, _ = handles
    adapter = load_ip_adapter(tiny.plus, tiny.encoder_default)
    patched = apply_ip_adapter(model, adapter, slices[:4], 0.5)
    ours = denoise.sample(patched, encode_prompt(clip, PROMPT), encode_prompt(clip, "blurry"), empty_latent(64, 64, 2),
                          seed=5, steps=3, guidance_scale=6.0, scheduler="euler", strength=1.0)
    pipe = sd1_pipeline(folder, handles, "euler", tiny.encoder_default, preprocessor=False)
    load_adapters(pipe, [tiny.plus], [0.5])
    ref = pipe(prompt=PROMPT, negative_prompt="blurry", num_images_per_prompt=2, ip_adapter_image=[pil_list(slices[:4])],
               generator=torch.Generator("cpu").manual_seed(5), num_inference_steps=3, height=64, width=64,
               guidance_scale=6.0, output_type="latent").images
    assert_close(ours, ref)


def test_sd1_without_guidance_matches_pipeline(sd1, slices):
    folder, handles, tiny = sd1
    model, clip, _ = handles
    patched = apply_ip_adapter(model, load_ip_adapter(tiny.plain, tiny.encoder), slices, 0.8)
    ours = denoise.sample(patched, encode_prompt(clip, PROMPT), None, empty_latent(64, 64), seed=2, steps=3,
                          guidance_scale=1.0, scheduler="euler", strength=1.0)
    pipe = sd1_pipeline(folder, handles, "euler", tiny.encoder, preprocessor=True)
    load_adapters(pipe, [tiny.plain], [0.8])
    ref = pipe(prompt=PROMPT, ip_adapter_image=[pil_list(slices)], generator=torch.Generator("cpu").manual_seed(2),
               num_inference_steps=3, height=64, width=64, guidance_scale=1.0, output_type="latent").images
    assert_close(ours, ref)


def test_sd1_two_chained_adapters_match_pipeline_with_two(sd1, slices):
    """Two ApplyIPAdapter in a row = diffusers with a list of two adapters, scales and image lists."""
    folder, handles, tiny = sd1
    model, clip, _ = handles
    first, second = slices[:2], slices[2:]
    patched = apply_ip_adapter(model, load_ip_adapter(tiny.plain, tiny.encoder), first, 0.3)
    patched = apply_ip_adapter(patched, load_ip_adapter(tiny.plus, tiny.encoder), second, 0.8)
    assert len(patched.patches) == 1 and len(patched.patches[0].entries) == 2
    ours = denoise.sample(patched, encode_prompt(clip, PROMPT), None, empty_latent(64, 64), seed=4, steps=3,
                          guidance_scale=4.0, scheduler="dpmpp_2m_karras", strength=1.0)
    pipe = sd1_pipeline(folder, handles, "dpmpp_2m_karras", tiny.encoder, preprocessor=True)
    load_adapters(pipe, [tiny.plain, tiny.plus], [0.3, 0.8])
    ref = pipe(prompt=PROMPT, ip_adapter_image=[pil_list(first), pil_list(second)],
               generator=torch.Generator("cpu").manual_seed(4), num_inference_steps=3, height=64, width=64,
               guidance_scale=4.0, output_type="latent").images
    assert_close(ours, ref)
