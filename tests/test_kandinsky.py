"""Kandinsky 2.2 against diffusers' own pipelines on tiny random components (fp32, CPU), its workflows end to
end, and the latent-space rule at validation.

Parity: the same seed, scheduler and image embeddings on both sides; the prior's embeddings and the final
latents must agree within 1e-4 with KandinskyV22PriorPipeline, KandinskyV22Pipeline and
KandinskyV22InpaintPipeline loaded from the same folders.
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nodegraph.nodes import denoise
from nodegraph.nodes.conditioning import PromptEmbeds
from nodegraph.nodes.latent import decode_latents, empty_latent, encode_image, inpaint_conditioning

TOL = 1e-4
PROMPT = "a horse in a field"


@pytest.fixture(scope="session")
def tiny_k():
    from tests.tiny_kandinsky import build_tiny_kandinsky

    return build_tiny_kandinsky()


@pytest.fixture(scope="session")
def k_prior(tiny_k):
    from nodegraph.nodes.kandinsky import load_prior

    return load_prior(tiny_k.prior, str(tiny_k.prior))


@pytest.fixture(scope="session")
def k_decoder(tiny_k):
    from nodegraph.nodes.kandinsky import load_decoder

    return load_decoder(tiny_k.decoder, str(tiny_k.decoder))


@pytest.fixture(scope="session")
def k_inpaint(tiny_k):
    from nodegraph.nodes.kandinsky import load_decoder

    return load_decoder(tiny_k.decoder_inpaint, str(tiny_k.decoder_inpaint))


def reference(cls_name, folder, scheduler=None):
    import diffusers

    pipe = getattr(diffusers, cls_name).from_pretrained(str(folder), local_files_only=True)
    if scheduler is not None:
        pipe.scheduler = scheduler
    pipe.set_progress_bar_config(disable=True)
    return pipe


def embeds(seed=0):
    """Random image embeddings, as diffusers' decoder tests give them (positive, negative)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 32, generator=g), torch.randn(1, 32, generator=g)


def conditioning(positive, negative):
    neg = PromptEmbeds(negative, family="kandinsky22")
    return PromptEmbeds(positive, family="kandinsky22", uncond=neg), neg


