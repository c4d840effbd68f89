"""ControlNets through the loop's hooks, against diffusers' ControlNet pipelines on tiny random models (fp32, CPU).

The ControlNets are made from the tiny UNets (ControlNetModel.from_unet) with their zero-initialised convolutions
filled with random values (else every residual would be zero and any mistake would pass), saved in diffusers'
layout and loaded back through LoadControlNet's loader. Same seed, same images: final latents within 1e-4.
"""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from nodegraph.errors import NodeError
from nodegraph.nodes import denoise
from nodegraph.nodes.conditioning import encode_prompt
from nodegraph.nodes.controlnet import (apply_controlnet, controlnet_path_problem, inpaint_control_image,
                                        load_controlnet)
from nodegraph.nodes.latent import empty_latent, encode_image, inpaint_conditioning
from tests.test_loop_hooks import Patch
from tests.tiny_controlnet import random_controlnet
from tests.test_diffusion_parity import assert_close, centre_mask, diffusers_scheduler, embeds, photo

PROMPT = "a stone castle on a hill and the sea"


@pytest.fixture(scope="module")
def controlnets(sd, xl, tmp_path_factory):
    root = tmp_path_factory.mktemp("controlnets")
    folders = {}
    for name, unet, seed in [("sd_a", sd[0].unet, 1), ("sd_b", sd[0].unet, 2), ("xl", xl[0].unet, 3)]:
        random_controlnet(unet, seed).save_pretrained(root / name)
        folders[name] = root / name
    return folders


