"""Same seed, same result as a diffusers pipeline given a photo (not latents), on tiny random models (fp32, CPU).

The pipelines draw the photo's VAE sample from the caller's generator before the noise (and the inpaint
pipelines the masked photo's after it); VAEEncode / InpaintModelConditioning mode "sampler" leaves those
draws to our sampler, which makes them in the same order. Our side runs the nodes; diffusers' side gets the
PIL photo and mask and ``generator=torch.Generator().manual_seed(seed)``. Final latents within 1e-4.
Stochastic schedulers (euler_a) use the generator after the draws, so they check the count of draws too.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from nodegraph.context import RunContext
from nodegraph.nodes.conditioning import encode_prompt
from nodegraph.nodes.latent import inpaint_model_conditioning_node, vae_encode_node
from nodegraph.nodes.sampling import differential_sampler_node, latent_blend_sampler_node, sampler_node
from nodegraph.serialize import flatten, unflatten
from tests.imaging import DATA, as_image, as_mask
from tests.test_diffusion_parity import assert_close, centre_mask
from tests.test_diffusion_parity import pipeline as sd_pipeline
from tests.test_sdxl_parity import pipeline as xl_pipeline

PROMPT = "an astronaut in a white suit"
STEPS = 4  # strength 0.6 leaves 2 steps: euler_a draws from the generator before the last one
GUIDANCE = 7.5  # given to both sides: the SDXL pipelines default to 5.0


def gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def photo():
    """A real photograph at the tiny models' size, as diffusers gets it (PIL) and as our nodes get it."""
    pil = Image.open(DATA / "astronaut_96.png").convert("RGB").resize((64, 64), Image.LANCZOS)
    return pil, as_image(np.asarray(pil))


@pytest.fixture(scope="module")
def mask():
    """The centre (1 = repaint) with soft borders that both sides binarise at 0.5, as an 8-bit mask."""
    array = (centre_mask()[0, 0] * 255).round().to(torch.uint8).numpy()
    return Image.fromarray(array, mode="L"), as_mask(array)


def run_sampler(model, clip, latent, **params):
    return sampler_node(model, encode_prompt(clip, PROMPT), latent, RunContext(), steps=STEPS,
                        guidance_scale=GUIDANCE, **params).samples


def reference(pipe, seed, **inputs):
    """The pipeline's final latents for ``seed``, with the steps and guidance our side uses."""
    return pipe(prompt=PROMPT, generator=gen(seed), num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                output_type="latent", **inputs).images


def inpaint_reference(pipe, seed, photo, mask, strength):
    return reference(pipe, seed, image=photo[0], mask_image=mask[0], height=64, width=64, strength=strength)


def run_blend(model, clip, latent, mask, **params):
    return latent_blend_sampler_node(model, encode_prompt(clip, PROMPT), latent, mask, RunContext(), steps=STEPS,
                                     guidance_scale=GUIDANCE, **params).samples


# ---------------------------------------------------------------------------------------------- SD 1.x

@pytest.mark.parametrize("scheduler,strength", [("euler_a", 0.6), ("euler_a", 1.0), ("dpmpp_2m_karras", 0.6)])
def test_img2img_from_a_photo_matches_img2img_pipeline(sd, photo, scheduler, strength):
    model, clip, vae = sd
    latent = vae_encode_node(vae, photo[1], mode="sampler")
    ours = run_sampler(model, clip, latent, seed=5, scheduler=scheduler, strength=strength)
    ref = reference(sd_pipeline("StableDiffusionImg2ImgPipeline", sd, scheduler), 5, image=photo[0], strength=strength)
    assert_close(ours, ref)
    # the draw matters: the posterior's mean (mode "mean") gives another result
    mean = run_sampler(model, clip, vae_encode_node(vae, photo[1]), seed=5, scheduler=scheduler, strength=strength)
    assert (mean - ref).abs().max() > 1e-3


@pytest.mark.parametrize("scheduler,strength", [("euler_a", 1.0), ("euler_a", 0.6), ("ddim", 1.0)])
def test_base_model_inpaint_from_a_photo_matches_inpaint_pipeline_4ch(sd, photo, mask, scheduler, strength):
    """StableDiffusionInpaintPipeline with a 4-channel UNet: image sample, noise, then the masked photo's sample
    (unused by the UNet, but drawn: euler_a's steps come after it)."""
    model, clip, vae = sd
    latent = vae_encode_node(vae, photo[1], mode="sampler")
    ours = run_blend(model, clip, latent, mask[1], seed=7, scheduler=scheduler, strength=strength)
    ref = inpaint_reference(sd_pipeline("StableDiffusionInpaintPipeline", sd, scheduler), 7, photo, mask, strength)
    assert_close(ours, ref)