def photo(size=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.interpolate(torch.rand(1, 3, size // 16, size // 16, generator=g), size=(size, size), mode="bilinear",
                         align_corners=False).clamp(0, 1)


# ---------------------------------------------------------------------------------------------- prior

@pytest.mark.parametrize("negative", [None, "blurry"])
def test_prior_matches_the_prior_pipeline(tiny_k, k_prior, negative):
    from nodegraph.nodes.kandinsky import prior_embeddings

    got = prior_embeddings(k_prior, PROMPT, negative, None, 1.0, seed=3, steps=2, guidance_scale=4.0)
    out = reference("KandinskyV22PriorPipeline", tiny_k.prior)(
        PROMPT, negative_prompt=negative, num_inference_steps=2, guidance_scale=4.0,
        generator=torch.Generator().manual_seed(3), output_type="pt")
    assert got[0].shape == (1, 32)
    assert (got[0] - out.image_embeds).abs().max() <= TOL
    assert (got[1] - out.negative_image_embeds).abs().max() <= TOL
    other = prior_embeddings(k_prior, "a red boat", negative, None, 1.0, seed=3, steps=2, guidance_scale=4.0)
    assert (other[0] - got[0]).abs().max() > 1e-3  # the prompt matters


@pytest.mark.parametrize("weight", [1.0, 0.3])
def test_prior_from_an_image_and_its_mix_with_a_prompt_match_interpolate(tiny_k, k_prior, weight):
    from PIL import Image

    from nodegraph.nodes.kandinsky import prior_embeddings

    picture = photo(64, seed=4)
    got = prior_embeddings(k_prior, PROMPT, None, picture, weight, seed=2, steps=2, guidance_scale=4.0)
    pil = Image.fromarray((picture[0].permute(1, 2, 0).numpy() * 255).round().astype("uint8"))
    items, weights = ([pil], [1.0]) if weight == 1.0 else ([PROMPT, pil], [1 - weight, weight])
    out = reference("KandinskyV22PriorPipeline", tiny_k.prior).interpolate(
        items, weights, num_inference_steps=2, guidance_scale=4.0, generator=torch.Generator().manual_seed(2))
    assert (got[0] - out.image_embeds).abs().max() <= TOL
    assert (got[1] - out.negative_image_embeds).abs().max() <= TOL
    text_only = prior_embeddings(k_prior, PROMPT, None, None, 1.0, seed=2, steps=2, guidance_scale=4.0)[0]
    assert (got[0] - text_only).abs().max() > 1e-3  # the image counts


# ---------------------------------------------------------------------------------------------- decoder

@pytest.mark.parametrize("scheduler,guidance", [("ddim", 4.0), ("ddim", 1.0), ("ddpm", 4.0)])
def test_text2img_matches_the_decoder_pipeline(tiny_k, k_decoder, scheduler, guidance):
    """EmptyLatent 128 px -> 16x16 latents; the pipeline gets the size that gives 16x16 with the tiny MoVQ
    (spatial factor 2: height 32). DDPM with a learned variance uses the UNet's variance channels."""
    from diffusers import DDIMScheduler, DDPMScheduler

    model, _ = k_decoder
    config = dict(model.scheduler_config)
    if scheduler == "ddpm":
        config["variance_type"] = "learned_range"
        model = type(model)(**{**model.__dict__, "scheduler_config": config})
    positive, negative = embeds(1)
    got = denoise.sample(model, *conditioning(positive, negative), empty_latent(128, 128), seed=5, steps=3,
                         guidance_scale=guidance, scheduler=scheduler, strength=1.0)
    cls = DDPMScheduler if scheduler == "ddpm" else DDIMScheduler
    want = reference("KandinskyV22Pipeline", tiny_k.decoder, cls.from_config(config))(
        image_embeds=positive, negative_image_embeds=negative, height=32, width=32, num_inference_steps=3,
        guidance_scale=guidance, generator=torch.Generator().manual_seed(5), output_type="latent").images
    assert got.shape == want.shape == (1, 4, 16, 16)
    assert (got - want).abs().max() <= TOL


def test_movq_encode_and_decode_match_diffusers(k_decoder):
    _, vae = k_decoder
    picture = photo(64, seed=1)
    latent = encode_image(vae, picture)
    assert latent.space == "Kandinsky 2.2 MoVQ" and latent.sample_std is None
    assert (latent.samples - vae.vae.encode(picture * 2 - 1).latents).abs().max() <= TOL  # unscaled
    pixels = (vae.vae.decode(latent.samples, force_not_quantize=True).sample * 0.5 + 0.5).clamp(0, 1)
    assert (decode_latents(vae, latent.samples) - pixels).abs().max() <= TOL
    quantised = (vae.vae.decode(latent.samples).sample * 0.5 + 0.5).clamp(0, 1)
    assert (decode_latents(vae, latent.samples) - quantised).abs().max() > 1e-3  # the quantiser is bypassed


def test_inpaint_matches_the_inpaint_pipeline(tiny_k, k_inpaint):
    model, vae = k_inpaint
    picture = photo(64, seed=2)
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., :32, :32] = 1
    positive, negative = embeds(2)
    latent = inpaint_conditioning(vae, picture, mask)
    got = denoise.blend_inpaint(model, *conditioning(positive, negative), latent, mask, seed=0, steps=2,
                                guidance_scale=4.0, scheduler="ddim", strength=1.0)
    want = reference("KandinskyV22InpaintPipeline", tiny_k.decoder_inpaint)(
        image=picture * 2 - 1, mask_image=mask.clone(), image_embeds=positive, negative_image_embeds=negative,
        height=64, width=64, num_inference_steps=2, guidance_scale=4.0, generator=torch.Generator().manual_seed(0),
        output_type="latent").images
    assert got.shape == want.shape == (1, 4, 32, 32)
    assert (got - want).abs().max() <= TOL


def test_grown_mask_is_diffusers_prepare_mask():
    """The one-pixel growth of the repaint area against diffusers' own loop on a scattered mask."""
    from diffusers.pipelines.kandinsky2_2.pipeline_kandinsky2_2_inpainting import prepare_mask

    from nodegraph.nodes.latent import grow_repaint

    repaint = (torch.rand(2, 1, 9, 11, generator=torch.Generator().manual_seed(0)) > 0.85).float()
    keep = prepare_mask(1 - repaint.clone())
    assert torch.equal(grow_repaint(repaint), 1 - keep)


def test_prompt_conditioning_into_kandinsky_and_the_reverse_fail_clearly(k_decoder, sd):
    from nodegraph.errors import NodeError
    from nodegraph.nodes.conditioning import encode_prompt

    model, _ = k_decoder
    text = encode_prompt(sd[1], "a castle")
    with pytest.raises(NodeError, match="takes image embeddings"):
        denoise.sample(model, text, None, empty_latent(64, 64), seed=0, steps=1, guidance_scale=4.0,
                       scheduler="ddim", strength=1.0)
    with pytest.raises(NodeError, match="takes prompt embeddings"):
        denoise.sample(sd[0], conditioning(*embeds())[0], None, empty_latent(64, 64), seed=0, steps=1,
                       guidance_scale=4.0, scheduler="ddim", strength=1.0)
    movq_latent = encode_image(k_decoder[1], photo(64))
    with pytest.raises(NodeError, match="decode to pixels and re-encode"):
        denoise.sample(sd[0], text, None, movq_latent, seed=0, steps=1, guidance_scale=4.0, scheduler="ddim",
                       strength=0.5)


# ---------------------------------------------------------------------------------------------- workflows

def _saved(result) -> np.ndarray:
    from PIL import Image

    assert len(result.files) == 1
    return np.asarray(Image.open(result.files[0]).convert("RGB"), dtype=np.float32) / 255.0


def _hub_cache(tmp_path, monkeypatch, repos: dict) -> None:
    """A local Hugging Face cache holding ``repos`` (hub id -> folder), in the cache's own layout."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    for repo_id, folder in repos.items():
        repo = cache / f"models--{repo_id.replace('/', '--')}"
        shutil.copytree(folder, repo / "snapshots" / "0123abc")
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text("0123abc")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))


def test_kandinsky_inpaint_workflow_with_its_hub_ids_keeps_the_photo(tiny_k, tmp_path, monkeypatch):
    """workflows/kandinsky_inpaint.json as shipped (hub ids), the tiny folders standing in the local cache."""
    from nodegraph.api import Engine
    from tests.test_diffusion_workflows import WORKFLOWS

    _hub_cache(tmp_path, monkeypatch, {"kandinsky-community/kandinsky-2-2-prior": tiny_k.prior,
                                       "kandinsky-community/kandinsky-2-2-decoder-inpaint": tiny_k.decoder_inpaint})
    workflow = WORKFLOWS / "kandinsky_inpaint.json"
    small = {"resize.width": 64, "resize.height": 64, "mask.width": 64, "mask.height": 64, "inpaint.steps": 2,
             "prior.steps": 2}
    engine = Engine(cache_dir=False)
    result = _saved(engine.run(workflow, overrides=small, out_dir=tmp_path / "a"))
    got = engine.run(workflow, overrides=small, targets=["resize", "feather", "decode"], out_dir=tmp_path / "b").outputs
    photo_ = got["resize"]["image"][0].permute(1, 2, 0).numpy()
    keep = got["feather"]["mask"][0, 0].numpy() == 0
    assert keep.sum() > 500 and (~keep).sum() > 100
    assert np.abs(result[keep] - photo_[keep]).max() <= 1 / 255 + 1e-6  # outside the mask: the photograph
    decoded = got["decode"]["image"][0].permute(1, 2, 0).numpy()
    assert np.abs(result[~keep] - photo_[~keep]).mean() > 1e-2  # inside: Kandinsky's pixels, not the photograph's
    assert np.abs(result[~keep] - decoded[~keep]).mean() < np.abs(photo_[~keep] - decoded[~keep]).mean()


def test_txt2img_kandinsky_inpaint_chain_with_a_models_folder(tiny, tiny_k, tmp_path):
    """workflows/txt2img_kandinsky_inpaint.json: SD text2img -> Kandinsky inpaint -> SD img2img, the Kandinsky
    folders found by name in the models folders' diffusers/."""
    from nodegraph.api import Engine
    from tests.test_diffusion_workflows import WORKFLOWS

    root = tmp_path / "models"
    shutil.copytree(tiny_k.prior, root / "diffusers" / "kandinsky-2-2-prior")
    shutil.copytree(tiny_k.decoder_inpaint, root / "diffusers" / "kandinsky-2-2-decoder-inpaint")
    workflow = WORKFLOWS / "txt2img_kandinsky_inpaint.json"
    small = {"ckpt.path": str(tiny.sd15), "kandinsky.prior": "kandinsky-2-2-prior",
             "kandinsky.decoder": "kandinsky-2-2-decoder-inpaint", "empty.width": 64, "empty.height": 64,
             "centre.width": 64, "centre.height": 64, "t2i.steps": 2, "waterfall.steps": 2, "inpaint.steps": 2,
             "i2i.steps": 3}
    engine = Engine(cache_dir=False, models=[root])
    final = _saved(engine.run(workflow, overrides=small, out_dir=tmp_path / "a"))
    got = engine.run(workflow, overrides=small, targets=["castle_image", "feather", "overlay"],
                     out_dir=tmp_path / "b").outputs
    castle = got["castle_image"]["image"][0].permute(1, 2, 0).numpy()
    overlay = got["overlay"]["image"][0].permute(1, 2, 0).numpy()
    keep = got["feather"]["mask"][0, 0].numpy() == 0
    assert keep.sum() > 500 and (~keep).sum() > 100
    assert np.array_equal(overlay[keep], castle[keep])  # the castle's pixels, exactly, outside the mask
    assert np.abs(overlay[~keep] - castle[~keep]).mean() > 1e-2  # Kandinsky repainted the centre
    assert final.shape == (64, 64, 3) and np.abs(final - overlay).mean() > 1e-3  # the img2img pass ran


# ---------------------------------------------------------------------------------------------- validation

def _workflow(tiny, tiny_k, **changes):
    from tests.test_diffusion_workflows import WORKFLOWS

    data = json.loads((WORKFLOWS / "txt2img_kandinsky_inpaint.json").read_text())
    data["nodes"]["ckpt"]["params"]["path"] = str(tiny.sd15)
    data["nodes"]["centre_file"]["params"]["path"] = str(WORKFLOWS / "images" / "centre_mask_512.png")
    data["nodes"]["kandinsky"]["params"].update(prior=str(tiny_k.prior), decoder=str(tiny_k.decoder_inpaint))
    for path, value in changes.items():
        node_id, kind, name = path.split(".")
        data["nodes"][node_id][kind][name] = value
    return data


def _issues(data, tmp_path):
    from nodegraph.api import Engine
    from nodegraph.errors import WorkflowInvalid

    path = tmp_path / "w.json"
    path.write_text(json.dumps(data))
    with pytest.raises(WorkflowInvalid) as err:
        Engine(cache_dir=False).compile(path)
    return {(i.node_id, i.field): i.message for i in err.value.issues}


def test_latents_across_families_are_validation_errors(tiny, tiny_k, tmp_path):
    """An SD latent into the Kandinsky sampler, a MoVQ latent into SD's img2img and into SD's VAE, Kandinsky
    conditioning into an SD sampler: each named at validation, with what to do."""
    found = _issues(_workflow(tiny, tiny_k, **{"inpaint.inputs.latent": "t2i.latent",
                                               "i2i.inputs.latent": "inpaint.latent",
                                               "decode.inputs.latent": "inpaint.latent",
                                               "t2i.inputs.positive": "waterfall.positive"}), tmp_path)
    for key in [("inpaint", "latent"), ("i2i", "latent"), ("decode", "latent"), ("t2i", "positive")]:
        assert "decode to pixels" in found[key], found
    assert "Kandinsky 2.2 MoVQ" in found[("i2i", "latent")] and "Stable Diffusion" in found[("i2i", "latent")]
    assert len(found) == 4  # the well-linked rest of the chain is fine


def test_the_chain_as_shipped_validates(tiny, tiny_k, tmp_path):
    from nodegraph.api import Engine

    path = tmp_path / "w.json"
    path.write_text(json.dumps(_workflow(tiny, tiny_k)))
    Engine(cache_dir=False).compile(path)  # no issue: pixels go between the families


def test_prior_without_image_encoder_and_missing_folders_are_reported_at_validation(tiny, tiny_k, tmp_path,
                                                                                    monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))
    found = _issues(_workflow(tiny, tiny_k, **{"kandinsky.params.prior": str(tiny_k.prior_without_image_encoder)}),
                    tmp_path)
    assert "no image_encoder/" in found[("kandinsky", "prior")]
    found = _issues(_workflow(tiny, tiny_k, **{"kandinsky.params.prior": str(tiny_k.decoder),
                                               "kandinsky.params.decoder": "someone/not-cached"}), tmp_path)
    assert "looks like a decoder folder" in found[("kandinsky", "prior")]
    assert "not in the local Hugging Face cache" in found[("kandinsky", "decoder")]


