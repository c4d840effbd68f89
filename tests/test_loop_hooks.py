"""The shared loop's extension points: a model patch's hooks run in every sampler, see each UNet call (step,
its arguments), may change the UNet's arguments and its output, and no sampler needs to know the patch.

References: the same runs without the patch, a run with the other prompt, and the UNet wrapped by a plain torch
forward hook (an independent way to change its output)."""
from __future__ import annotations

import pytest
import torch

from nodegraph.nodes import denoise
from nodegraph.nodes.conditioning import encode_prompt
from nodegraph.nodes.denoise import Hook, ModelPatch
from nodegraph.nodes.latent import empty_latent, encode_image, inpaint_conditioning
from tests.test_diffusion_parity import centre_mask, photo

STEPS = 3


class Recording(Hook):
    def __init__(self, seen):
        self.seen = seen

    def unet_kwargs(self, step):
        self.seen.append((step.index, step.total, step.guide, tuple(step.model_input.shape),
                          tuple(step.kwargs["encoder_hidden_states"].shape)))


class Patch(ModelPatch):
    """A plugin's patch: only hooks, no change to the UNet."""

    def __init__(self, *hooks):
        self._hooks = list(hooks)

    def hooks(self, run):
        return self._hooks


def run_sampler(kind, model, positive, vae, guidance=4.0):
    common = dict(seed=5, steps=STEPS, guidance_scale=guidance, scheduler="euler")
    if kind == "text2img":
        return denoise.sample(model, positive, None, empty_latent(64, 64), strength=1.0, **common)
    image = photo()
    if kind == "img2img":
        return denoise.sample(model, positive, None, encode_image(vae, image), strength=0.7, **common)
    if kind == "blend":
        return denoise.blend_inpaint(model, positive, None, encode_image(vae, image), centre_mask(), strength=1.0,
                                     **common)
    if kind == "differential":
        return denoise.differential(model, positive, None, encode_image(vae, image), centre_mask(), strength=1.0,
                                    **common)
    return denoise.sample(model, positive, None, inpaint_conditioning(vae, image, centre_mask()), strength=1.0,
                          **common)


@pytest.mark.parametrize("kind", ["text2img", "img2img", "blend", "differential", "inpainting_checkpoint"])
def test_a_patch_s_hooks_see_every_unet_call_of_every_sampler(sd, sd_inpaint, kind):
    model, clip, vae = sd_inpaint if kind == "inpainting_checkpoint" else sd
    positive = encode_prompt(clip, "a castle")
    plain = run_sampler(kind, model, positive, vae)
    seen = []
    patched = run_sampler(kind, model.with_patch(Patch(Recording(seen))), positive, vae)
    assert torch.equal(plain, patched)  # a hook that changes nothing changes nothing
    runs = len(seen)
    assert runs in (STEPS, int(STEPS * 0.7)) and [s[0] for s in seen] == list(range(runs))
    assert all(total == runs and guide for _, total, guide, _, _ in seen)
    assert all(shape[0] == 2 for _, _, _, shape, _ in seen)  # the CFG-doubled input
    assert all(hidden[0] == 2 for *_, hidden in seen)


def test_unet_kwargs_reach_the_unet(sd):
    """Swapping encoder_hidden_states at every step = sampling with the other prompt (no guidance: one half)."""
    model, clip, vae = sd
    castle, sea = encode_prompt(clip, "a castle"), encode_prompt(clip, "the open sea")

    class OtherPrompt(Hook):
        def unet_kwargs(self, step):
            step.kwargs["encoder_hidden_states"] = sea.embeds

    swapped = run_sampler("text2img", model.with_patch(Patch(OtherPrompt())), castle, vae, guidance=1.0)
    assert torch.equal(swapped, run_sampler("text2img", model, sea, vae, guidance=1.0))
    assert not torch.equal(swapped, run_sampler("text2img", model, castle, vae, guidance=1.0))


def test_after_unet_changes_what_the_scheduler_gets(sd):
    """after_unet doubling the prediction = the UNet's own output doubled by a torch forward hook."""
    model, clip, vae = sd
    positive = encode_prompt(clip, "a castle")

    class Double(Hook):
        def after_unet(self, step, noise_pred):
            return noise_pred * 2

    ours = run_sampler("img2img", model.with_patch(Patch(Double())), positive, vae)
    handle = model.unet.register_forward_hook(lambda module, args, out: (out[0] * 2, *out[1:]))
    try:
        reference = run_sampler("img2img", model, positive, vae)
    finally:
        handle.remove()
    assert torch.equal(ours, reference)
    assert not torch.equal(ours, run_sampler("img2img", model, positive, vae))