def cn_pipeline(cls_name, handles, controlnet, scheduler="euler", xl=False):
    import diffusers

    model, clip, vae = handles
    parts = dict(vae=vae.vae, text_encoder=clip.text_encoder, tokenizer=clip.tokenizer, unet=model.unet,
                 controlnet=controlnet, scheduler=diffusers_scheduler(scheduler, model.scheduler_config))
    if xl:
        parts.update(text_encoder_2=clip.text_encoder_2, tokenizer_2=clip.tokenizer_2)
    else:
        parts.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe = getattr(diffusers, cls_name)(**parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def gen(seed):
    return torch.Generator("cpu").manual_seed(seed)


def control(seed=7, height=64, width=64):
    return photo(height, width, seed=seed)


# ---------------------------------------------------------------------------------------------- parity

@pytest.mark.parametrize("strength,start,end,guess", [(1.0, 0.0, 1.0, False), (0.7, 0.25, 0.75, True)])
def test_text2img_matches_controlnet_pipeline(sd, controlnets, strength, start, end, guess):
    model, clip, _ = sd
    cn = load_controlnet(controlnets["sd_a"])
    image = control(height=48)
    patched = apply_controlnet(model, cn, image, strength, start, end, guess)
    ours = denoise.sample(patched, encode_prompt(clip, PROMPT), None, empty_latent(64, 48), seed=3, steps=4,
                          guidance_scale=7.5, scheduler="euler", strength=1.0)
    pipe = cn_pipeline("StableDiffusionControlNetPipeline", sd, cn.module)
    pe, ne = embeds(pipe)
    ref = pipe(prompt_embeds=pe, negative_prompt_embeds=ne, image=image, height=48, width=64, generator=gen(3),
               num_inference_steps=4, guidance_scale=7.5, controlnet_conditioning_scale=strength,
               control_guidance_start=start, control_guidance_end=end, guess_mode=guess, output_type="latent").images
    assert_close(ours, ref)
    plain = denoise.sample(model, encode_prompt(clip, PROMPT), None, empty_latent(64, 48), seed=3, steps=4,
                           guidance_scale=7.5, scheduler="euler", strength=1.0)
    assert (plain - ours).abs().max() > 1e-3  # the ControlNet changed the result


def test_img2img_matches_controlnet_img2img_pipeline(sd, controlnets):
    model, clip, vae = sd
    cn = load_controlnet(controlnets["sd_a"])
    init, image = photo(seed=3), control(seed=7)
    patched = apply_controlnet(model, cn, image, 0.8)
    latent = encode_image(vae, init, mode="sampler")  # the pipeline draws the VAE sample from its generator
    ours = denoise.sample(patched, encode_prompt(clip, PROMPT), None, latent, seed=6, steps=5, guidance_scale=7.5,
                          scheduler="euler", strength=0.6)
    pipe = cn_pipeline("StableDiffusionControlNetImg2ImgPipeline", sd, cn.module)
    pe, ne = embeds(pipe)
    ref = pipe(prompt_embeds=pe, negative_prompt_embeds=ne, image=init, control_image=image, strength=0.6,
               generator=gen(6), num_inference_steps=5, guidance_scale=7.5, controlnet_conditioning_scale=0.8,
               output_type="latent").images
    assert_close(ours, ref)


def test_two_stacked_controlnets_match_multi_controlnet_model(sd, controlnets):
    from diffusers.models import MultiControlNetModel

    model, clip, _ = sd
    a, b = load_controlnet(controlnets["sd_a"]), load_controlnet(controlnets["sd_b"])
    ia, ib = control(seed=7), control(seed=8)
    patched = apply_controlnet(apply_controlnet(model, a, ia, 0.8, 0.0, 0.5), b, ib, 1.2, 0.25, 1.0)
    ours = denoise.sample(patched, encode_prompt(clip, PROMPT), None, empty_latent(64, 64), seed=4, steps=4,
                          guidance_scale=5.0, scheduler="dpmpp_2m_karras", strength=1.0)
    pipe = cn_pipeline("StableDiffusionControlNetPipeline", sd, MultiControlNetModel([a.module, b.module]),
                       "dpmpp_2m_karras")
    pe, ne = embeds(pipe)
    ref = pipe(prompt_embeds=pe, negative_prompt_embeds=ne, image=[ia, ib], height=64, width=64, generator=gen(4),
               num_inference_steps=4, guidance_scale=5.0, controlnet_conditioning_scale=[0.8, 1.2],
               control_guidance_start=[0.0, 0.25], control_guidance_end=[0.5, 1.0], output_type="latent").images
    assert_close(ours, ref)
    only_a = denoise.sample(apply_controlnet(model, a, ia, 0.8, 0.0, 0.5), encode_prompt(clip, PROMPT), None,
                            empty_latent(64, 64), seed=4, steps=4, guidance_scale=5.0, scheduler="dpmpp_2m_karras",
                            strength=1.0)
    assert (only_a - ours).abs().max() > 1e-3  # the second one counts


def test_inpainting_checkpoint_matches_controlnet_inpaint_pipeline(sd, sd_inpaint, controlnets):
    model, clip, vae = sd_inpaint
    cn = load_controlnet(controlnets["sd_a"])  # made from the base UNet: same blocks, 4-channel latents
    image, mask = photo(seed=2), centre_mask()
    control_image = inpaint_control_image(image, mask)
    patched = apply_controlnet(model, cn, control_image, 0.9)
    ours = denoise.sample(patched, encode_prompt(clip, PROMPT), None, inpaint_conditioning(vae, image, mask, mode="sampler"), seed=9,
                          steps=4, guidance_scale=7.5, scheduler="euler", strength=1.0)
    pipe = cn_pipeline("StableDiffusionControlNetInpaintPipeline", sd_inpaint, cn.module)
    pe, ne = embeds(pipe)
    ref = pipe(prompt_embeds=pe, negative_prompt_embeds=ne, image=image, mask_image=mask, control_image=control_image,
               height=64, width=64, strength=1.0, generator=gen(9), num_inference_steps=4, guidance_scale=7.5,
               controlnet_conditioning_scale=0.9, output_type="latent").images
    assert_close(ours, ref)


def test_sdxl_inpainting_checkpoint_matches_sdxl_controlnet_inpaint_pipeline(xl_inpaint, controlnets):
    model, clip, vae = xl_inpaint
    cn = load_controlnet(controlnets["xl"])
    image, mask = photo(seed=2), centre_mask()
    control_image = inpaint_control_image(image, mask)
    patched = apply_controlnet(model, cn, control_image, 0.8, 0.0, 0.75)
    ours = denoise.sample(patched, encode_prompt(clip, PROMPT), None, inpaint_conditioning(vae, image, mask, mode="sampler"), seed=9,
                          steps=4, guidance_scale=7.5, scheduler="euler", strength=1.0)
    pipe = cn_pipeline("StableDiffusionXLControlNetInpaintPipeline", xl_inpaint, cn.module, xl=True)
    ref = pipe(prompt=PROMPT, image=image, mask_image=mask, control_image=control_image, height=64, width=64,
               strength=1.0, generator=gen(9), num_inference_steps=4, guidance_scale=7.5,
               controlnet_conditioning_scale=0.8, control_guidance_end=0.75, output_type="latent").images
    assert_close(ours, ref)


def test_inpaint_control_image_is_make_inpaint_condition():
    """diffusers' docs: image / 255 (RGB), mask / 255 (L), image[mask > 0.5] = -1."""
    import numpy as np

    image, mask = photo(seed=5), centre_mask()
    ref = image[0].permute(1, 2, 0).numpy().copy()
    ref[mask[0, 0].numpy() > 0.5] = -1.0
    ours = inpaint_control_image(image, mask)
    assert np.array_equal(ours[0].permute(1, 2, 0).numpy(), ref)


# ---------------------------------------------------------------------------------------------- other samplers

@pytest.mark.parametrize("kind", ["blend", "differential"])
def test_blend_and_differential_samplers_are_steered(sd, controlnets, kind):
    model, clip, vae = sd
    cn = load_controlnet(controlnets["sd_a"])
    positive, latents, mask = encode_prompt(clip, PROMPT), encode_image(vae, photo()), centre_mask()
    run = denoise.blend_inpaint if kind == "blend" else denoise.differential

    def sample(m):
        return run(m, positive, None, latents, mask, seed=5, steps=4, guidance_scale=4.0, scheduler="euler",
                   strength=1.0)

    plain = sample(model)
    assert torch.equal(sample(apply_controlnet(model, cn, control(), 0.0)), plain)  # strength 0: no change
    assert torch.equal(sample(apply_controlnet(model, cn, control(), 1.0, 1.0, 1.0)), plain)  # acts at no step
    steered = sample(apply_controlnet(model, cn, control(), 1.0))
    assert (steered - plain).abs().max() > 1e-3
    late = sample(apply_controlnet(model, cn, control(), 1.0, 0.5, 1.0))  # only the second half of the steps
    assert (late - plain).abs().max() > 1e-4 and (late - steered).abs().max() > 1e-4


def test_the_residuals_reach_the_unet_once_per_step(sd, controlnets):
    """A hook after the ControlNet's sees its residuals in the UNet's arguments, summed for two ControlNets."""
    from nodegraph.nodes.controlnet import ControlNetResiduals

    model, clip, _ = sd
    cn = load_controlnet(controlnets["sd_a"])
    seen = []

    class Spy(denoise.Hook):
        def unet_kwargs(self, step):
            seen.append((step.index, step.kwargs.get("mid_block_additional_residual")))

    patched = apply_controlnet(model, cn, control(), 1.0, 0.0, 0.5).with_patch(Patch(Spy()))
    denoise.sample(patched, encode_prompt(clip, PROMPT), None, empty_latent(64, 64), seed=1, steps=4,
                   guidance_scale=4.0, scheduler="euler", strength=1.0)
    assert [i for i, _ in seen] == [0, 1, 2, 3]
    assert seen[0][1] is not None and seen[1][1] is not None  # steps 0 and 1 of 4: within end 0.5
    assert seen[2][1] is None and seen[3][1] is None
    assert seen[0][1].shape[0] == 2  # [uncond, cond]
    assert ControlNetResiduals is not None


# ---------------------------------------------------------------------------------------------- loading, bad input

def same_weights(a, b) -> bool:
    a, b = a.state_dict(), b.state_dict()
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_diffusers_layout_single_file_loads_with_or_without_its_config(sd, controlnets, tmp_path):
    folder = controlnets["sd_a"]
    reference = load_controlnet(folder)
    assert load_controlnet(folder) is reference  # loaded once
    bare = tmp_path / "bare" / "cn.safetensors"
    bare.parent.mkdir()
    shutil.copy(folder / "diffusion_pytorch_model.safetensors", bare)
    assert controlnet_path_problem(bare) is None
    # without a config the module is built when applied, with the settings of the UNet it steers
    assert same_weights(load_controlnet(bare).module_for(sd[0].unet), reference.module)
    configured = tmp_path / "cn.safetensors"
    shutil.copy(bare, configured)
    shutil.copy(folder / "config.json", tmp_path / "cn.json")
    assert same_weights(load_controlnet(configured).module, reference.module)


def original_layout(cn) -> dict:
    """A diffusers ControlNetModel's weights in the original (ldm / ComfyUI) layout: the inverse of diffusers'
    convert_controlnet_checkpoint, written from its key mapping."""
    from tests.tiny_models import _unet_to_original

    state = cn.state_dict()
    unet_part = {k: v for k, v in state.items()
                 if k.split(".")[0] in ("time_embedding", "conv_in", "down_blocks", "mid_block")}
    out = {"control_model." + k.removeprefix("model.diffusion_model."): v
           for k, v in _unet_to_original(unet_part, cn.config).items()}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] == "controlnet_down_blocks":
            out[f"control_model.zero_convs.{parts[1]}.0.{parts[2]}"] = value
        elif parts[0] == "controlnet_mid_block":
            out[f"control_model.middle_block_out.0.{parts[1]}"] = value
        elif parts[0] == "controlnet_cond_embedding":
            fixed = {"conv_in": 0, "conv_out": 14}
            index = fixed[parts[1]] if parts[1] in fixed else 2 * (int(parts[2]) + 1)
            out[f"control_model.input_hint_block.{index}.{parts[-1]}"] = value
    return {k: v.contiguous() for k, v in out.items()}


