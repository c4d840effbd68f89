"""SDXL through the nodes: family detection, bad checkpoints caught at validation, conditioning mismatches,
the float16 VAE upcast, SDXLSizeConditioning, and a base -> refiner hand-off workflow run by the engine."""
from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch

from nodegraph.api import Engine
from nodegraph.errors import NodeError, WorkflowInvalid
from nodegraph.nodes import denoise
from nodegraph.nodes._families import micro_conditioning
from nodegraph.nodes.conditioning import encode_prompt, sdxl_size_conditioning
from nodegraph.nodes.latent import Latents, decode_latents, empty_latent, encode_pixels
from nodegraph.nodes.models import inspect_checkpoint, load_checkpoint
from tests.test_diffusion_parity import photo
from tests.tiny_models import build_tiny_models

KW = dict(seed=0, steps=2, guidance_scale=5.0, scheduler="euler", strength=1.0)


# ---------------------------------------------------------------------------------------------- detection

def test_family_detection(tiny_xl):
    expected = {tiny_xl.base: ("sdxl", 4, "SDXL"), tiny_xl.inpaint: ("sdxl", 9, "SDXL inpainting"),
                tiny_xl.refiner: ("sdxl_refiner", 4, "SDXL refiner")}
    for path, (family, channels, label) in expected.items():
        info = inspect_checkpoint(str(path))
        assert (info.family, info.in_channels, info.label) == (family, channels, label)
        assert "Stable Diffusion XL" in info.describe() and f"({label})" in info.describe()
    model, clip, vae = load_checkpoint(inspect_checkpoint(str(tiny_xl.refiner)))
    assert clip.text_encoder is None and clip.text_encoder_2 is not None and not clip.force_zeros_for_empty_prompt
    model, clip, vae = load_checkpoint(inspect_checkpoint(str(tiny_xl.base)))
    assert type(clip.text_encoder).__name__ == "CLIPTextModel"
    assert type(clip.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    assert clip.force_zeros_for_empty_prompt and vae.force_upcast and model.is_sdxl


def test_single_file_gives_the_folder_weights(tiny_xl, xl):
    info = inspect_checkpoint(str(tiny_xl.base_file))  # the sidecar <stem>.config/ folder is found
    assert info.kind == "file" and info.label == "SDXL" and info.config_dir == tiny_xl.base_file.with_suffix(".config")
    model, clip, vae = load_checkpoint(info)
    pairs = [(model.unet, xl[0].unet), (vae.vae, xl[2].vae), (clip.text_encoder, xl[1].text_encoder),
             (clip.text_encoder_2, xl[1].text_encoder_2)]
    for ours, theirs in pairs:
        a, b = ours.state_dict(), theirs.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert clip.force_zeros_for_empty_prompt
    assert inspect_checkpoint(str(tiny_xl.inpaint_file)).label == "SDXL inpainting"


def test_single_file_config_problems(tiny_xl, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))
    lonely = tmp_path / "lonely-xl.safetensors"
    shutil.copy(tiny_xl.base_file, lonely)
    with pytest.raises(NodeError, match="not a standard Stable Diffusion XL model"):  # the shipped SDXL configs
        inspect_checkpoint(str(lonely))
    # an SD 1.x config for an SDXL file, or a base config for an inpainting file, is caught before loading
    sd_config = build_tiny_models().sd15_file_config
    with pytest.raises(NodeError, match="missing text_encoder_2/config.json, tokenizer_2/"):
        inspect_checkpoint(str(lonely), config=str(sd_config))
    with pytest.raises(NodeError, match="9"):
        inspect_checkpoint(str(tiny_xl.inpaint_file), config=str(tiny_xl.base_file.with_suffix(".config")))


def run_load(path, tmp_path):
    workflow = {"format": "nodegraph/1", "nodes": {"ckpt": {"type": "LoadCheckpoint", "params": {"path": str(path)}}}}
    return Engine().run(workflow, targets=["ckpt"], out_dir=tmp_path)


def test_load_node_reports_the_kind(tiny_xl, tmp_path):
    result = run_load(tiny_xl.inpaint, tmp_path)
    assert result.outputs["ckpt"]["model"].label == "SDXL inpainting"


def broken(tiny_xl, tmp_path, name, edit):
    folder = tmp_path / name
    shutil.copytree(tiny_xl.base, folder)
    edit(folder)
    return folder


def validation_issues(path):
    workflow = {"format": "nodegraph/1", "nodes": {"ckpt": {"type": "LoadCheckpoint", "params": {"path": str(path)}}}}
    with pytest.raises(WorkflowInvalid) as err:
        Engine().compile(workflow)
    return {(i.node_id, i.field): i.message for i in err.value.issues}