def test_sampler_with_the_inpainting_decoder_concatenates_without_blending(k_inpaint):
    """Sampler (no blending) on an InpaintModelConditioning latent: the UNet gets the masked image and keep mask
    too, so the result differs from LatentBlendSampler's only by the blending outside the mask."""
    model, vae = k_inpaint
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., 16:48, 16:48] = 1
    latent = inpaint_conditioning(vae, photo(64, seed=5), mask)
    cond = conditioning(*embeds(3))
    plain = denoise.sample(model, *cond, latent, seed=1, steps=2, guidance_scale=4.0, scheduler="ddim", strength=1.0)
    blended = denoise.blend_inpaint(model, *cond, latent, mask, seed=1, steps=2, guidance_scale=4.0,
                                    scheduler="ddim", strength=1.0)
    outside = latent.inpaint_mask == 0
    assert torch.equal(blended.expand_as(latent.samples)[outside.expand_as(latent.samples)],
                       latent.samples[outside.expand_as(latent.samples)])  # the photo's latents, exactly
    assert (plain - blended).abs().max() > 1e-3


def test_validating_a_kandinsky_workflow_does_not_import_torch(tiny_k):
    import subprocess
    import sys

    from tests.test_diffusion_workflows import WORKFLOWS

    code = ("import sys\nfrom nodegraph.api import Engine\n"
            f"issues = Engine(cache_dir=False).validate({str(WORKFLOWS / 'kandinsky_inpaint.json')!r}, overrides="
            f"{{'kandinsky.prior': {str(tiny_k.prior)!r}, 'kandinsky.decoder': {str(tiny_k.decoder_inpaint)!r}}})\n"
            "assert not issues, issues\nassert 'torch' not in sys.modules\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_the_latent_space_follows_links_through_latent_nodes(tiny, tiny_k, tmp_path):
    """A MoVQ latent scaled by LatentScaleBy is still a MoVQ latent: SD's VAEDecode after it is refused, and the
    message names where the space came from."""
    data = _workflow(tiny, tiny_k, **{"decode.inputs.latent": "scaled.latent"})
    data["nodes"]["scaled"] = {"type": "LatentScaleBy", "inputs": {"latent": "inpaint.latent"},
                               "params": {"scale_by": 2.0}}
    found = _issues(data, tmp_path)
    assert list(found) == [("decode", "latent")]
    assert "'scaled.latent' is in the Kandinsky 2.2 MoVQ latent space (from 'kandinsky' (LoadKandinsky))" in \
        found[("decode", "latent")]
