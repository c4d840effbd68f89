"""Diffusion nodes against diffusers on the same model and settings, on CPU.

    PYTHONPATH=. python benchmarks/diffusion.py [--repeat 9] [--steps 20] [--sd15-dir DIR] [--skip-tiny] [--skip-sd15]
                                                [--skip-sdxl] [--skip-controlnet] [--skip-kandinsky]

Every comparison runs in interleaved pairs: each repetition times ours and the reference back to back,
alternating which goes first, and keeps the ratio of that pair. A burst of load from another process then
hits both sides of a pair alike, and the figures are the median ratio with its min-max (and each side's
median seconds), so one lucky run cannot carry a claim. Our engine runs with its disk cache off: a fresh
engine with the disk cache on serves the sampler's result from an earlier run.

Part 1, the tiny random SD 1.x model (tests/tiny_models.py), 64x64, Euler:
  - one stage (CLIPEncode prompt + CLIPEncode "" as the negative + Sampler through a fresh engine) vs one
    StableDiffusionPipeline call with negative_prompt="" and output_type="latent": both encode the same two
    prompts every run (target <= 1.03x); also the Sampler loop alone vs the pipeline given embeddings;
  - the three-stage chain (workflows/txt2img_inpaint_img2img.json, fresh engine, to the decoded image) vs
    three diffusers pipelines chained as the diffusers inpainting guide does it, sharing components via
    from_pipe and handing latents on with output_type="latent" (target <= 1.0x);
  - a rerun with only the img2img strength changed (the engine reruns that stage and the decode from its
    cache) vs the first run (target <= 0.45x), and vs diffusers running only that stage: the img2img
    pipeline alone on the latents its earlier stages produced.
Part 2, an SD 1.5-sized fp16 single file loaded as float32 in fresh processes: benchmarks/loading.py.
Part 3, the tiny random SDXL model (tests/tiny_sdxl.py), 64x64, DPM++ 2M Karras:
  - one SDXL stage (CLIPEncode + Sampler through a fresh engine) vs one StableDiffusionXLPipeline call;
    with no negative both sides use zeros (force_zeros_for_empty_prompt); the loop alone given embeddings;
  - the base -> refiner hand-off (denoising_end / denoising_start 0.8) vs StableDiffusionXLPipeline +
    the refiner's StableDiffusionXLImg2ImgPipeline, latents handed on; the refiner encodes "" as its
    negative on both sides.
Part 4, ControlNet and Compel on the tiny SD 1.x models (a tiny random ControlNet made from the UNet), each
through a fresh engine, target <= 1.03x:
  - ControlNet text2img (LoadControlNet + ApplyControlNet + Sampler) vs StableDiffusionControlNetPipeline;
  - an inpainting checkpoint with an inpaint ControlNet (InpaintControlImage) vs
    StableDiffusionControlNetInpaintPipeline;
  - CLIPEncode syntax "compel" + Sampler vs Compel's recipe: its embeddings given to StableDiffusionPipeline.
Part 5, Kandinsky 2.2 on tiny components (tests/tiny_kandinsky.py), DDIM: the prior stage, text2img (prior +
  Sampler) and inpainting (prior + InpaintModelConditioning + LatentBlendSampler) through a fresh engine vs
  KandinskyV22PriorPipeline, + KandinskyV22Pipeline, + KandinskyV22InpaintPipeline (target <= 1.03x); the
  prior alone and the sampler loop alone (given embeddings) without the engine. The tiny prior runs in
  ~20 ms, so a fresh engine's fixed cost (registry, validation, keys: a few ms) shows in its row.
CPU only: benchmarks/gpu.py measures on a GPU.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]

import loading  # noqa: E402
from loading import PROMPT, machine, quiet, summary, verdict  # noqa: E402


def seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def pairs(ours, ref, repeat: int) -> dict:
    """Interleaved pairs: ours and the reference back to back, alternating which goes first (whichever runs
    second finds the caches warmer), summarised as medians and the per-pair ratio's min-max."""
    times = {ours: [], ref: []}
    for i in range(repeat):
        for fn in (ours, ref) if i % 2 == 0 else (ref, ours):
            times[fn].append(seconds(fn))
    return summary(times[ours], times[ref])


