"""LoadCheckpoint, CLIPEncode, the VAE nodes and the sampler nodes' behaviour, on tiny offline models."""
from __future__ import annotations

import json
import shutil
import warnings

import pytest
import torch

from nodegraph.context import RunContext
from nodegraph.errors import Interrupted, NodeError
from nodegraph.serialize import flatten, unflatten
from nodegraph.nodes import denoise
from nodegraph.nodes.conditioning import PromptEmbeds, clip_encode, encode_prompt
from nodegraph.nodes.latent import Latents, decode_latents, empty_latent, encode_pixels, inpaint_conditioning
from nodegraph.nodes.models import inspect_checkpoint, load_checkpoint, load_checkpoint_node, path_problem
from nodegraph.nodes.sampling import latent_blend_sampler_node, sampler_node

LONG = " ".join(["castle"] * 30)  # about 90 byte-level tokens with the tiny vocab: longer than 77


def ctx(**kw):
    return RunContext(**kw)


def image(h=64, w=64, seed=0):
    return torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------- loading

def test_folder_and_single_file_give_the_same_model(tiny, sd):
    file_info = inspect_checkpoint(str(tiny.sd15_file))  # the sidecar <stem>.config/ folder is found
    assert file_info.kind == "file" and file_info.config_dir == tiny.sd15_file_config
    model, clip, vae = load_checkpoint(file_info)
    for ours, theirs in ((model.unet, sd[0].unet), (vae.vae, sd[2].vae), (clip.text_encoder, sd[1].text_encoder)):
        a, b = ours.state_dict(), theirs.state_dict()
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert model.family == "sd1" and not model.inpainting


def test_family_and_inpainting_detection(tiny):
    for path in (tiny.sd15_inpaint, tiny.sd15_inpaint_file):
        info = inspect_checkpoint(str(path))
        assert info.family == "sd1" and info.in_channels == 9 and info.inpainting
        assert "inpainting UNet (9 input channels)" in info.describe()
    info = inspect_checkpoint(str(tiny.sd15))
    assert info.in_channels == 4 and "Stable Diffusion 1.x" in info.describe()


def test_sd2_family_from_the_unet_config(tmp_path, tiny):
    folder = tmp_path / "sd2"
    shutil.copytree(tiny.sd15, folder)
    config = json.loads((folder / "unet" / "config.json").read_text())
    (folder / "unet" / "config.json").write_text(json.dumps({**config, "cross_attention_dim": 1024}))
    assert inspect_checkpoint(str(folder)).family == "sd2"
    (folder / "unet" / "config.json").write_text(json.dumps({**config, "addition_embed_type": "text_time"}))
    with pytest.raises(NodeError, match="Stable Diffusion XL"):
        inspect_checkpoint(str(folder))


def test_explicit_config_and_missing_config(tmp_path, tiny, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))
    lonely = tmp_path / "lonely.safetensors"
    shutil.copy(tiny.sd15_file, lonely)
    with pytest.raises(NodeError, match="config") as err:  # the shipped SD 1.5 configs do not fit a tiny model
        inspect_checkpoint(str(lonely))
    assert "not a standard Stable Diffusion 1.x model" in str(err.value) and "lonely.config/" in str(err.value)
    info = inspect_checkpoint(str(lonely), config=str(tiny.sd15_file_config))
    assert info.config_dir == tiny.sd15_file_config
    with pytest.raises(NodeError, match="9 input channels|input channels"):
        inspect_checkpoint(str(lonely), config=str(tiny.sd15_inpaint_file_config))