def test_an_original_layout_file_loads_the_same_and_steers_the_same(sd, controlnets, tmp_path):
    """ComfyUI's files: the original layout, usually without a config (the UNet's settings are used)."""
    from safetensors.torch import save_file

    model, clip, _ = sd
    folder = controlnets["sd_a"]
    reference = load_controlnet(folder)
    original = tmp_path / "control_sd15_tiny.safetensors"
    save_file(original_layout(reference.module), str(original))
    assert controlnet_path_problem(original) is None
    handle = load_controlnet(original)
    assert same_weights(handle.module_for(model.unet), reference.module)
    assert handle.module_for(model.unet) is handle.module_for(model.unet)  # built once per UNet settings

    def sample(cn):
        return denoise.sample(apply_controlnet(model, cn, control()), encode_prompt(clip, PROMPT), None,
                              empty_latent(64, 64), seed=2, steps=2, guidance_scale=4.0, scheduler="euler",
                              strength=1.0)

    assert torch.equal(sample(handle), sample(reference))
    with_config = tmp_path / "configured" / "control_sd15_tiny.safetensors"
    with_config.parent.mkdir()
    shutil.copy(original, with_config)
    shutil.copy(folder / "config.json", with_config.parent / "config.json")
    assert same_weights(load_controlnet(with_config).module, reference.module)