def interleaved(fns: dict, repeat: int) -> dict:
    """Median seconds of each callable, run in turns whose order alternates (benchmarks/outpaint.py uses it)."""
    times = {name: [] for name in fns}
    for i in range(repeat):
        for name in list(fns) if i % 2 == 0 else list(fns)[::-1]:
            times[name].append(seconds(fns[name]))
    return {name: statistics.median(t) for name, t in times.items()}


def row(title: str, s: dict, target: float | None = None, ref: str = "diffusers") -> str:
    return (f"  {title:51s} ours {s['ours']:.3f} s  {ref} {s['ref']:.3f} s  ratio {s['ratio']:.3f}x "
            f"({s['min']:.3f}-{s['max']:.3f}, {s['n']} pairs){verdict(s['ratio'], target)}")


# ---------------------------------------------------------------------------------------------- part 1

def tiny_part(repeat: int, steps: int) -> list[str]:
    import torch
    from diffusers.utils import load_image
    from diffusers import (EulerDiscreteScheduler, StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline,
                           StableDiffusionPipeline)

    from nodegraph.api import Engine
    from nodegraph.nodes import denoise
    from nodegraph.nodes.conditioning import encode_prompt
    from nodegraph.nodes.latent import empty_latent
    from nodegraph.nodes.models import inspect_checkpoint, load_checkpoint
    from tests.tiny_models import build_tiny_models

    tiny = build_tiny_models()
    # the handles the engine's LoadCheckpoint gets too (one load per process, dtype and device)
    model, clip, vae = load_checkpoint(inspect_checkpoint(str(tiny.sd15)))
    scheduler = EulerDiscreteScheduler.from_config(model.scheduler_config)
    t2i = StableDiffusionPipeline(vae=vae.vae, text_encoder=clip.text_encoder, tokenizer=clip.tokenizer,
                                  unet=model.unet, scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                  requires_safety_checker=False)
    inpaint = StableDiffusionInpaintPipeline.from_pipe(t2i)
    img2img = StableDiffusionImg2ImgPipeline.from_pipe(t2i)
    for pipe in (t2i, inpaint, img2img):
        pipe.set_progress_bar_config(disable=True)
    size, tmp = 64, tempfile.gettempdir()

    def fresh() -> Engine:
        return Engine(cache_dir=False)

    # --- one stage. The CLIP handle remembers the empty prompt's embedding for the process (the default
    # negative); an explicit "" negative on both sides makes each run encode the prompt and "" itself.
    stage = {"format": "nodegraph/1", "nodes": {
        "ckpt": {"type": "LoadCheckpoint", "params": {"path": str(tiny.sd15)}},
        "pos": {"type": "CLIPEncode", "inputs": {"clip": "ckpt.clip"}, "params": {"text": PROMPT}},
        "neg": {"type": "CLIPEncode", "inputs": {"clip": "ckpt.clip"}, "params": {"text": ""}},
        "empty": {"type": "EmptyLatent", "params": {"width": size, "height": size}},
        "t2i": {"type": "Sampler", "inputs": {"model": "ckpt.model", "positive": "pos.conditioning",
                                               "negative": "neg.conditioning", "latent": "empty.latent"},
                "params": {"seed": 7, "steps": steps, "scheduler": "euler"}},
    }}
    cond, uncond = encode_prompt(clip, PROMPT), encode_prompt(clip, "")
    pe, ne = t2i.encode_prompt(PROMPT, "cpu", 1, True, negative_prompt="")

    def ours_stage():
        fresh().run(stage, targets=["t2i"], out_dir=tmp)

    def diffusers_stage():
        t2i(PROMPT, negative_prompt="", num_inference_steps=steps, height=size, width=size,
            generator=torch.Generator().manual_seed(7), output_type="latent")

    def ours_loop():
        denoise.sample(model, cond, uncond, empty_latent(size, size), seed=7, steps=steps, guidance_scale=7.5,
                       scheduler="euler", strength=1.0)

    def diffusers_loop():
        t2i(prompt_embeds=pe, negative_prompt_embeds=ne, num_inference_steps=steps, height=size, width=size,
            generator=torch.Generator().manual_seed(7), output_type="latent")

    # --- the chain
    chain = REPO / "workflows" / "txt2img_inpaint_img2img.json"
    overrides = {"ckpt.path": str(tiny.sd15), "empty.width": size, "empty.height": size,
                 "t2i.steps": steps, "inpaint.steps": steps, "i2i.steps": steps,
                 "t2i.scheduler": "euler", "inpaint.scheduler": "euler", "i2i.scheduler": "euler"}
    nodes = json.loads(chain.read_text())["nodes"]
    mask_file = chain.parent / nodes["centre"]["params"]["path"]
    out_dir = Path(tempfile.mkdtemp(prefix="nodegraph-bench-"))
    castle, waterfall, negative = (nodes[k]["params"]["text"] for k in ("castle", "waterfall", "negative"))

    def diffusers_first_two():
        mask = load_image(str(mask_file))  # as the guide loads its mask
        latents = t2i(castle, num_inference_steps=steps, height=size, width=size,
                      generator=torch.Generator().manual_seed(7), output_type="latent").images
        return inpaint(waterfall, image=latents, mask_image=mask, masked_image_latents=latents, height=size,
                       width=size, num_inference_steps=steps, generator=torch.Generator().manual_seed(92),
                       output_type="latent").images

    def diffusers_last(latents, strength=0.35):
        img2img(castle, negative_prompt=negative, image=latents, strength=strength, num_inference_steps=steps,
                generator=torch.Generator().manual_seed(11), output_type="pil")

    def diffusers_chain():  # the diffusers inpainting guide: text2img -> inpaint -> img2img, latents handed on
        diffusers_last(diffusers_first_two())

    def ours_chain(engine=None):  # up to the decoded image, like the pipelines (no PNG writing)
        # Forget the remembered empty prompt so that each run encodes it (once, shared by the two stages
        # without a negative), where each pipeline call encodes its own.
        clip.memo.clear()
        return (engine or fresh()).run(chain, overrides=overrides, targets=["decode"], out_dir=out_dir)

    for fn in (ours_stage, diffusers_stage, ours_loop, diffusers_loop, ours_chain, diffusers_chain):
        fn()  # warm-up
    stage_s = pairs(ours_stage, diffusers_stage, repeat)
    loop_s = pairs(ours_loop, diffusers_loop, repeat)
    chain_s = pairs(ours_chain, diffusers_chain, repeat)

    # --- rerun with only the img2img strength changed: vs our first run, and vs diffusers running that
    # stage alone on the latents its first two stages made (which cost it nothing here)
    inpainted = diffusers_first_two()
    firsts, reruns, alone = [], [], []
    for i in range(repeat):
        engine = fresh()
        firsts.append(seconds(lambda: ours_chain(engine)))
        strength, results = 0.5 + i * 0.01, []
        rerun = lambda: results.append(engine.run(chain, overrides={**overrides, "i2i.strength": strength},  # noqa: E731
                                                  targets=["decode"], out_dir=out_dir))
        last = lambda: diffusers_last(inpainted, strength)  # noqa: E731
        pair = {}
        for name, fn in (("rerun", rerun), ("last", last)) if i % 2 == 0 else (("last", last), ("rerun", rerun)):
            pair[name] = seconds(fn)
        assert results[0].ran() == {"i2i", "decode"}, results[0].status
        reruns.append(pair["rerun"])
        alone.append(pair["last"])
    vs_first, vs_alone = summary(reruns, firsts), summary(reruns, alone)

    return [
        f"tiny SD 1.x, CPU, {size}x{size}, {steps} Euler steps per stage; median of {repeat} interleaved pairs "
        "(min-max of the per-pair ratio)",
        row("one stage (CLIPEncode x2 + Sampler, fresh engine)", stage_s, 1.03),
        row("sampler loop alone (given embeddings)", loop_s),
        row("three-stage chain vs 3 chained pipelines", chain_s, 1.0),
        row("rerun, only img2img strength changed, vs first run", vs_first, 0.45, ref="first run"),
        row("the same rerun vs diffusers' img2img stage alone", vs_alone, ref="diffusers"),
    ]