@pytest.mark.parametrize("scheduler,strength", [("euler_a", 1.0), ("euler_a", 0.6), ("euler", 1.0)])
def test_inpainting_checkpoint_from_a_photo_matches_inpaint_pipeline_9ch(sd_inpaint, photo, mask, scheduler, strength):
    """9-channel UNet: the image is encoded (drawn) only below strength 1; the masked photo always, after the
    noise, and its draw is the UNet's conditioning."""
    model, clip, vae = sd_inpaint
    latent = inpaint_model_conditioning_node(vae, photo[1], mask[1], mode="sampler")
    ours = run_sampler(model, clip, latent, seed=9, scheduler=scheduler, strength=strength)
    pipe = sd_pipeline("StableDiffusionInpaintPipeline", sd_inpaint, scheduler)
    ref = inpaint_reference(pipe, 9, photo, mask, strength)
    assert_close(ours, ref)


def test_float16_draws_in_the_dtype_the_pipeline_draws_in(tiny):
    """An SD 1.x pipeline encodes a float16 VAE in float16 and draws the sample in float16, where our VAE node
    computes in float32 (force_upcast). CPU randn gives other values in float16 for sizes that are not a
    multiple of 16: a 72 px photo makes 4 x 9 x 9 latents. Tolerance for float16 arithmetic."""
    from nodegraph.nodes.models import inspect_checkpoint, load_checkpoint

    half = load_checkpoint(inspect_checkpoint(str(tiny.sd15)), dtype=torch.float16)
    model, clip, vae = half
    pil = Image.open(DATA / "astronaut_96.png").convert("RGB").resize((72, 72), Image.LANCZOS)
    latent = vae_encode_node(vae, as_image(np.asarray(pil)), mode="sampler")
    ours = run_sampler(model, clip, latent, seed=4, scheduler="euler_a", strength=0.6)
    ref = reference(sd_pipeline("StableDiffusionImg2ImgPipeline", half, "euler_a"), 4, image=pil, strength=0.6)
    assert (ours.float() - ref.float()).abs().max() < 0.05


# ---------------------------------------------------------------------------------------------- SDXL

def test_sdxl_img2img_from_a_photo_matches_pipeline_also_with_denoising_start(xl, photo):
    model, clip, vae = xl
    ours = run_sampler(model, clip, vae_encode_node(vae, photo[1], mode="sampler"), seed=4, scheduler="euler_a",
                       strength=0.6)
    ref = reference(xl_pipeline("StableDiffusionXLImg2ImgPipeline", xl, "euler_a"), 4, image=photo[0], strength=0.6)
    assert_close(ours, ref)
    # with denoising_start the pipeline draws the photo's sample and no noise; euler_a's steps follow
    ours = run_sampler(model, clip, vae_encode_node(vae, photo[1], mode="sampler"), seed=4, scheduler="euler_a",
                       denoising_start=0.5)
    ref = reference(xl_pipeline("StableDiffusionXLImg2ImgPipeline", xl, "euler_a"), 4, image=photo[0],
                    denoising_start=0.5)
    assert_close(ours, ref)


def test_sdxl_inpaint_from_a_photo_matches_pipeline_4ch_and_9ch(xl, xl_inpaint, photo, mask):
    model, clip, vae = xl
    ours = run_blend(model, clip, vae_encode_node(vae, photo[1], mode="sampler"), mask[1], seed=6,
                     scheduler="euler_a", strength=1.0)
    ref = inpaint_reference(xl_pipeline("StableDiffusionXLInpaintPipeline", xl, "euler_a"), 6, photo, mask, 1.0)
    assert_close(ours, ref)
    model, clip, vae = xl_inpaint
    ours = run_sampler(model, clip, inpaint_model_conditioning_node(vae, photo[1], mask[1], mode="sampler"), seed=6,
                       scheduler="euler_a", strength=0.6)
    ref = inpaint_reference(xl_pipeline("StableDiffusionXLInpaintPipeline", xl_inpaint, "euler_a"), 6, photo, mask, 0.6)
    assert_close(ours, ref)


# ---------------------------------------------------------------------------------------------- the LATENT

def test_sampler_mode_latent_holds_the_mean_and_survives_the_disk_cache(sd_inpaint, photo, mask):
    _, _, vae = sd_inpaint
    latent = inpaint_model_conditioning_node(vae, photo[1], mask[1], mode="sampler")
    mean = inpaint_model_conditioning_node(vae, photo[1], mask[1])
    assert torch.equal(latent.samples, mean.samples)
    assert torch.equal(latent.masked_image_latents, mean.masked_image_latents)
    assert latent.sample_std.shape == latent.samples.shape and (latent.sample_std > 0).all()
    assert mean.sample_std is None and mean.masked_image_std is None
    back = unflatten(*flatten(latent))
    for name in ("samples", "sample_std", "masked_image_latents", "masked_image_std", "inpaint_mask"):
        assert torch.equal(getattr(back, name), getattr(latent, name))
    # a sampler's result is a plain latent: the draw was made
    model, clip, _ = sd_inpaint
    out = sampler_node(model, encode_prompt(clip, PROMPT), latent, RunContext(), steps=2, denoising_end=0.5)
    assert out.sample_std is None and out.masked_image_std is None and out.masked_image_latents is not None