def test_an_sdxl_original_layout_file_keeps_its_added_embedding(xl, controlnets, tmp_path):
    from safetensors.torch import save_file

    reference = load_controlnet(controlnets["xl"]).module
    weights = original_layout(reference)
    for layer, old in (("linear_1", "0"), ("linear_2", "2")):
        for kind in ("weight", "bias"):
            weights[f"control_model.label_emb.0.{old}.{kind}"] = reference.state_dict()[f"add_embedding.{layer}.{kind}"]
    path = tmp_path / "control_xl_tiny.safetensors"
    save_file(weights, str(path))
    assert same_weights(load_controlnet(path).module_for(xl[0].unet), reference)


def test_pickles_and_files_without_controlnet_weights_are_refused(tmp_path):
    from safetensors.torch import save_file

    other = tmp_path / "lora.safetensors"
    save_file({"lora_unet_down.weight": torch.zeros(2, 2)}, str(other))
    assert "holds no ControlNet weights" in controlnet_path_problem(other)
    (tmp_path / "cn.pth").write_bytes(b"x")
    assert "pickle" in controlnet_path_problem(tmp_path / "cn.pth")
    (tmp_path / "empty").mkdir()
    assert "config.json" in controlnet_path_problem(tmp_path / "empty")


def test_a_controlnet_for_another_family_fails_before_sampling(sd, xl, controlnets, tmp_path):
    with pytest.raises(NodeError, match="does not fit the model's UNet"):
        apply_controlnet(sd[0], load_controlnet(controlnets["xl"]), control())
    with pytest.raises(NodeError, match="does not fit"):
        apply_controlnet(xl[0], load_controlnet(controlnets["sd_a"]), control())
    bare = tmp_path / "cn.safetensors"  # without a config: its weights do not fit the UNet's settings
    shutil.copy(controlnets["xl"] / "diffusion_pytorch_model.safetensors", bare)
    with pytest.raises(NodeError, match="does not fit the model's UNet"):
        apply_controlnet(sd[0], load_controlnet(bare), control())


def test_a_control_image_of_another_shape_fails_before_the_first_step(sd, controlnets):
    model, clip, _ = sd
    steps = []
    patched = apply_controlnet(model, load_controlnet(controlnets["sd_a"]), control(height=32, width=64))
    with pytest.raises(NodeError, match="aspect ratio"):
        denoise.sample(patched, encode_prompt(clip, PROMPT), None, empty_latent(64, 64), seed=1, steps=2,
                       guidance_scale=4.0, scheduler="euler", strength=1.0, progress=lambda i, n: steps.append(i))
    assert steps == []
    # the same aspect ratio at another size is resized, as diffusers does
    same = apply_controlnet(model, load_controlnet(controlnets["sd_a"]), control(height=128, width=128))
    denoise.sample(same, encode_prompt(clip, PROMPT), None, empty_latent(64, 64), seed=1, steps=1,
                   guidance_scale=4.0, scheduler="euler", strength=1.0)