# ---------------------------------------------------------------------------------------------- part 3

def sdxl_part(repeat: int, steps: int) -> list[str]:
    import torch
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    from nodegraph.api import Engine
    from nodegraph.nodes import denoise
    from nodegraph.nodes.conditioning import encode_prompt
    from nodegraph.nodes.latent import empty_latent
    from nodegraph.nodes.models import inspect_checkpoint, load_checkpoint
    from tests.tiny_sdxl import build_tiny_sdxl_set

    tiny = build_tiny_sdxl_set()
    (model, clip, vae), (r_model, r_clip, r_vae) = (load_checkpoint(inspect_checkpoint(str(p)))
                                                    for p in (tiny.base, tiny.refiner))

    def karras(config):
        return DPMSolverMultistepScheduler.from_config(config, use_karras_sigmas=True, algorithm_type="dpmsolver++")

    base = StableDiffusionXLPipeline(vae=vae.vae, text_encoder=clip.text_encoder, text_encoder_2=clip.text_encoder_2,
                                     tokenizer=clip.tokenizer, tokenizer_2=clip.tokenizer_2, unet=model.unet,
                                     scheduler=karras(model.scheduler_config))
    refiner = StableDiffusionXLImg2ImgPipeline(vae=r_vae.vae, text_encoder=None, text_encoder_2=r_clip.text_encoder_2,
                                               tokenizer=None, tokenizer_2=r_clip.tokenizer_2, unet=r_model.unet,
                                               scheduler=karras(r_model.scheduler_config),
                                               requires_aesthetics_score=True, force_zeros_for_empty_prompt=False)
    for pipe in (base, refiner):
        pipe.set_progress_bar_config(disable=True)
    size, sched, tmp = 64, "dpmpp_2m_karras", tempfile.gettempdir()
    common = {"seed": 7, "steps": steps, "scheduler": sched, "guidance_scale": 5.0}
    # the base's negative is zeros on both sides (force_zeros_for_empty_prompt): nothing to encode
    stage = {"format": "nodegraph/1", "nodes": {
        "ckpt": {"type": "LoadCheckpoint", "params": {"path": str(tiny.base)}},
        "pos": {"type": "CLIPEncode", "inputs": {"clip": "ckpt.clip"}, "params": {"text": PROMPT}},
        "empty": {"type": "EmptyLatent", "params": {"width": size, "height": size}},
        "t2i": {"type": "Sampler", "inputs": {"model": "ckpt.model", "positive": "pos.conditioning",
                                               "latent": "empty.latent"}, "params": dict(common)},
    }}
    # the refiner encodes "" as its negative (its config does not force zeros): explicitly on both sides, so
    # that neither uses the embedding the CLIP handle remembers
    handoff = {"format": "nodegraph/1", "nodes": {
        **stage["nodes"],
        "t2i": {**stage["nodes"]["t2i"], "params": {**common, "denoising_end": 0.8}},
        "ref": {"type": "LoadCheckpoint", "params": {"path": str(tiny.refiner)}},
        "ref_pos": {"type": "CLIPEncode", "inputs": {"clip": "ref.clip"}, "params": {"text": PROMPT}},
        "ref_neg": {"type": "CLIPEncode", "inputs": {"clip": "ref.clip"}, "params": {"text": ""}},
        "refine": {"type": "Sampler", "inputs": {"model": "ref.model", "positive": "ref_pos.conditioning",
                                                  "negative": "ref_neg.conditioning", "latent": "t2i.latent"},
                   "params": {**common, "seed": 8, "denoising_start": 0.8}},
    }}
    cond = encode_prompt(clip, PROMPT)
    pe, ne, pp, npp = base.encode_prompt(PROMPT, device="cpu", do_classifier_free_guidance=True)

    def ours_stage():
        Engine(cache_dir=False).run(stage, targets=["t2i"], out_dir=tmp)

    def diffusers_stage():
        base(PROMPT, num_inference_steps=steps, height=size, width=size, guidance_scale=5.0,
             generator=torch.Generator().manual_seed(7), output_type="latent")

    def ours_loop():
        denoise.sample(model, cond, None, empty_latent(size, size), seed=7, steps=steps, guidance_scale=5.0,
                       scheduler=sched, strength=1.0)

    def diffusers_loop():
        base(prompt_embeds=pe, negative_prompt_embeds=ne, pooled_prompt_embeds=pp, negative_pooled_prompt_embeds=npp,
             num_inference_steps=steps, height=size, width=size, guidance_scale=5.0,
             generator=torch.Generator().manual_seed(7), output_type="latent")

    def ours_handoff():
        Engine(cache_dir=False).run(handoff, targets=["refine"], out_dir=tmp)

    def diffusers_handoff():
        latents = base(PROMPT, num_inference_steps=steps, height=size, width=size, guidance_scale=5.0,
                       denoising_end=0.8, generator=torch.Generator().manual_seed(7), output_type="latent").images
        refiner(PROMPT, negative_prompt="", image=latents, num_inference_steps=steps, guidance_scale=5.0,
                denoising_start=0.8, generator=torch.Generator().manual_seed(8), output_type="latent")

    for fn in (ours_stage, diffusers_stage, ours_loop, diffusers_loop, ours_handoff, diffusers_handoff):
        fn()  # warm-up
    return [
        f"tiny SDXL, CPU, {size}x{size}, {steps} DPM++ 2M Karras steps; median of {repeat} interleaved pairs "
        "(min-max of the per-pair ratio)",
        row("one stage (CLIPEncode + Sampler, fresh engine)", pairs(ours_stage, diffusers_stage, repeat)),
        row("sampler loop alone (given embeddings)", pairs(ours_loop, diffusers_loop, repeat)),
        row("base -> refiner hand-off (end/start 0.8)", pairs(ours_handoff, diffusers_handoff, repeat)),
    ]