def test_bad_sdxl_folders_are_caught_at_validation(tiny_xl, tmp_path):
    no_second = broken(tiny_xl, tmp_path, "no-second", lambda f: shutil.rmtree(f / "text_encoder_2"))
    assert "no text_encoder_2" in validation_issues(no_second)[("ckpt", "path")]

    def widen(folder):
        config = json.loads((folder / "unet" / "config.json").read_text())
        (folder / "unet" / "config.json").write_text(json.dumps({**config, "cross_attention_dim": 96}))

    wrong_width = broken(tiny_xl, tmp_path, "wrong-width", widen)
    assert "cross_attention_dim is 96" in validation_issues(wrong_width)[("ckpt", "path")]

    def no_first(folder):
        shutil.rmtree(folder / "text_encoder")
        config = json.loads((folder / "unet" / "config.json").read_text())
        (folder / "unet" / "config.json").write_text(json.dumps({**config, "cross_attention_dim": 48}))

    half = broken(tiny_xl, tmp_path, "no-first", no_first)
    assert "not the refiner's 5" in validation_issues(half)[("ckpt", "path")]


# ---------------------------------------------------------------------------------------------- mismatches

def test_sd1_conditioning_on_sdxl_and_the_reverse_fail_clearly(xl):
    model, clip, vae = xl
    sd = load_checkpoint(inspect_checkpoint(str(build_tiny_models().sd15)))
    sd1_cond = encode_prompt(sd[1], "a castle")
    with pytest.raises(NodeError, match="SD 1.x CLIP but the model is SDXL"):
        denoise.sample(model, sd1_cond, None, empty_latent(64, 64), **KW)
    with pytest.raises(NodeError, match="negative conditioning comes from an SD 1.x CLIP"):
        denoise.sample(model, encode_prompt(clip, "a castle"), sd1_cond, empty_latent(64, 64), **KW)
    with pytest.raises(NodeError, match="SDXL CLIP but the model is not SDXL"):
        denoise.sample(sd[0], encode_prompt(clip, "a castle"), None, empty_latent(64, 64), **KW)
    with pytest.raises(NodeError, match="prompt_2 is for SDXL"):
        encode_prompt(sd[1], "a castle", text_2="a door")


def test_handoff_misuse(xl):
    model, clip, _ = xl
    with pytest.raises(NodeError, match="EmptyLatent has none"):
        denoise.sample(model, encode_prompt(clip, "x"), None, empty_latent(64, 64), **{**KW, "strength": 1.0},
                       denoising_start=0.5)
    partly = Latents(torch.randn(1, 4, 8, 8))
    with pytest.raises(NodeError, match="below denoising_end"):
        denoise.sample(model, encode_prompt(clip, "x"), None, partly, **KW, denoising_start=0.6, denoising_end=0.5)
    with pytest.raises(NodeError, match="no step to run"):
        denoise.sample(model, encode_prompt(clip, "x"), None, empty_latent(64, 64), **KW, denoising_end=0.1)


def test_partial_inpainting_result_keeps_its_conditioning(tiny_xl):
    """Sampler with denoising_end on an inpainting model hands the mask and masked latents on; a normal
    model continuing it with denoising_start ignores them."""
    from nodegraph.context import RunContext
    from nodegraph.nodes.latent import inpaint_conditioning
    from nodegraph.nodes.sampling import sampler_node

    model, clip, vae = load_checkpoint(inspect_checkpoint(str(tiny_xl.inpaint)))
    latent = inpaint_conditioning(vae, photo(), torch.ones(1, 1, 64, 64))
    params = dict(seed=1, steps=3, guidance_scale=5.0, scheduler="euler")
    half = sampler_node(model, encode_prompt(clip, "x"), latent, RunContext(), denoising_end=0.5, **params)
    assert half.has_inpaint_conditioning and torch.equal(half.inpaint_mask, latent.inpaint_mask)
    full = sampler_node(model, encode_prompt(clip, "x"), latent, RunContext(), **params)
    assert not full.has_inpaint_conditioning
    base, base_clip, _ = load_checkpoint(inspect_checkpoint(str(tiny_xl.base)))
    done = sampler_node(base, encode_prompt(base_clip, "x"), half, RunContext(), denoising_start=0.5, **params)
    assert done.samples.shape == half.samples.shape and not done.has_inpaint_conditioning


# ---------------------------------------------------------------------------------------------- VAE, sizes

def test_float16_vae_runs_in_float32_and_stays_float16(tiny_xl):
    _, _, vae = load_checkpoint(inspect_checkpoint(str(tiny_xl.base)), dtype=torch.float16)
    assert vae.vae.dtype == torch.float16 and vae.force_upcast
    image = photo()
    latents = encode_pixels(vae, image)
    assert latents.dtype == torch.float16 and vae.vae.dtype == torch.float16
    # the same weights in float32 give the same latents and pixels: the work ran in float32 (then, as in the
    # SDXL img2img pipeline's prepare_latents, cast to the VAE's dtype and scaled)
    vae32 = copy.deepcopy(vae.vae).float()
    with torch.no_grad():
        ref = vae32.encode(image * 2 - 1).latent_dist.mode().half() * vae.scaling_factor
        ref_pixels = (vae32.decode(latents.float() / vae.scaling_factor).sample * 0.5 + 0.5).clamp(0, 1)
    assert torch.equal(latents, ref)
    pixels = decode_latents(vae, latents)
    assert pixels.dtype == torch.float32 and (pixels - ref_pixels).abs().max() < 1e-6
    assert vae.vae.dtype == torch.float16  # the shared module was never cast


