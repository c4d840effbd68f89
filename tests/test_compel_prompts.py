"""CLIPEncode syntax "compel" against a diffusers pipeline fed Compel's own conditioning (``prompt_embeds``,
``pooled_prompt_embeds``), the way Compel's documentation uses it: same tiny checkpoint (fresh modules loaded by
the pipeline from the same folder), same seed; final latents within 1e-4."""
from __future__ import annotations

import pytest
import torch

from nodegraph.api import Engine
from nodegraph.nodes import denoise
from nodegraph.nodes.conditioning import encode_prompt
from nodegraph.nodes.latent import empty_latent
from tests.test_diffusion_parity import assert_close, diffusers_scheduler

POSITIVE = "a (stone castle)1.3 on a hill++, (fog)0.6"
NEGATIVE = "blurry, (low quality)1.4"


def sample(model, clip, positive, negative, long_prompt="truncate"):
    pos = encode_prompt(clip, positive, syntax="compel", long_prompt=long_prompt)
    neg = encode_prompt(clip, negative, syntax="compel", long_prompt=long_prompt)
    return denoise.sample(model, pos, neg, empty_latent(64, 64), seed=3, steps=3, guidance_scale=5.0,
                          scheduler="euler", strength=1.0)


def reference(folder, model, positive, negative, sdxl=False, truncate=True):
    import diffusers
    from compel import Compel, ReturnedEmbeddingsType

    cls = diffusers.StableDiffusionXLPipeline if sdxl else diffusers.StableDiffusionPipeline
    extra = {} if sdxl else {"safety_checker": None, "requires_safety_checker": False}
    pipe = cls.from_pretrained(str(folder), **extra)
    pipe.scheduler = diffusers_scheduler("euler", model.scheduler_config)
    pipe.set_progress_bar_config(disable=True)
    call = dict(num_inference_steps=3, guidance_scale=5.0, height=64, width=64, output_type="latent",
                generator=torch.Generator("cpu").manual_seed(3))
    if sdxl:
        compel = Compel(tokenizer=[pipe.tokenizer, pipe.tokenizer_2], text_encoder=[pipe.text_encoder, pipe.text_encoder_2],
                        returned_embeddings_type=ReturnedEmbeddingsType.PENULTIMATE_HIDDEN_STATES_NON_NORMALIZED,
                        requires_pooled=[False, True], truncate_long_prompts=truncate)
        (pe, ne), (pp, npool) = zip(compel(positive), compel(negative))
        return pipe(prompt_embeds=pe, pooled_prompt_embeds=pp, negative_prompt_embeds=ne,
                    negative_pooled_prompt_embeds=npool, **call).images
    compel = Compel(tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder, truncate_long_prompts=truncate)
    pe, ne = compel.pad_conditioning_tensors_to_same_length([compel(positive), compel(negative)])
    return pipe(prompt_embeds=pe, negative_prompt_embeds=ne, **call).images


@pytest.mark.parametrize("positive", [POSITIVE, '("castle", "meadow").blend(0.7, 0.3)', '("castle", "fog").and()'])
def test_sd1_compel_matches_the_pipeline_given_compels_embeddings(tiny, sd, positive):
    model, clip, _ = sd
    assert_close(sample(model, clip, positive, NEGATIVE), reference(tiny.sd15, model, positive, NEGATIVE))


def test_sd1_long_compel_prompts_in_windows_match(tiny, sd):
    model, clip, _ = sd
    long = ", ".join(["(tower)1.2 with banners"] * 20)
    ours = encode_prompt(clip, long, syntax="compel", long_prompt="chunk").embeds
    assert ours.shape[1] > 77  # several windows: the negative is padded with empty windows on both sides
    assert_close(sample(model, clip, long, NEGATIVE, "chunk"), reference(tiny.sd15, model, long, NEGATIVE,
                                                                         truncate=False))


def test_sdxl_compel_matches_the_pipeline_given_compels_embeddings(tiny_xl, xl):
    model, clip, _ = xl
    assert_close(sample(model, clip, POSITIVE, NEGATIVE), reference(tiny_xl.base, model, POSITIVE, NEGATIVE, sdxl=True))


def test_weights_change_the_embedding_and_an_unweighted_prompt_is_plain(sd):
    _, clip, _ = sd
    plain = encode_prompt(clip, "a stone castle").embeds
    assert torch.equal(encode_prompt(clip, "a stone castle", syntax="compel").embeds, plain)
    assert not torch.equal(encode_prompt(clip, "a (stone)1.5 castle", syntax="compel").embeds, plain)


def test_an_unbalanced_bracket_is_a_validation_error(tiny):
    workflow = {"format": "nodegraph/1", "nodes": {
        "ckpt": {"type": "LoadCheckpoint", "params": {"path": str(tiny.sd15)}},
        "pos": {"type": "CLIPEncode", "inputs": {"clip": "ckpt.clip"},
                "params": {"text": "a (stone castle 1.3", "syntax": "compel"}},
        "ok": {"type": "CLIPEncode", "inputs": {"clip": "ckpt.clip"},
               "params": {"text": "a \\(literal\\) bracket)", "syntax": "compel"}},
        "comfy": {"type": "CLIPEncode", "inputs": {"clip": "ckpt.clip"},
                  "params": {"text": "a (lenient", "syntax": "comfy"}}}}
    issues = Engine(cache_dir=False).validate(workflow, targets=["pos", "ok", "comfy"])
    found = {(i.node_id, i.field): i.message for i in issues}
    assert "1 '(' not closed" in found[("pos", "text")]
    assert "closes no bracket" in found[("ok", "text")]
    assert ("comfy", "text") not in found  # ComfyUI reads unbalanced brackets leniently


def test_the_weighted_workflow_runs_and_its_weights_matter(tiny, tmp_path):
    from tests.conftest import REPO

    overrides = {"ckpt.path": str(tiny.sd15), "empty.width": 64, "empty.height": 64, "sample.steps": 2}
    engine = Engine(cache_dir=False)
    first = engine.run(REPO / "workflows" / "txt2img_weighted.json", overrides=overrides, targets=["sample"],
                       out_dir=tmp_path)
    plain = engine.run(REPO / "workflows" / "txt2img_weighted.json", overrides={**overrides, "prompt.syntax": "plain"},
                       targets=["sample"], out_dir=tmp_path)
    assert not torch.equal(first.outputs["sample"]["latent"].samples, plain.outputs["sample"]["latent"].samples)