# ---------------------------------------------------------------------------------------------- the workflow

def test_controlnet_inpaint_workflow_with_a_models_folder_name(tiny, controlnets, tmp_path):
    """workflows/controlnet_inpaint.json on the tiny models; the ControlNet found by its name in controlnet/."""
    import numpy as np
    from PIL import Image

    from nodegraph.api import Engine
    from tests.test_diffusion_workflows import WORKFLOWS

    root = tmp_path / "models"
    shutil.copytree(controlnets["sd_a"], root / "controlnet" / "control_v11p_sd15_inpaint")
    workflow = WORKFLOWS / "controlnet_inpaint.json"
    assert json.loads(workflow.read_text())["nodes"]["controlnet"]["params"]["path"] == "control_v11p_sd15_inpaint"
    small = {"ckpt.path": str(tiny.sd15_inpaint), "resize.width": 64, "resize.height": 64, "mask.width": 64,
             "mask.height": 64, "inpaint.steps": 2}
    engine = Engine(cache_dir=False, models=[root])

    def run(strength, out):
        result = engine.run(workflow, overrides={**small, "controlled.strength": strength}, out_dir=tmp_path / out)
        assert len(result.files) == 1
        return np.asarray(Image.open(result.files[0]).convert("RGB"), dtype=np.float32) / 255.0

    steered, plain = run(1.0, "a"), run(0.0, "b")
    got = engine.run(workflow, overrides=small, targets=["resize", "feather"], out_dir=tmp_path / "c").outputs
    photo_ = got["resize"]["image"][0].permute(1, 2, 0).numpy()
    keep = got["feather"]["mask"][0, 0].numpy() == 0
    assert keep.sum() > 500 and (~keep).sum() > 100
    assert np.abs(steered[keep] - photo_[keep]).max() <= 1 / 255 + 1e-6  # outside the mask: the photograph
    assert np.abs(steered[~keep] - plain[~keep]).mean() > 1e-3  # inside: the ControlNet made a difference


def test_bad_controlnet_params_are_reported_at_validation(tiny, tmp_path):
    from nodegraph.api import Engine
    from nodegraph.errors import WorkflowInvalid
    from tests.test_diffusion_workflows import WORKFLOWS

    pickle = tmp_path / "cn.pth"
    pickle.write_bytes(b"x")
    with pytest.raises(WorkflowInvalid) as err:
        Engine(cache_dir=False).compile(WORKFLOWS / "controlnet_inpaint.json", overrides={
            "ckpt.path": str(tiny.sd15_inpaint), "controlnet.path": str(pickle), "controlled.start": 0.8,
            "controlled.end": 0.2, "controlled.strength": -1})
    found = {(i.node_id, i.field): i.message for i in err.value.issues}
    assert "pickle" in found[("controlnet", "path")]
    assert "after end" in found[("controlled", "start")]
    assert ("controlled", "strength") in found


def test_sides_positive_leaves_the_unconditional_half_alone(sd, controlnets):
    """ComfyUI's ControlNetApply: zero residuals for the negative prompt's half, the ControlNet's for the other."""
    model, clip, _ = sd
    cn = load_controlnet(controlnets["sd_a"])
    seen = []

    class Spy(denoise.Hook):
        def unet_kwargs(self, step):
            seen.append(step.kwargs["mid_block_additional_residual"])

    def run(sides, guidance, spy=False):
        patched = apply_controlnet(model, cn, control(), 1.0, sides=sides)
        patched = patched.with_patch(Patch(Spy())) if spy else patched
        return denoise.sample(patched, encode_prompt(clip, PROMPT), None, empty_latent(64, 64), seed=1, steps=2,
                              guidance_scale=guidance, scheduler="euler", strength=1.0)

    assert torch.equal(run("positive", 1.0), run("both", 1.0))  # without guidance there is one half only
    assert (run("positive", 5.0) - run("both", 5.0)).abs().max() > 1e-3
    run("positive", 5.0, spy=True)
    uncond, cond = seen[0].chunk(2)
    assert torch.equal(uncond, torch.zeros_like(uncond)) and cond.abs().max() > 0