def test_size_conditioning_node(xl):
    model, clip, _ = xl
    pos = encode_prompt(clip, "x")
    sized = sdxl_size_conditioning(pos, original_width=1024, original_height=768, crop_left=8, crop_top=16)
    assert sized.size == {"original_size": (768, 1024), "crop": (16, 8)} and pos.size == {}
    ids, neg_ids = micro_conditioning(model.unet.config, 40, (64, 48), sized.size, None)
    assert ids.tolist() == [[768, 1024, 16, 8, 64, 48]] and neg_ids.tolist() == ids.tolist()
    with pytest.raises(NodeError, match="needs an SDXL conditioning"):
        sdxl_size_conditioning(encode_prompt(load_checkpoint(inspect_checkpoint(str(build_tiny_models().sd15)))[1],
                                             "x"))


# ---------------------------------------------------------------------------------------------- workflow

def handoff_workflow(base, refiner):
    return {
        "format": "nodegraph/1",
        "nodes": {
            "base": {"type": "LoadCheckpoint", "params": {"path": str(base)}},
            "refiner": {"type": "LoadCheckpoint", "params": {"path": str(refiner)}},
            "prompt": {"type": "CLIPEncode", "inputs": {"clip": "base.clip"}, "params": {"text": "an elven castle"}},
            "sized": {"type": "SDXLSizeConditioning", "inputs": {"conditioning": "prompt.conditioning"},
                      "params": {"original_width": 1024, "original_height": 1024}},
            "prompt_r": {"type": "CLIPEncode", "inputs": {"clip": "refiner.clip"}, "params": {"text": "an elven castle"}},
            "empty": {"type": "EmptyLatent", "params": {"width": 64, "height": 64}},
            "t2i": {"type": "Sampler", "inputs": {"model": "base.model", "positive": "sized.conditioning",
                                                  "latent": "empty.latent"},
                    "params": {"seed": 1, "steps": 4, "guidance_scale": 5.0, "scheduler": "dpmpp_2m_karras",
                               "denoising_end": 0.75}},
            "refine": {"type": "Sampler", "inputs": {"model": "refiner.model", "positive": "prompt_r.conditioning",
                                                     "latent": "t2i.latent"},
                       "params": {"seed": 2, "steps": 4, "guidance_scale": 5.0, "scheduler": "dpmpp_2m_karras",
                                  "denoising_start": 0.75}},
            "decode": {"type": "VAEDecode", "inputs": {"vae": "base.vae", "latent": "refine.latent"}},
        },
    }


def test_base_refiner_handoff_workflow(tiny_xl, tmp_path):
    workflow = handoff_workflow(tiny_xl.base, tiny_xl.refiner)
    engine = Engine()
    result = engine.run(workflow, targets=["decode", "t2i", "refine"], out_dir=tmp_path)
    image = result.outputs["decode"]["image"]
    assert image.shape == (1, 3, 64, 64) and 0 <= image.min() and image.max() <= 1
    half, done = result.outputs["t2i"]["latent"].samples, result.outputs["refine"]["latent"].samples
    assert (half - done).abs().max() > 1e-3
    # changing the refiner's seed reruns only the refiner stage
    again = engine.run(workflow, targets=["decode"], overrides={"refine.seed": 3}, out_dir=tmp_path)
    assert again.status["t2i"] == "cached" and again.status["refine"] == "ran"
    # start >= end is caught at validation
    bad = copy.deepcopy(workflow)
    bad["nodes"]["refine"]["params"]["denoising_end"] = 0.5
    with pytest.raises(WorkflowInvalid, match="below denoising_end"):
        engine.compile(bad)


def test_sdxl_chunked_prompt_pads_the_shorter_encoder_with_empty_windows(xl):
    from nodegraph.nodes.conditioning import encode_text_sdxl

    _, clip, _ = xl
    long = " ".join(["castle"] * 30)  # two 75-token windows for the first encoder
    embeds, _ = encode_text_sdxl(clip, long, "a castle", long_prompt="chunk")
    assert embeds.shape[1] == 2 * 77
    width_1 = clip.text_encoder.config.hidden_size
    short, _ = encode_text_sdxl(clip, "a castle", "a castle", long_prompt="chunk")
    empty, _ = encode_text_sdxl(clip, "", "", long_prompt="chunk")
    assert torch.equal(embeds[:, :77, width_1:], short[:, :, width_1:])  # the second encoder's own window
    assert torch.equal(embeds[:, 77:, width_1:], empty[:, :, width_1:])  # then an empty one