def test_differential_sampler_mode_is_deterministic_and_draws_the_image(sd, photo, mask):
    """No diffusers parity here (the community pipeline is not installed): the same seed gives the same result,
    and the image's draw changes it against the mean."""
    model, clip, vae = sd
    change = mask[1]
    params = dict(seed=3, steps=STEPS, scheduler="euler_a", strength=0.8)

    def run(latent, **overrides):
        return differential_sampler_node(model, encode_prompt(clip, PROMPT), latent, change, RunContext(),
                                         **{**params, **overrides}).samples

    latent = vae_encode_node(vae, photo[1], mode="sampler")
    first, again = run(latent), run(vae_encode_node(vae, photo[1], mode="sampler"))
    assert torch.equal(first, again)
    assert (first - run(vae_encode_node(vae, photo[1]))).abs().max() > 1e-3
    assert (first - run(latent, seed=4)).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------- shipped workflows

def workflow_and_pipeline_inputs(name, tiny, targets, tmp_path, **overrides):
    """Run a shipped workflow on the tiny model up to ``targets``; also its prompts and sampler params."""
    from nodegraph.api import Engine
    from tests.test_diffusion_workflows import WORKFLOWS, tiny_overrides

    workflow = WORKFLOWS / name
    nodes = json.loads(workflow.read_text())["nodes"]
    overrides = {**tiny_overrides(name, tiny), "inpaint.steps": STEPS, **overrides}
    outputs = Engine().run(workflow, overrides=overrides, targets=targets, out_dir=tmp_path).outputs
    params = {**nodes["inpaint"]["params"], "steps": STEPS}
    prompts = dict(prompt=nodes["positive"]["params"]["text"], negative_prompt=nodes["negative"]["params"]["text"])
    return outputs, params, prompts, workflow.parent


def workflow_reference(pipe, params, prompts, **inputs):
    """The pipeline's latents after its last step, taken from its step callback: with padding_mask_crop it only
    returns PIL images, pasted back into the photo."""
    final = {}

    def keep(pipe, i, t, tensors):
        final["latents"] = tensors["latents"]
        return tensors

    pipe(**prompts, generator=gen(params["seed"]), num_inference_steps=params["steps"],
         guidance_scale=params["guidance_scale"], strength=params["strength"], callback_on_step_end=keep,
         callback_on_step_end_tensor_inputs=["latents"], **inputs)
    return final["latents"]


@pytest.mark.parametrize("name,handles", [("inpaint_base_model.json", "sd"), ("inpaint_model.json", "sd_inpaint")])
def test_inpaint_workflows_give_the_inpaint_pipelines_result_for_their_seed(name, handles, tiny, request, tmp_path):
    """The workflow's sampler output is StableDiffusionInpaintPipeline's, given its resized photo and mask, prompts,
    seed and scheduler (euler_a for the base model: the draws' count matters too)."""
    outputs, params, prompts, _ = workflow_and_pipeline_inputs(name, tiny, ["inpaint", "resize", "mask"], tmp_path)
    pipe = sd_pipeline("StableDiffusionInpaintPipeline", request.getfixturevalue(handles), params["scheduler"])
    photo, mask = outputs["resize"]["image"], outputs["mask"]["mask"]
    ref = workflow_reference(pipe, params, prompts, image=photo, mask_image=mask, height=64, width=64,
                             output_type="latent")
    assert_close(outputs["inpaint"]["latent"].samples, ref)


def test_crop_workflow_gives_the_inpaint_pipelines_result_with_padding_mask_crop(sd, tiny, tmp_path):
    """CropToMask + VAEEncode (sampler) + LatentBlendSampler = the pipeline with padding_mask_crop, in latent space."""
    outputs, params, prompts, folder = workflow_and_pipeline_inputs("inpaint_crop.json", tiny, ["inpaint"], tmp_path)
    nodes = json.loads((folder / "inpaint_crop.json").read_text())["nodes"]
    photo = Image.open(folder / nodes["photo"]["params"]["path"]).convert("RGB")
    mask = Image.open(folder / nodes["mask"]["params"]["path"]).convert("L")
    pipe = sd_pipeline("StableDiffusionInpaintPipeline", sd, params["scheduler"])
    ref = workflow_reference(pipe, params, prompts, image=photo, mask_image=mask, height=64, width=64,
                             padding_mask_crop=tiny_crop_padding(tiny))
    assert_close(outputs["inpaint"]["latent"].samples, ref)


def tiny_crop_padding(tiny):
    from tests.test_diffusion_workflows import tiny_overrides

    return tiny_overrides("inpaint_crop.json", tiny)["crop.padding"]