# ---------------------------------------------------------------------------------------------- ComfyUI import

def comfy_prompt() -> dict:
    """ComfyUI's default txt2img graph (API format) with two ControlNets: Apply (positive only), then Advanced."""
    from tests.test_comfy_import import txt2img

    prompt = txt2img()
    prompt["20"] = {"class_type": "ControlNetLoader", "inputs": {"control_net_name": "canny"}}
    prompt["21"] = {"class_type": "LoadImage", "inputs": {"image": "edges.png"}}
    prompt["22"] = {"class_type": "ControlNetApply", "inputs": {"conditioning": ["6", 0], "control_net": ["20", 0],
                                                                 "image": ["21", 0], "strength": 0.6}}
    prompt["23"] = {"class_type": "ControlNetApplyAdvanced", "inputs": {
        "positive": ["22", 0], "negative": ["7", 0], "control_net": ["20", 0], "image": ["21", 0], "strength": 0.9,
        "start_percent": 0.1, "end_percent": 0.8}}
    prompt["3"]["inputs"].update(positive=["23", 0], negative=["23", 1])
    return prompt


def test_comfy_controlnet_nodes_become_apply_controlnet_on_the_sampler_s_model():
    from nodegraph.comfy import import_api

    nodes = import_api(comfy_prompt())["nodes"]
    assert nodes["20"] == {"type": "LoadControlNet", "params": {"path": "canny"}}
    assert "22" not in nodes and "23" not in nodes  # the conditionings pass through
    assert nodes["3"]["inputs"]["positive"] == "6.conditioning" and nodes["3"]["inputs"]["negative"] == "7.conditioning"
    first, second = nodes["3_controlnet0"], nodes["3_controlnet1"]
    assert first == {"type": "ApplyControlNet", "inputs": {"model": "4.model", "control_net": "20.control_net",
                                                           "image": "21.image"},
                     "params": {"strength": 0.6, "start": 0.0, "end": 1.0, "sides": "positive"}}
    assert second["inputs"]["model"] == "3_controlnet0.model"
    assert second["params"] == {"strength": 0.9, "start": 0.1, "end": 0.8, "sides": "both"}
    assert nodes["3"]["inputs"]["model"] == "3_controlnet1.model"


def test_comfy_controlnet_on_the_negative_prompt_only_is_reported():
    from nodegraph.comfy import to_nodegraph
    from nodegraph.errors import WorkflowInvalid

    prompt = comfy_prompt()
    prompt["22"]["inputs"]["conditioning"] = ["7", 0]
    prompt["23"]["inputs"].update(positive=["6", 0], negative=["22", 0])
    with pytest.raises(WorkflowInvalid) as err:
        to_nodegraph(prompt)
    assert any(i.node_id == "3" and "negative prompt only" in i.message for i in err.value.issues)


def test_a_latent_batch_shares_one_control_image(sd, controlnets):
    model, clip, _ = sd
    cn = load_controlnet(controlnets["sd_a"])
    image = control()
    ours = denoise.sample(apply_controlnet(model, cn, image, 1.1), encode_prompt(clip, PROMPT), None,
                          empty_latent(64, 64, batch=2), seed=11, steps=3, guidance_scale=5.0, scheduler="euler",
                          strength=1.0)
    pipe = cn_pipeline("StableDiffusionControlNetPipeline", sd, cn.module)
    ref = pipe(prompt=PROMPT, image=image, num_images_per_prompt=2, height=64, width=64, generator=gen(11),
               num_inference_steps=3, guidance_scale=5.0, controlnet_conditioning_scale=1.1, output_type="latent").images
    assert_close(ours, ref)


def test_a_controlnet_that_does_not_fit_names_the_node_when_the_workflow_runs(tiny, controlnets, tmp_path):
    from nodegraph.api import Engine
    from nodegraph.errors import NodeFailed
    from tests.test_diffusion_workflows import WORKFLOWS

    overrides = {"ckpt.path": str(tiny.sd15_inpaint), "controlnet.path": str(controlnets["xl"]), "resize.width": 64,
                 "resize.height": 64, "mask.width": 64, "mask.height": 64, "inpaint.steps": 2}
    with pytest.raises(NodeFailed) as err:
        Engine(cache_dir=False).run(WORKFLOWS / "controlnet_inpaint.json", overrides=overrides, out_dir=tmp_path)
    text = str(err.value)
    assert "controlled" in text and "ApplyControlNet" in text and "does not fit" in text
    assert not list(tmp_path.glob("*.png"))  # nothing half-written