# ---------------------------------------------------------------------------------------------- part 4

def controlnet_part(repeat: int, steps: int) -> list[str]:
    """ControlNet and Compel stages on the tiny SD 1.x models, each through a fresh engine against the
    diffusers pipeline doing the same job on the same modules."""
    import PIL.Image
    import torch
    from compel import Compel
    from diffusers import (EulerDiscreteScheduler, StableDiffusionControlNetInpaintPipeline,
                           StableDiffusionControlNetPipeline, StableDiffusionPipeline)

    from nodegraph.api import Engine
    from nodegraph.nodes.controlnet import inpaint_control_image, load_controlnet
    from nodegraph.nodes.io import load_image_file
    from nodegraph.nodes.models import inspect_checkpoint, load_checkpoint
    from tests.tiny_controlnet import random_controlnet
    from tests.tiny_models import build_tiny_models

    tiny = build_tiny_models()
    model, clip, vae = load_checkpoint(inspect_checkpoint(str(tiny.sd15)))
    i_model, i_clip, i_vae = load_checkpoint(inspect_checkpoint(str(tiny.sd15_inpaint)))
    folder = Path(tempfile.mkdtemp(prefix="nodegraph-bench-cn-"))
    random_controlnet(model.unet, 1).save_pretrained(folder / "cn")
    controlnet = load_controlnet(folder / "cn").module  # the module LoadControlNet gets too (one load per process)
    size, tmp = 64, tempfile.gettempdir()
    photo = folder / "photo.png"  # the shipped photo at the benchmark's size, read by both sides
    PIL.Image.open(REPO / "workflows" / "images" / "coffee_256.jpg").convert("RGB").resize((size, size)).save(photo)
    image, _ = load_image_file(photo)
    mask = torch.zeros(1, 1, size, size)
    mask[..., size // 4: 3 * size // 4, size // 4: 3 * size // 4] = 1.0

    def pipe(cls, m, c, v, **extra):
        made = cls(vae=v.vae, text_encoder=c.text_encoder, tokenizer=c.tokenizer, unet=m.unet,
                   scheduler=EulerDiscreteScheduler.from_config(m.scheduler_config), safety_checker=None,
                   feature_extractor=None, requires_safety_checker=False, **extra)
        made.set_progress_bar_config(disable=True)
        return made

    t2i_cn = pipe(StableDiffusionControlNetPipeline, model, clip, vae, controlnet=controlnet)
    inpaint_cn = pipe(StableDiffusionControlNetInpaintPipeline, i_model, i_clip, i_vae, controlnet=controlnet)
    t2i = pipe(StableDiffusionPipeline, model, clip, vae)
    compel = Compel(tokenizer=clip.tokenizer, text_encoder=clip.text_encoder)
    weighted = "a (stone castle)1.3 on a hill++, the sea--"
    common = {"seed": 7, "steps": steps, "scheduler": "euler"}

    def graph(ckpt, extra: dict, sampler_inputs: dict, sampler_params: dict, text=PROMPT, syntax="plain") -> dict:
        nodes = {
            "ckpt": {"type": "LoadCheckpoint", "params": {"path": str(ckpt)}},
            "pos": {"type": "CLIPEncode", "inputs": {"clip": "ckpt.clip"}, "params": {"text": text, "syntax": syntax}},
            "neg": {"type": "CLIPEncode", "inputs": {"clip": "ckpt.clip"}, "params": {"text": "", "syntax": syntax}},
            **extra,
            "s": {"type": "Sampler", "inputs": {"model": "ckpt.model", "positive": "pos.conditioning",
                                                 "negative": "neg.conditioning", **sampler_inputs},
                  "params": {**common, **sampler_params}}}
        return {"format": "nodegraph/1", "nodes": nodes}

    controlled = {"cn": {"type": "LoadControlNet", "params": {"path": str(folder / "cn")}},
                  "photo": {"type": "LoadImage", "params": {"path": str(photo)}}}
    text2img_cn = graph(tiny.sd15, {
        **controlled,
        "apply": {"type": "ApplyControlNet", "inputs": {"model": "ckpt.model", "control_net": "cn.control_net",
                                                        "image": "photo.image"}},
        "empty": {"type": "EmptyLatent", "params": {"width": size, "height": size}}},
        {"model": "apply.model", "latent": "empty.latent"}, {})
    inpaint = graph(tiny.sd15_inpaint, {
        **controlled,
        "mask": {"type": "MaskShape", "params": {"width": size, "height": size, "x": size // 4, "y": size // 4,
                                                 "w": size // 2, "h": size // 2}},
        "control": {"type": "InpaintControlImage", "inputs": {"image": "photo.image", "mask": "mask.mask"}},
        "apply": {"type": "ApplyControlNet", "inputs": {"model": "ckpt.model", "control_net": "cn.control_net",
                                                        "image": "control.image"}},
        "cond": {"type": "InpaintModelConditioning", "inputs": {"vae": "ckpt.vae", "image": "photo.image",
                                                                "mask": "mask.mask"}, "params": {"mode": "sampler"}}},
        {"model": "apply.model", "latent": "cond.latent"}, {"strength": 1.0})
    compel_stage = graph(tiny.sd15, {"empty": {"type": "EmptyLatent", "params": {"width": size, "height": size}}},
                         {"latent": "empty.latent"}, {}, text=weighted, syntax="compel")
    control_image = inpaint_control_image(image, mask)

    def ours(workflow):
        return lambda: Engine(cache_dir=False).run(workflow, targets=["s"], out_dir=tmp)

    def diffusers_text2img_cn():
        t2i_cn(PROMPT, negative_prompt="", image=image, num_inference_steps=steps, height=size, width=size,
               generator=torch.Generator().manual_seed(7), output_type="latent")

    def diffusers_inpaint_cn():
        inpaint_cn(PROMPT, negative_prompt="", image=image, mask_image=mask, control_image=control_image,
                   strength=1.0, num_inference_steps=steps, height=size, width=size,
                   generator=torch.Generator().manual_seed(7), output_type="latent")

    def diffusers_compel():  # Compel's own recipe: weighted embeddings handed to the pipeline
        pe, ne = compel.pad_conditioning_tensors_to_same_length([compel(weighted), compel("")])
        t2i(prompt_embeds=pe, negative_prompt_embeds=ne, num_inference_steps=steps, height=size, width=size,
            generator=torch.Generator().manual_seed(7), output_type="latent")

    cases = [("ControlNet text2img (StableDiffusionControlNetPipeline)", ours(text2img_cn), diffusers_text2img_cn),
             ("ControlNet inpaint (...ControlNetInpaintPipeline)", ours(inpaint), diffusers_inpaint_cn),
             ("Compel-weighted prompt + Sampler (compel + pipeline)", ours(compel_stage), diffusers_compel)]
    for _, a, b in cases:
        a(), b()  # warm-up
    return [f"tiny SD 1.x + tiny ControlNet, CPU, {size}x{size}, {steps} Euler steps, each through a fresh engine; "
            f"median of {repeat} interleaved pairs (min-max of the per-pair ratio)",
            *(row(title, pairs(a, b, repeat), 1.03) for title, a, b in cases)]


# ---------------------------------------------------------------------------------------------- part 5

def kandinsky_part(repeat: int, steps: int) -> list[str]:
    """Kandinsky 2.2 on the tiny components of tests/tiny_kandinsky.py (diffusers' test configs): each stage
    through a fresh engine vs the diffusers pipelines doing the same job on the same modules, DDIM."""
    import numpy as np
    import torch
    from PIL import Image
    from diffusers import KandinskyV22InpaintPipeline, KandinskyV22Pipeline
    from diffusers.utils import load_image

    from nodegraph.api import Engine
    from nodegraph.nodes import denoise
    from nodegraph.nodes.conditioning import PromptEmbeds
    from nodegraph.nodes.kandinsky import load_decoder, load_prior, prior_embeddings
    from nodegraph.nodes.latent import empty_latent
    from tests.tiny_kandinsky import build_tiny_kandinsky

    tiny = build_tiny_kandinsky()
    # the handles the engine's LoadKandinsky gets too (one load per process, dtype and device)
    prior = load_prior(tiny.prior, str(tiny.prior))
    (model, vae), (i_model, i_vae) = (load_decoder(p, str(p)) for p in (tiny.decoder, tiny.decoder_inpaint))
    prior_pipe = prior.pipeline()
    t2i = KandinskyV22Pipeline(unet=model.unet, scheduler=_ddim(model.scheduler_config), movq=vae.vae)
    inpaint = KandinskyV22InpaintPipeline(unet=i_model.unet, scheduler=_ddim(i_model.scheduler_config), movq=i_vae.vae)
    for pipe in (t2i, inpaint):
        pipe.set_progress_bar_config(disable=True)
    tmp = tempfile.mkdtemp(prefix="kandinsky-bench-")
    size, picture, mask_file = 128, Path(tmp) / "photo.png", Path(tmp) / "mask.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(picture)
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[:32, :32] = 255
    Image.fromarray(mask).save(mask_file)
    prior_params = {"prompt": PROMPT, "seed": 3, "steps": steps, "guidance_scale": 4.0}
    nodes = {
        "k": {"type": "LoadKandinsky", "params": {"prior": str(tiny.prior), "decoder": str(tiny.decoder)}},
        "prior": {"type": "KandinskyPrior", "inputs": {"prior": "k.prior"}, "params": prior_params},
        "empty": {"type": "EmptyLatent", "params": {"width": size, "height": size}},
        "t2i": {"type": "Sampler", "inputs": {"model": "k.model", "positive": "prior.positive",
                                               "negative": "prior.negative", "latent": "empty.latent"},
                "params": {"seed": 7, "steps": steps, "scheduler": "ddim", "guidance_scale": 4.0}},
    }
    inpaint_nodes = {
        "k": {"type": "LoadKandinsky", "params": {"prior": str(tiny.prior), "decoder": str(tiny.decoder_inpaint)}},
        "prior": nodes["prior"],
        "photo": {"type": "LoadImage", "params": {"path": str(picture)}},
        "mask": {"type": "LoadMask", "params": {"path": str(mask_file)}},
        "cond": {"type": "InpaintModelConditioning", "inputs": {"vae": "k.vae", "image": "photo.image",
                                                                 "mask": "mask.mask"}},
        "inpaint": {"type": "LatentBlendSampler", "inputs": {"model": "k.model", "positive": "prior.positive",
                                                              "negative": "prior.negative", "latent": "cond.latent",
                                                              "mask": "mask.mask"},
                    "params": {"seed": 7, "steps": steps, "scheduler": "ddim", "guidance_scale": 4.0}},
    }

    def run(graph, target):
        return lambda: Engine(cache_dir=False).run({"format": "nodegraph/1", "nodes": graph}, targets=[target],
                                                   out_dir=tmp)

    def diffusers_prior():
        return prior.pipeline()(PROMPT, num_inference_steps=steps, guidance_scale=4.0,
                                generator=torch.Generator().manual_seed(3), output_type="pt")

    emb = diffusers_prior()
    neg = PromptEmbeds(emb.negative_image_embeds, family="kandinsky22")
    pos = PromptEmbeds(emb.image_embeds, family="kandinsky22", uncond=neg)

    def diffusers_t2i(embeds=None):
        embeds = embeds or diffusers_prior()
        t2i(image_embeds=embeds.image_embeds, negative_image_embeds=embeds.negative_image_embeds,
            height=size // 4, width=size // 4,  # the tiny MoVQ's factor is 2: this gives EmptyLatent(128)'s 16x16
            num_inference_steps=steps, guidance_scale=4.0, generator=torch.Generator().manual_seed(7),
            output_type="latent")

    def ours_loop():
        denoise.sample(model, pos, neg, empty_latent(size, size), seed=7, steps=steps, guidance_scale=4.0,
                       scheduler="ddim", strength=1.0)

    def diffusers_inpaint():
        embeds = diffusers_prior()
        image = load_image(str(picture))
        repaint = np.asarray(Image.open(mask_file), dtype=np.float32) / 255.0  # white = repaint, as ours
        inpaint(image=image, mask_image=repaint, image_embeds=embeds.image_embeds,
                negative_image_embeds=embeds.negative_image_embeds, height=64, width=64, num_inference_steps=steps,
                guidance_scale=4.0, generator=torch.Generator().manual_seed(7), output_type="latent")

    def ours_prior():
        prior_embeddings(prior, PROMPT, None, None, 1.0, 3, steps, 4.0)

    comparisons = [
        ("prior stage (KandinskyPrior, fresh engine)", run(nodes, "prior"), diffusers_prior),
        ("prior alone (the node's function, no engine)", ours_prior, diffusers_prior),
        ("text2img (prior + Sampler, fresh engine)", run(nodes, "t2i"), diffusers_t2i),
        ("text2img sampler loop alone (given embeddings)", ours_loop, lambda: diffusers_t2i(emb)),
        ("inpaint (prior + conditioning + LatentBlendSampler)", run(inpaint_nodes, "inpaint"), diffusers_inpaint),
    ]
    for _, ours, ref in comparisons:
        ours(), ref()  # warm-up
    return [f"tiny Kandinsky 2.2, CPU, 128x128 text2img / 64x64 inpaint, {steps} DDIM steps (prior {steps} "
            f"UnCLIP steps); median of {repeat} interleaved pairs (min-max of the per-pair ratio)",
            *(row(title, pairs(ours, ref, repeat), 1.03) for title, ours, ref in comparisons)]


def _ddim(config):
    from diffusers import DDIMScheduler

    return DDIMScheduler.from_config(config)


# ---------------------------------------------------------------------------------------------- main

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=9, help="interleaved pairs per tiny-model comparison")
    parser.add_argument("--steps", type=int, default=20, help="steps per stage for the tiny models")
    parser.add_argument("--sd15-dir", default=os.path.join(tempfile.gettempdir(), "nodegraph-sd15-fp16"),
                        help="where the 2 GB SD 1.5-sized fp16 file is built once and reused")
    parser.add_argument("--sd15-repeat", type=int, default=3, help="interleaved pairs of fresh processes")
    parser.add_argument("--sd15-steps", type=int, default=4)
    parser.add_argument("--skip-tiny", action="store_true")
    parser.add_argument("--skip-sd15", action="store_true")
    parser.add_argument("--skip-sdxl", action="store_true")
    parser.add_argument("--skip-controlnet", action="store_true")
    parser.add_argument("--skip-kandinsky", action="store_true")
    args = parser.parse_args()
    quiet()
    started, load = time.perf_counter(), os.getloadavg()[0]
    if not args.skip_tiny:
        print("\n".join(tiny_part(args.repeat, args.steps)), flush=True)
    if not args.skip_sdxl:
        print("\n".join(sdxl_part(args.repeat, args.steps)), flush=True)
    if not args.skip_controlnet:
        print("\n".join(controlnet_part(args.repeat, args.steps)), flush=True)
    if not args.skip_kandinsky:
        print("\n".join(kandinsky_part(args.repeat, args.steps)), flush=True)
    if not args.skip_sd15:
        print(loading.report(loading.measure(Path(args.sd15_dir), args.sd15_repeat, args.sd15_steps)), flush=True)
    print(f"No GPU was available: CPU figures. Took {time.perf_counter() - started:.0f} s; {machine(load)}.")


if __name__ == "__main__":
    main()
