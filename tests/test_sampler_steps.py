"""Sampler's start_step / end_step / add_noise (ComfyUI's KSamplerAdvanced steps) on a tiny SD 1.x model."""
from __future__ import annotations

import pytest
import torch

from nodegraph.errors import NodeError
from nodegraph.nodes import denoise
from nodegraph.nodes.conditioning import encode_prompt
from nodegraph.nodes.latent import Latents, empty_latent, encode_pixels

from .test_diffusion_parity import photo


def run(sd, latents, **kw):
    model, clip, _ = sd
    args = dict(seed=4, steps=4, guidance_scale=6.0, scheduler="euler", strength=1.0)
    return denoise.sample(model, encode_prompt(clip, "a lighthouse"), None, latents, **{**args, **kw})


@pytest.mark.parametrize("scheduler", ["euler", "dpmpp_2m_karras"])
def test_start_step_is_img2img_from_that_step(sd, scheduler):
    """Skipping 2 of 4 steps on an image latent is img2img with strength 0.5 (the same timesteps and noise)."""
    x0 = encode_pixels(sd[2], photo())
    skipped = run(sd, Latents(x0), start_step=2, scheduler=scheduler)
    assert torch.equal(skipped, run(sd, Latents(x0), strength=0.5, scheduler=scheduler))
    assert (skipped - run(sd, Latents(x0), scheduler=scheduler)).abs().max() > 1e-3


def test_end_step_then_start_step_without_noise_is_one_run(sd):
    whole = run(sd, empty_latent(64, 64))
    first = run(sd, empty_latent(64, 64), end_step=2)
    rest = run(sd, Latents(first), start_step=2, add_noise=False)
    assert (rest - whole).abs().max() <= 1e-5
    assert (first - whole).abs().max() > 1e-2  # stopped early: still noisy


def test_a_window_with_no_step_is_an_error(sd):
    with pytest.raises(NodeError, match="start_step 3"):
        run(sd, empty_latent(64, 64), start_step=3, end_step=3)


def test_steps_and_strength_together_are_refused_at_validation(sd):
    from nodegraph.api import Engine

    workflow = {"format": "nodegraph/1", "nodes": {
        "empty": {"type": "EmptyLatent", "params": {"width": 64, "height": 64}},
        "ckpt": {"type": "LoadCheckpoint", "params": {"path": "x"}},
        "pos": {"type": "CLIPEncode", "inputs": {"clip": "ckpt.clip"}},
        "s": {"type": "Sampler", "inputs": {"model": "ckpt.model", "positive": "pos.conditioning",
                                             "latent": "empty.latent"},
              "params": {"start_step": 2, "end_step": 1, "strength": 0.5}}}}
    found = {(i.node_id, i.field): i.message for i in Engine(cache_dir=False).validate(workflow, targets=["s"])}
    assert "either start_step or strength" in found[("s", "strength")]
    assert "below end_step" in found[("s", "start_step")]


def test_latent_blend_sampler_takes_inpaint_model_conditioning(sd, sd_inpaint):
    """ComfyUI's InpaintModelConditioning with noise_mask: an inpainting checkpoint sees the extra channels and
    is blended with the mask (the original comes back exactly outside it); a normal one is blended only, as with
    a plain VAEEncode latent."""
    from nodegraph.nodes.latent import inpaint_conditioning, latent_mask

    from .test_diffusion_parity import centre_mask

    image, mask = photo(), centre_mask(soft=False)
    args = dict(seed=2, steps=3, guidance_scale=5.0, scheduler="euler", strength=1.0)
    for handles in (sd_inpaint, sd):
        model, clip, vae = handles
        latents = inpaint_conditioning(vae, image, mask)
        pos = encode_prompt(clip, "a lighthouse")
        blended = denoise.blend_inpaint(model, pos, None, latents, mask, **args)
        keep = 1 - latent_mask(mask, tuple(latents.samples.shape[-2:]))
        assert torch.equal(blended * keep, latents.samples * keep)
        assert ((blended - latents.samples) * (1 - keep)).abs().max() > 1e-2
        if handles is sd:
            plain = denoise.blend_inpaint(model, pos, None, Latents(latents.samples), mask, **args)
            assert torch.equal(blended, plain)
        else:
            unblended = denoise.sample(model, pos, None, latents, **args)
            assert ((blended - unblended) * (1 - keep)).abs().max() > 0  # the blending reaches inside too
    with pytest.raises(NodeError, match="InpaintModelConditioning"):
        denoise.blend_inpaint(sd_inpaint[0], pos, None, Latents(latents.samples), mask, **args)