def _fake_hub_cache(cache, repo_id, folder):
    """The layout huggingface_hub keeps: models--owner--name/{refs/main, snapshots/<commit>/...}."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)


def test_hub_id_from_the_local_cache_and_a_clear_error_when_missing(tmp_path, tiny, monkeypatch):
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    _fake_hub_cache(cache, "tiny-org/tiny-sd15", tiny.sd15)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    info = inspect_checkpoint("tiny-org/tiny-sd15")
    assert info.hub_id == "tiny-org/tiny-sd15" and info.family == "sd1"
    model, _, _ = load_checkpoint(info)
    assert model.source == "tiny-org/tiny-sd15"
    with pytest.raises(NodeError) as err:
        inspect_checkpoint("tiny-org/not-downloaded")
    assert "not in the local Hugging Face cache" in str(err.value)
    assert "huggingface-cli download tiny-org/not-downloaded" in str(err.value)


def test_pickles_and_non_models_are_refused_before_loading(tmp_path, tiny):
    (tmp_path / "model.ckpt").write_bytes(b"not really a pickle")
    assert "pickle" in path_problem(str(tmp_path / "model.ckpt"))
    (tmp_path / "empty").mkdir()
    assert "not a diffusers model" in path_problem(str(tmp_path / "empty"))
    assert "no such checkpoint" in path_problem(str(tmp_path / "missing" / "x.safetensors"))
    assert path_problem("owner/name") is None  # a hub id, looked up at run time
    bin_only = tmp_path / "bin-only"
    shutil.copytree(tiny.sd15, bin_only)
    for weights in (bin_only / "unet").glob("*.safetensors"):
        weights.rename(weights.with_suffix(".bin"))
    with pytest.raises(NodeError, match="pickle"):
        inspect_checkpoint(str(bin_only))


def test_one_load_per_checkpoint_shared_by_every_node(tiny):
    first = load_checkpoint_node(path=str(tiny.sd15), ctx=ctx(), config=None, dtype="auto")
    run = ctx(node_id="ckpt2")
    second = load_checkpoint_node(path=str(tiny.sd15), ctx=run, config=None, dtype="auto")
    assert all(first[k] is second[k] for k in ("model", "clip", "vae"))
    assert run.info["models"]["ckpt2"]["family"] == "sd1"
    assert run.info["models"]["ckpt2"]["inpainting"] is False
    other_dtype = load_checkpoint_node(path=str(tiny.sd15), ctx=ctx(), config=None, dtype="bfloat16")
    assert other_dtype["model"] is not first["model"] and other_dtype["model"].dtype == torch.bfloat16


# ---------------------------------------------------------------------------------------------- CLIPEncode

def test_clip_encode_matches_diffusers_encode_prompt(sd):
    from diffusers import StableDiffusionPipeline

    model, clip, vae = sd
    pipe = StableDiffusionPipeline(vae=vae.vae, text_encoder=clip.text_encoder, tokenizer=clip.tokenizer,
                                   unet=model.unet, scheduler=None, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    cond = clip_encode(clip, ctx(), text="a castle", clip_skip=0, long_prompt="truncate")
    pe, ne = pipe.encode_prompt("a castle", "cpu", 1, True)
    assert torch.equal(cond.embeds, pe) and torch.equal(cond.uncond.embeds, ne)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        long = clip_encode(clip, ctx(node_id="pos"), text=LONG, clip_skip=0, long_prompt="truncate")
    assert any("truncated" in str(w.message) and "node 'pos'" in str(w.message) for w in caught)
    assert torch.equal(long.embeds, pipe.encode_prompt(LONG, "cpu", 1, False)[0])


def test_chunked_long_prompt(sd):
    model, clip, _ = sd
    short_chunked = encode_prompt(clip, "a castle", long_prompt="chunk").embeds
    assert torch.equal(short_chunked, encode_prompt(clip, "a castle").embeds)
    chunked = encode_prompt(clip, LONG, long_prompt="chunk")
    assert chunked.embeds.shape[1] == 2 * 77
    assert torch.equal(chunked.embeds[:, :77], encode_prompt(clip, LONG).embeds)  # first window = the truncation
    # the sampler pads the default negative with empty-prompt chunks, as diffusers would see it given embeds
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline(vae=sd[2].vae, text_encoder=clip.text_encoder, tokenizer=clip.tokenizer,
                                   unet=model.unet, scheduler=EulerDiscreteScheduler.from_config(model.scheduler_config),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    ours = denoise.sample(model, chunked, None, empty_latent(64, 64), seed=1, steps=2, guidance_scale=7.5,
                          scheduler="euler", strength=1.0)
    negative = torch.cat([chunked.uncond.embeds] * 2, dim=1)
    ref = pipe(prompt_embeds=chunked.embeds, negative_prompt_embeds=negative, generator=torch.Generator().manual_seed(1),
               num_inference_steps=2, height=64, width=64, output_type="latent").images
    assert (ours - ref).abs().max() <= 1e-4


def test_clip_skip_uses_an_earlier_layer_through_the_final_norm(sd):
    _, clip, _ = sd
    ids = clip.tokenizer("a castle", padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = clip.text_encoder(ids, output_hidden_states=True).hidden_states[-2]
        expected = clip.text_encoder.final_layer_norm(hidden)
    skipped = encode_prompt(clip, "a castle", clip_skip=1).embeds
    assert torch.allclose(skipped, expected)
    assert not torch.allclose(skipped, encode_prompt(clip, "a castle").embeds)


# ---------------------------------------------------------------------------------------------- VAE

def test_vae_encode_decode_match_diffusers(sd):
    from diffusers.image_processor import VaeImageProcessor
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img import retrieve_latents

    _, _, vae = sd
    pixels = image()
    sf = vae.vae.config.scaling_factor
    with torch.no_grad():
        dist = vae.vae.encode(pixels * 2 - 1)
        assert torch.equal(encode_pixels(vae, pixels), dist.latent_dist.mean * sf)
        sampled = retrieve_latents(dist, generator=torch.Generator().manual_seed(3)) * sf
        latents = encode_pixels(vae, pixels, mode="sample", seed=3)
        assert torch.equal(latents, sampled)
        ref = VaeImageProcessor(vae_scale_factor=8).postprocess(vae.vae.decode(latents / sf).sample, output_type="pt")
    assert torch.allclose(decode_latents(vae, latents), ref)
    assert latents.shape == (1, 4, 8, 8)  # the VAE downsamples by 8


def test_vae_rejects_sizes_that_are_not_multiples_of_8(sd):
    with pytest.raises(NodeError, match="multiples of 8"):
        encode_pixels(sd[2], image(60, 64))


def test_latent_values_survive_the_disk_cache(sd):
    _, clip, vae = sd
    cond = encode_prompt(clip, "a castle")
    latents = inpaint_conditioning(vae, image(), torch.ones(1, 1, 64, 64))
    for value in (cond, latents, empty_latent(64, 32)):
        structure, tensors = flatten(value)
        back = unflatten(json.loads(json.dumps(structure)), tensors)
        assert type(back) is type(value)
    back = unflatten(*flatten(cond))
    assert isinstance(back.uncond, PromptEmbeds) and torch.equal(back.uncond.embeds, cond.uncond.embeds)


# ---------------------------------------------------------------------------------------------- samplers

def test_progress_is_reported_and_interrupt_stops_between_steps(sd):
    model, clip, _ = sd
    events = []

    def listener(event):
        events.append((event.step, event.total))
        if event.step == 2:
            run.interrupt.set()

    run = ctx(node_id="t2i", node_type="Sampler", listeners=[listener])
    with pytest.raises(Interrupted):
        sampler_node(model=model, positive=encode_prompt(clip, "x"), latent=empty_latent(64, 64), ctx=run, steps=5)
    assert events == [(1, 5), (2, 5)]


def test_samplers_do_not_mutate_their_inputs(sd):
    model, clip, vae = sd
    latent = Latents(encode_pixels(vae, image()))
    before = latent.samples.clone()
    mask = torch.ones(1, 1, 64, 64)
    out = latent_blend_sampler_node(model=model, positive=encode_prompt(clip, "x"), latent=latent, mask=mask, ctx=ctx(),
                                    steps=2, strength=0.5)
    assert torch.equal(latent.samples, before) and torch.equal(mask, torch.ones(1, 1, 64, 64))
    assert out.samples.shape == before.shape and not out.empty
    # results are ordinary tensors (the work runs in inference mode): later nodes may modify copies freely
    decoded = decode_latents(vae, out.samples)
    for tensor in (out.samples, latent.samples, decoded, encode_prompt(clip, "x").embeds):
        assert not tensor.is_inference()
    decoded.mul_(0.5)


def test_family_mismatch_errors(tiny, sd):
    model, clip, vae = sd
    inpaint_model, inpaint_clip, inpaint_vae = load_checkpoint(inspect_checkpoint(str(tiny.sd15_inpaint)))
    pos = encode_prompt(inpaint_clip, "x")
    plain = Latents(encode_pixels(inpaint_vae, image()))
    kwargs = dict(seed=0, steps=2, guidance_scale=7.5, scheduler="euler", strength=1.0)
    with pytest.raises(NodeError, match="inpainting checkpoint.*InpaintModelConditioning"):
        denoise.blend_inpaint(inpaint_model, pos, None, plain, torch.ones(1, 1, 64, 64), **kwargs)
    with pytest.raises(NodeError, match="InpaintModelConditioning"):
        denoise.sample(inpaint_model, pos, None, plain, **kwargs)
    conditioned = inpaint_conditioning(vae, image(), torch.ones(1, 1, 64, 64))
    with pytest.raises(NodeError, match="LatentBlendSampler"):
        denoise.sample(model, encode_prompt(clip, "x"), None, conditioned, **kwargs)
    with pytest.raises(NodeError, match="EmptyLatent"):
        denoise.sample(model, encode_prompt(clip, "x"), None, empty_latent(64, 64), **{**kwargs, "strength": 0.5})
    with pytest.raises(NodeError, match="no step to run"):
        denoise.sample(model, encode_prompt(clip, "x"), None, plain, **{**kwargs, "steps": 2, "strength": 0.3})


@pytest.mark.parametrize("readers", [1, 2, 3])
def test_parallel_readers_give_the_file_s_tensors(tmp_path, readers):
    """Readers that each take a part of the file give every tensor once, converted, in the file's order; a
    broken file is still a clear error whichever reader meets it."""
    from safetensors.torch import load_file, save_file

    from nodegraph.nodes._files import read_state_dict

    g = torch.Generator().manual_seed(0)
    tensors = {f"w{i}": torch.randn(i * 7 + 1, 5, generator=g).half() for i in range(9)}
    tensors |= {"ids": torch.arange(77)[None], "empty": torch.zeros(0), "scalar": torch.tensor(2.5)}
    file = tmp_path / "t.safetensors"
    save_file(tensors, str(file))
    ours, theirs = read_state_dict(file, torch.float32, readers=readers), load_file(str(file))
    assert list(ours) == list(theirs)  # safetensors gives them in file order too
    for name, tensor in theirs.items():
        expected = tensor.float() if tensor.is_floating_point() else tensor
        assert ours[name].dtype == expected.dtype and torch.equal(ours[name], expected)
    data = file.read_bytes()
    file.write_bytes(data[:len(data) - 8])  # the last tensor is cut short
    with pytest.raises(NodeError, match="as safetensors"):
        read_state_dict(file, torch.float32, readers=readers)


@pytest.mark.parametrize("stored, loaded", [(torch.float32, torch.float32), (torch.float16, torch.float32),
                                            (torch.float32, torch.float16)])
def test_single_files_load_tensor_by_tensor_to_diffusers_weights(tiny, tmp_path, stored, loaded):
    """read_state_dict converts each tensor as it is read; the models equal diffusers' from_single_file."""
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file, save_file

    file = tmp_path / "model.safetensors"
    save_file({k: (v.to(stored) if v.is_floating_point() else v) for k, v in load_file(str(tiny.sd15_file)).items()},
              str(file))
    shutil.copytree(tiny.sd15_file_config, tmp_path / "model.config")
    model, clip, vae = load_checkpoint(inspect_checkpoint(str(file)), loaded)
    pipe = StableDiffusionPipeline.from_single_file(str(file), config=str(tmp_path / "model.config"), torch_dtype=loaded,
                                                    local_files_only=True, safety_checker=None, feature_extractor=None,
                                                    requires_safety_checker=False)
    for ours, theirs in ((model.unet, pipe.unet), (vae.vae, pipe.vae), (clip.text_encoder, pipe.text_encoder)):
        a, b = ours.state_dict(), theirs.state_dict()
        assert a.keys() == b.keys() and all(a[k].dtype == loaded for k in a if a[k].is_floating_point())
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_vae_decode_refuses_to_give_nan_as_an_image(sd):
    """A VAE that overflows (float16) or has damaged weights decodes to NaN, which a saved PNG shows as black."""
    import copy

    from nodegraph.errors import NodeError
    from nodegraph.nodes.latent import vae_decode_node

    vae = copy.deepcopy(sd[2])
    with torch.no_grad():
        vae.vae.decoder.conv_out.bias[0] = float("nan")  # damaged weights
    with pytest.raises(NodeError, match="NaN or infinite"):
        vae_decode_node(vae, empty_latent(64, 64))
    assert torch.isfinite(vae_decode_node(sd[2], empty_latent(64, 64))).all()
