"""Diffusion nodes against diffusers on the same model and settings, on CPU.

    PYTHONPATH=. python benchmarks/diffusion.py [--repeat 5] [--steps 20] [--skip-sd15] [--skip-sdxl] [--sd15-dir DIR]

Part 1, the tiny random SD 1.x model (tests/tiny_models.py), 64x64:
  - one Sampler stage (CLIPEncode + Sampler through the engine, fresh caches) vs one
    StableDiffusionPipeline call with output_type="latent" (target <= 1.03x); also the Sampler
    node's loop alone vs the pipeline given prompt embeddings;
  - the three-stage chain (workflows/txt2img_inpaint_img2img.json, first run) vs three diffusers
    pipelines chained as the diffusers inpainting guide does it, sharing components via from_pipe and handing
    latents on with output_type="latent" (target <= 1.0x);
  - a rerun with only the img2img strength changed vs the first run (target <= 0.45x).
Part 2, a randomly initialised checkpoint of the real SD 1.5 architecture (UNet 320/640/1280/1280,
768-wide CLIP text encoder, configs written out in tests/tiny_models.py), as one fp32 single-file
.safetensors, 64x64, 4 Euler steps: load time, s/step and peak RSS, each measured in a fresh process,
for our nodes and for diffusers' from_single_file + pipeline, beside ComfyUI's published figures.

Part 3, the tiny random SDXL model (tests/tiny_sdxl.py: two text encoders, text_time UNet), 64x64,
DPM++ 2M Karras (the outpaint workflow's scheduler):
  - one SDXL stage (CLIPEncode + Sampler through the engine, fresh caches) vs one
    StableDiffusionXLPipeline call with output_type="latent"; the loop alone given embeddings;
  - the base -> refiner hand-off (Sampler denoising_end 0.8, refiner Sampler denoising_start 0.8,
    through the engine) vs StableDiffusionXLPipeline(denoising_end) + the refiner's
    StableDiffusionXLImg2ImgPipeline(denoising_start), latents handed on.

Times are the best of --repeat runs (the machine is shared), ours and diffusers' interleaved. CPU only (no GPU here).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

COMFY = {"load_s": 3.0, "s_per_step": 1.04, "peak_rss_gib": 6.1}
PROMPT = "concept art digital painting of an elven castle, inspired by lord of the rings, highly detailed, 8k"


def quiet() -> None:
    import warnings

    warnings.filterwarnings("ignore")
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    dlog.set_verbosity_error()
    dlog.disable_progress_bar()
    tlog.set_verbosity_error()


def median_time(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved(fns: dict, repeat: int) -> dict:
    """Best-of-``repeat`` seconds of each callable, taking turns so that load from other processes on a
    shared machine hits all alike (the minimum is the least disturbed run, as timeit reports)."""
    times = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: min(t) for name, t in times.items()}


# ---------------------------------------------------------------------------------------------- part 1

def tiny_part(repeat: int, steps: int) -> dict:
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
    model, clip, vae = load_checkpoint(inspect_checkpoint(str(tiny.sd15)))
    scheduler = EulerDiscreteScheduler.from_config(model.scheduler_config)
    t2i = StableDiffusionPipeline(vae=vae.vae, text_encoder=clip.text_encoder, tokenizer=clip.tokenizer,
                                  unet=model.unet, scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                  requires_safety_checker=False)
    inpaint = StableDiffusionInpaintPipeline.from_pipe(t2i)
    img2img = StableDiffusionImg2ImgPipeline.from_pipe(t2i)
    for pipe in (t2i, inpaint, img2img):
        pipe.set_progress_bar_config(disable=True)
    size = 64

    # --- one stage
    stage = {"format": "nodegraph/1", "nodes": {
        "ckpt": {"type": "LoadCheckpoint", "params": {"path": str(tiny.sd15)}},
        "pos": {"type": "CLIPEncode", "inputs": {"clip": "ckpt.clip"}, "params": {"text": PROMPT}},
        "empty": {"type": "EmptyLatent", "params": {"width": size, "height": size}},
        "t2i": {"type": "Sampler", "inputs": {"model": "ckpt.model", "positive": "pos.conditioning",
                                               "latent": "empty.latent"},
                "params": {"seed": 7, "steps": steps, "scheduler": "euler"}},
    }}
    cond = encode_prompt(clip, PROMPT)
    pe, ne = t2i.encode_prompt(PROMPT, "cpu", 1, True)

    def ours_stage():
        Engine().run(stage, targets=["t2i"], out_dir=tempfile.gettempdir())

    def diffusers_stage():
        t2i(PROMPT, num_inference_steps=steps, height=size, width=size, generator=torch.Generator().manual_seed(7),
            output_type="latent")

    def ours_loop():
        denoise.sample(model, cond, None, empty_latent(size, size), seed=7, steps=steps, guidance_scale=7.5,
                       scheduler="euler", strength=1.0)

    def diffusers_loop():
        t2i(prompt_embeds=pe, negative_prompt_embeds=ne, num_inference_steps=steps, height=size, width=size,
            generator=torch.Generator().manual_seed(7), output_type="latent")

    for fn in (ours_stage, diffusers_stage, ours_loop, diffusers_loop):
        fn()  # warm-up
    stage_times = interleaved({"ours": ours_stage, "diffusers": diffusers_stage}, repeat)
    loop_times = interleaved({"ours": ours_loop, "diffusers": diffusers_loop}, repeat)

    # --- the chain
    chain = REPO / "workflows" / "txt2img_inpaint_img2img.json"
    overrides = {"ckpt.path": str(tiny.sd15), "empty.width": size, "empty.height": size,
                 "t2i.steps": steps, "inpaint.steps": steps, "i2i.steps": steps,
                 "t2i.scheduler": "euler", "inpaint.scheduler": "euler", "i2i.scheduler": "euler"}
    nodes = json.loads(chain.read_text())["nodes"]
    mask_file = chain.parent / nodes["centre"]["params"]["path"]
    out_dir = Path(tempfile.mkdtemp(prefix="nodegraph-bench-"))
    prompts = [nodes[k]["params"]["text"] for k in ("castle", "waterfall", "negative")]

    def diffusers_chain():  # the diffusers inpainting guide: text2img -> inpaint -> img2img, latents handed on
        mask = load_image(str(mask_file))  # as the article loads its mask
        latents = t2i(prompts[0], num_inference_steps=steps, height=size, width=size,
                      generator=torch.Generator().manual_seed(7), output_type="latent").images
        latents = inpaint(prompts[1], image=latents, mask_image=mask, masked_image_latents=latents, height=size,
                          width=size, num_inference_steps=steps, generator=torch.Generator().manual_seed(92),
                          output_type="latent").images
        img2img(prompts[0], negative_prompt=prompts[2], image=latents, strength=0.35, num_inference_steps=steps,
                generator=torch.Generator().manual_seed(11), output_type="pil")

    def ours_chain():  # up to the decoded image, like the pipelines (no PNG writing)
        Engine().run(chain, overrides=overrides, targets=["decode"], out_dir=out_dir)

    ours_chain(), diffusers_chain()
    chain_times = interleaved({"ours": ours_chain, "diffusers": diffusers_chain}, repeat)

    # --- rerun with only the last stage changed (the whole workflow, SaveImage included)
    firsts, reruns = [], []
    for i in range(repeat):
        engine = Engine()
        start = time.perf_counter()
        engine.run(chain, overrides=overrides, out_dir=out_dir)
        firsts.append(time.perf_counter() - start)
        start = time.perf_counter()
        result = engine.run(chain, overrides={**overrides, "i2i.strength": 0.5 + i * 0.01}, out_dir=out_dir)
        reruns.append(time.perf_counter() - start)
        assert result.ran() == {"i2i", "decode", "save"}, result.status
    return {
        "steps": steps, "size": size,
        "stage": stage_times, "loop": loop_times, "chain": chain_times,
        "first_run": min(firsts), "rerun_last_stage": min(reruns),
    }


# ---------------------------------------------------------------------------------------------- part 2

def build_sd15(folder: Path) -> Path:
    """The random SD 1.5-architecture single file (built once; reused when present)."""
    path = folder / "sd15-random.safetensors"
    if not path.exists():
        from tests.tiny_models import build_single_file, sd15_configs

        build_single_file(path, in_channels=4, seed=0, configs=sd15_configs())
    return path


def peak_rss_gib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # Linux reports KiB


def sd15_ours(path: str, steps: int) -> dict:
    started = time.perf_counter()
    quiet()  # imports diffusers and transformers
    import torch

    from nodegraph.context import RunContext
    from nodegraph.nodes.conditioning import clip_encode
    from nodegraph.nodes.latent import empty_latent, vae_decode_node
    from nodegraph.nodes.models import load_checkpoint_node
    from nodegraph.nodes.sampling import sampler_node
    from diffusers import StableDiffusionPipeline  # noqa: F401  what LoadCheckpoint imports on first use
    imports = time.perf_counter() - started
    step_times = []
    last = [time.perf_counter()]

    def on_step(event):
        now = time.perf_counter()
        step_times.append(now - last[0])
        last[0] = now

    ctx = RunContext(listeners=[on_step])
    start = time.perf_counter()
    handles = load_checkpoint_node(path=path, ctx=ctx, config=None, dtype="float32")
    load = time.perf_counter() - start
    cond = clip_encode(handles["clip"], ctx, text=PROMPT, clip_skip=0, long_prompt="truncate")
    samples = []
    for _ in range(2):  # the first run also pages weights in and warms oneDNN up; the second is the figure
        step_times.clear()
        last[0] = time.perf_counter()
        start = time.perf_counter()
        latent = sampler_node(model=handles["model"], positive=cond, latent=empty_latent(64, 64), ctx=ctx, seed=0,
                              steps=steps, scheduler="euler")
        samples.append(time.perf_counter() - start)
    sample = samples[-1]
    image = vae_decode_node(handles["vae"], latent)
    assert torch.isfinite(image).all()
    from nodegraph.keys import path_fingerprint

    start = time.perf_counter()
    path_fingerprint(path)  # what the engine adds on a process's first run: the file's hash for the cache key
    fingerprint = time.perf_counter() - start
    return {"load_s": load, "import_s": imports, "engine_hash_s": fingerprint, "sample_s": sample,
            "s_per_step": statistics.median(step_times), "peak_rss_gib": peak_rss_gib()}


def sd15_diffusers(path: str, steps: int) -> dict:
    started = time.perf_counter()
    quiet()
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline
    imports = time.perf_counter() - started

    config = str(Path(path).with_suffix(".config"))
    start = time.perf_counter()
    pipe = StableDiffusionPipeline.from_single_file(path, config=config, local_files_only=True, safety_checker=None,
                                                    feature_extractor=None, requires_safety_checker=False,
                                                    torch_dtype=torch.float32)
    load = time.perf_counter() - start
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    step_times = []
    last = [0.0]

    def on_step(pipeline, i, t, kwargs):
        now = time.perf_counter()
        step_times.append(now - last[0])
        last[0] = now
        return kwargs

    for _ in range(2):  # as on our side: the second run is the figure
        step_times.clear()
        last[0] = time.perf_counter()
        start = time.perf_counter()
        pipe(PROMPT, num_inference_steps=steps, height=64, width=64, generator=torch.Generator().manual_seed(0),
             output_type="latent", callback_on_step_end=on_step)
        sample = time.perf_counter() - start
    # the first interval includes prompt encoding; the median of the steps is the per-step figure
    return {"load_s": load, "import_s": imports, "sample_s": sample, "s_per_step": statistics.median(step_times),
            "peak_rss_gib": peak_rss_gib()}


def sd15_part(folder: Path, steps: int) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    subprocess.run([sys.executable, __file__, "--build-sd15", str(folder)], check=True, cwd=REPO)
    path = build_sd15(folder)
    out = {"file_gib": path.stat().st_size / 1024**3, "build_s": time.perf_counter() - start}
    for side in ("ours", "diffusers"):
        proc = subprocess.run([sys.executable, __file__, f"--sd15-{side}", str(path), "--steps", str(steps)],
                              check=True, cwd=REPO, capture_output=True, text=True)
        out[side] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


# ---------------------------------------------------------------------------------------------- part 3

def sdxl_part(repeat: int, steps: int) -> dict:
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
    size, sched = 64, "dpmpp_2m_karras"
    common = {"seed": 7, "steps": steps, "scheduler": sched, "guidance_scale": 5.0}
    stage = {"format": "nodegraph/1", "nodes": {
        "ckpt": {"type": "LoadCheckpoint", "params": {"path": str(tiny.base)}},
        "pos": {"type": "CLIPEncode", "inputs": {"clip": "ckpt.clip"}, "params": {"text": PROMPT}},
        "empty": {"type": "EmptyLatent", "params": {"width": size, "height": size}},
        "t2i": {"type": "Sampler", "inputs": {"model": "ckpt.model", "positive": "pos.conditioning",
                                               "latent": "empty.latent"}, "params": dict(common)},
    }}
    handoff = {"format": "nodegraph/1", "nodes": {
        **stage["nodes"],
        "t2i": {**stage["nodes"]["t2i"], "params": {**common, "denoising_end": 0.8}},
        "ref": {"type": "LoadCheckpoint", "params": {"path": str(tiny.refiner)}},
        "ref_pos": {"type": "CLIPEncode", "inputs": {"clip": "ref.clip"}, "params": {"text": PROMPT}},
        "refine": {"type": "Sampler", "inputs": {"model": "ref.model", "positive": "ref_pos.conditioning",
                                                  "latent": "t2i.latent"},
                   "params": {**common, "seed": 8, "denoising_start": 0.8}},
    }}
    cond = encode_prompt(clip, PROMPT)
    pe, ne, pp, npp = base.encode_prompt(PROMPT, device="cpu", do_classifier_free_guidance=True)

    def ours_stage():
        Engine().run(stage, targets=["t2i"], out_dir=tempfile.gettempdir())

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
        Engine().run(handoff, targets=["refine"], out_dir=tempfile.gettempdir())

    def diffusers_handoff():
        latents = base(PROMPT, num_inference_steps=steps, height=size, width=size, guidance_scale=5.0,
                       denoising_end=0.8, generator=torch.Generator().manual_seed(7), output_type="latent").images
        refiner(PROMPT, image=latents, num_inference_steps=steps, guidance_scale=5.0, denoising_start=0.8,
                generator=torch.Generator().manual_seed(8), output_type="latent")

    for fn in (ours_stage, diffusers_stage, ours_loop, diffusers_loop, ours_handoff, diffusers_handoff):
        fn()  # warm-up
    return {
        "steps": steps, "size": size,
        "stage": interleaved({"ours": ours_stage, "diffusers": diffusers_stage}, repeat),
        "loop": interleaved({"ours": ours_loop, "diffusers": diffusers_loop}, repeat),
        "handoff": interleaved({"ours": ours_handoff, "diffusers": diffusers_handoff}, repeat),
    }


# ---------------------------------------------------------------------------------------------- report

def report(tiny: dict | None, sd15: dict | None, sdxl: dict | None = None) -> str:
    lines = []
    if tiny:
        s, l, c = tiny["stage"], tiny["loop"], tiny["chain"]
        ratio = lambda d: d["ours"] / d["diffusers"]  # noqa: E731
        lines += [
            f"tiny SD 1.x, CPU, {tiny['size']}x{tiny['size']}, {tiny['steps']} Euler steps per stage (best of runs)",
            f"  one stage  (CLIPEncode + Sampler via engine)  ours {s['ours']:.3f} s  diffusers {s['diffusers']:.3f} s"
            f"  ratio {ratio(s):.3f}x  (target <= 1.03x)",
            f"  sampler loop alone (given embeddings)         ours {l['ours']:.3f} s  diffusers {l['diffusers']:.3f} s"
            f"  ratio {ratio(l):.3f}x",
            f"  three-stage chain vs 3 chained pipelines      ours {c['ours']:.3f} s  diffusers {c['diffusers']:.3f} s"
            f"  ratio {ratio(c):.3f}x  (target <= 1.0x)",
            f"  rerun, only img2img strength changed           {tiny['rerun_last_stage']:.3f} s vs first run "
            f"{tiny['first_run']:.3f} s  ratio {tiny['rerun_last_stage'] / tiny['first_run']:.3f}x  (target <= 0.45x)",
        ]
    if sd15:
        o, d = sd15["ours"], sd15["diffusers"]
        lines += [
            f"random SD 1.5 architecture, single fp32 .safetensors ({sd15['file_gib']:.2f} GiB), CPU, 64x64, "
            "4 Euler steps (second run), each side in a fresh process, file in the OS page cache",
            f"  {'':10s} {'load s':>8s} {'s/step':>8s} {'peak RSS GiB':>13s}   (load excludes the one-time library "
            "import, shown apart)",
            f"  {'ours':10s} {o['load_s']:8.2f} {o['s_per_step']:8.3f} {o['peak_rss_gib']:13.2f}   import {o['import_s']:.2f} s",
            f"  {'diffusers':10s} {d['load_s']:8.2f} {d['s_per_step']:8.3f} {d['peak_rss_gib']:13.2f}   import "
            f"{d['import_s']:.2f} s",
            f"  {'ComfyUI':10s} {COMFY['load_s']:8.2f} {COMFY['s_per_step']:8.3f} {COMFY['peak_rss_gib']:13.2f}"
            "   (published figures, other hardware)",
            f"  through the engine, a process's first run also hashes the file for the cache key: "
            f"{o['engine_hash_s']:.2f} s",
        ]
    if sdxl:
        ratio = lambda d: d["ours"] / d["diffusers"]  # noqa: E731
        rows = [("one stage  (CLIPEncode + Sampler via engine)", "stage"),
                ("sampler loop alone (given embeddings)", "loop"),
                ("base -> refiner hand-off (end/start 0.8)", "handoff")]
        lines.append(f"tiny SDXL, CPU, {sdxl['size']}x{sdxl['size']}, {sdxl['steps']} DPM++ 2M Karras steps "
                     "(best of runs)")
        for title, key in rows:
            d = sdxl[key]
            lines.append(f"  {title:45s} ours {d['ours']:.3f} s  diffusers {d['diffusers']:.3f} s  "
                         f"ratio {ratio(d):.3f}x")
    lines.append("No GPU was available: every figure is CPU.")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=9)
    parser.add_argument("--steps", type=int, default=20, help="steps per stage for the tiny model")
    parser.add_argument("--sd15-steps", type=int, default=4)
    parser.add_argument("--skip-sd15", action="store_true")
    parser.add_argument("--skip-tiny", action="store_true")
    parser.add_argument("--skip-sdxl", action="store_true")
    parser.add_argument("--sd15-dir", default=os.path.join(tempfile.gettempdir(), "nodegraph-sd15-random"))
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--build-sd15", help=argparse.SUPPRESS)
    parser.add_argument("--sd15-ours", help=argparse.SUPPRESS)
    parser.add_argument("--sd15-diffusers", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.build_sd15:
        quiet()
        build_sd15(Path(args.build_sd15))
        return
    if args.sd15_ours or args.sd15_diffusers:
        fn = sd15_ours if args.sd15_ours else sd15_diffusers
        print(json.dumps(fn(args.sd15_ours or args.sd15_diffusers, args.steps)))
        return
    quiet()
    tiny = None if args.skip_tiny else tiny_part(args.repeat, args.steps)
    sdxl = None if args.skip_sdxl else sdxl_part(args.repeat, args.steps)
    sd15 = None if args.skip_sd15 else sd15_part(Path(args.sd15_dir), args.sd15_steps)
    if args.json:
        print(json.dumps({"tiny": tiny, "sd15": sd15, "sdxl": sdxl}, indent=2))
    print(report(tiny, sd15, sdxl))


if __name__ == "__main__":
    main()
