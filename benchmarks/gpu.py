"""GPU figures (needs CUDA; exits with a message without one): float16, random weights of the real
architectures, written as single files and loaded the way users load theirs.

    PYTHONPATH=. python benchmarks/gpu.py [--dir /tmp/gpubench] [--steps 20] [--parts sd15,controlnet,...]

- SD 1.5-shaped at 512x512 and SDXL-shaped at 1024x1024: seconds per step and peak GPU memory, ours (through
  the engine) vs the diffusers pipeline on the same weights, interleaved pairs (median, min-max), with and
  without --compile; the UNet's model FLOPs utilisation: SD 1.5's UNet is about 0.80 TFLOP per evaluation of
  a 64x64 latent, SDXL's about 6.8 at 128x128; with classifier-free guidance a step evaluates a batch of 2;
  the peak is the card's dense float16 rate (--peak-tflops, 990 for an H100 SXM).
- The SD 1.5-shaped ControlNet inpaint at 512x512 (an inpainting checkpoint and an inpainting ControlNet, as
  workflows/controlnet_inpaint.json), ours vs StableDiffusionControlNetInpaintPipeline: seconds per step.
- The panorama workflow (workflows/outpaint_differential_sdxl.json's shape) on SDXL-shaped models under a
  12 GiB model budget (--vram normal --vram-budget 12GiB): peak GPU memory and seconds.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

FLOPS = {"sd15": 0.80e12, "sdxl": 6.8e12}  # per UNet evaluation of one latent, at the sizes below
SIZES = {"sd15": 512, "sdxl": 1024}
PARTS = ("sd15", "controlnet", "sdxl", "panorama", "sd15-compile", "controlnet-compile", "sdxl-compile")


def build(folder: Path, kind: str) -> Path:
    from tests.full_size_models import sd15_controlnet_folder, sd15_file, sd15_inpaint_file, sdxl_file

    makers = {"sd15": sd15_file, "sdxl": sdxl_file, "sd15-inpainting": sd15_inpaint_file,
              "sd15-controlnet": sd15_controlnet_folder}
    path = folder / (kind if kind.endswith("controlnet") else f"{kind}.safetensors")
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        makers[kind](path)
    return path


def step_timer():
    """A list of the seconds between consecutive steps (the first step, which warms up, not counted) and the
    callback that fills it, given the step's index."""
    times: list[float] = []
    last = [0.0]

    def tick(index: int) -> None:
        now = time.perf_counter()
        if index > 0:
            times.append(now - last[0])
        last[0] = now

    return times, tick


def ours(path: Path, size: int, steps: int, compile: bool) -> tuple[float, int]:
    import torch

    from nodegraph.api import Engine

    step_times, tick = step_timer()
    workflow = {"format": "nodegraph/1", "nodes": {
        "ckpt": {"type": "LoadCheckpoint", "params": {"path": str(path)}},
        "pos": {"type": "CLIPEncode", "inputs": {"clip": "ckpt.clip"}, "params": {"text": "a castle"}},
        "empty": {"type": "EmptyLatent", "params": {"width": size, "height": size}},
        "s": {"type": "Sampler", "inputs": {"model": "ckpt.model", "positive": "pos.conditioning",
                                            "latent": "empty.latent"}, "params": {"steps": steps, "seed": 1}}}}
    torch.cuda.reset_peak_memory_stats()
    Engine(cache_dir=False, vram="high", compile=compile).run(workflow, targets=["s"], device="cuda",
                                                               dtype="float16", progress=lambda e: tick(e.step - 1))
    torch.cuda.synchronize()
    return statistics.median(step_times), torch.cuda.max_memory_allocated()


def theirs(path: Path, size: int, steps: int, compile: bool) -> tuple[float, int]:
    import torch
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    from nodegraph.nodes._shipped_configs import CONFIGS_DIR, load_clip_tokenizer

    kind = "sdxl" if "sdxl" in path.name else "sd1"
    cls = StableDiffusionXLPipeline if kind == "sdxl" else StableDiffusionPipeline
    extra = {"tokenizer": load_clip_tokenizer(CONFIGS_DIR / kind, "tokenizer")}
    if kind == "sdxl":
        extra["tokenizer_2"] = load_clip_tokenizer(CONFIGS_DIR / kind, "tokenizer_2")
    else:
        extra.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe = cls.from_single_file(str(path), config=str(CONFIGS_DIR / kind), torch_dtype=torch.float16,
                                local_files_only=True, **extra).to("cuda")
    if compile:
        pipe.unet.compile()
    pipe.set_progress_bar_config(disable=True)
    step_times, tick = step_timer()
    torch.cuda.reset_peak_memory_stats()
    pipe("a castle", num_inference_steps=steps, height=size, width=size, output_type="latent",
         generator=torch.Generator().manual_seed(1), callback_on_step_end=lambda p, i, t, kw: tick(i) or kw)
    torch.cuda.synchronize()
    return statistics.median(step_times), torch.cuda.max_memory_allocated()


PHOTO = REPO / "workflows" / "images" / "coffee_256.jpg"


def inpaint_inputs(size: int) -> dict:
    """The nodes that make the photo (resize), the mask (a centred box) and the control image: both sides use them."""
    box = {"x": size // 4, "y": size // 4, "w": size // 2, "h": size // 2}
    return {
        "photo": {"type": "LoadImage", "params": {"path": str(PHOTO)}},
        "resize": {"type": "ImageResize", "inputs": {"image": "photo.image"},
                   "params": {"width": size, "height": size, "keep_aspect": False}},
        "mask": {"type": "MaskShape", "params": {"width": size, "height": size, **box}},
        "control": {"type": "InpaintControlImage", "inputs": {"image": "resize.image", "mask": "mask.mask"}}}


def ours_controlnet(paths: tuple[Path, Path], size: int, steps: int, compile: bool) -> tuple[float, int]:
    import torch

    from nodegraph.api import Engine

    checkpoint, controlnet = paths
    step_times, tick = step_timer()
    workflow = {"format": "nodegraph/1", "nodes": {
        "ckpt": {"type": "LoadCheckpoint", "params": {"path": str(checkpoint)}},
        "cn": {"type": "LoadControlNet", "params": {"path": str(controlnet)}},
        **inpaint_inputs(size),
        "apply": {"type": "ApplyControlNet", "inputs": {"model": "ckpt.model", "control_net": "cn.control_net",
                                                        "image": "control.image"}},
        "pos": {"type": "CLIPEncode", "inputs": {"clip": "ckpt.clip"}, "params": {"text": "a potted plant"}},
        "cond": {"type": "InpaintModelConditioning", "inputs": {"vae": "ckpt.vae", "image": "resize.image",
                                                                "mask": "mask.mask"}, "params": {"mode": "sampler"}},
        "s": {"type": "Sampler", "inputs": {"model": "apply.model", "positive": "pos.conditioning",
                                            "latent": "cond.latent"},
              "params": {"steps": steps, "seed": 1, "strength": 1.0}}}}
    torch.cuda.reset_peak_memory_stats()
    Engine(cache_dir=False, vram="high", compile=compile).run(workflow, targets=["s"], device="cuda",
                                                               dtype="float16", progress=lambda e: tick(e.step - 1))
    torch.cuda.synchronize()
    return statistics.median(step_times), torch.cuda.max_memory_allocated()


def theirs_controlnet(paths: tuple[Path, Path], size: int, steps: int, compile: bool) -> tuple[float, int]:
    import torch
    from diffusers import ControlNetModel, StableDiffusionControlNetInpaintPipeline

    from nodegraph.api import Engine
    from nodegraph.nodes._shipped_configs import CONFIGS_DIR, load_clip_tokenizer

    checkpoint, controlnet = paths
    # the same image, mask and control image as ours, made by our nodes (their arithmetic is tested elsewhere)
    made = Engine(cache_dir=False).run({"format": "nodegraph/1", "nodes": inpaint_inputs(size)},
                                       targets=["resize", "mask", "control"]).outputs
    pipe = StableDiffusionControlNetInpaintPipeline.from_single_file(
        str(checkpoint), config=str(CONFIGS_DIR / "sd1-inpainting"), torch_dtype=torch.float16,
        local_files_only=True, tokenizer=load_clip_tokenizer(CONFIGS_DIR / "sd1", "tokenizer"),
        controlnet=ControlNetModel.from_pretrained(str(controlnet), torch_dtype=torch.float16),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False).to("cuda")
    if compile:
        pipe.unet.compile()
        pipe.controlnet.compile()
    pipe.set_progress_bar_config(disable=True)
    step_times, tick = step_timer()
    torch.cuda.reset_peak_memory_stats()
    pipe("a potted plant", image=made["resize"]["image"], mask_image=made["mask"]["mask"],
         control_image=made["control"]["image"], height=size, width=size, strength=1.0, num_inference_steps=steps,
         output_type="latent", generator=torch.Generator().manual_seed(1),
         callback_on_step_end=lambda p, i, t, kw: tick(i) or kw)
    torch.cuda.synchronize()
    return statistics.median(step_times), torch.cuda.max_memory_allocated()


def pairs(path, size: int, steps: int, compile: bool, repeat: int, ours=ours, theirs=theirs) -> dict:
    import torch

    from nodegraph.nodes.models import clear_loaded_models

    runs = {"ours": [], "diffusers": []}
    for i in range(repeat + 1):  # the first pair warms up (and compiles): not counted
        order = [("ours", ours), ("diffusers", theirs)][:: 1 if i % 2 else -1]
        for name, fn in order:
            if compile:  # each side compiles afresh: in one code cache, ours (inference_mode) and diffusers' (no_grad)
                torch._dynamo.reset()  # fail each other's guards, and the recompiles run into dynamo's limit
            result = fn(path, size, steps, compile)
            clear_loaded_models()
            torch.cuda.empty_cache()
            if i:
                runs[name].append(result)
    ratios = [a[0] / b[0] for a, b in zip(runs["ours"], runs["diffusers"])]
    return {name: (statistics.median(r[0] for r in rs), max(r[1] for r in rs)) for name, rs in runs.items()} | {
        "ratio": (statistics.median(ratios), min(ratios), max(ratios))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default="/tmp/gpubench")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--peak-tflops", type=float, default=990.0)
    parser.add_argument("--parts", default=",".join(PARTS),
                        help=f"which measurements, in this order (default: all): {', '.join(PARTS)}")
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        sys.exit("benchmarks/gpu.py needs a CUDA GPU; none is visible to torch here")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, float16, random weights", flush=True)
    folder = Path(args.dir)
    for part in args.parts.split(","):
        if part == "panorama":
            panorama(build(folder, "sdxl"), folder)
            continue
        kind, compile = part.removesuffix("-compile"), part.endswith("-compile")
        if kind == "controlnet":
            paths = (build(folder, "sd15-inpainting"), build(folder, "sd15-controlnet"))
            r = pairs(paths, 512, args.steps, compile, args.repeat, ours_controlnet, theirs_controlnet)
            mfu = ""
        else:
            r = pairs(build(folder, kind), SIZES[kind], args.steps, compile, args.repeat)
            mfu = f"; UNet MFU {2 * FLOPS[kind] / r['ours'][0] / (args.peak_tflops * 1e12):.1%}"
        print(f"{part} {SIZES.get(kind, 512)}px: ours {r['ours'][0]:.4f} s/step, peak {r['ours'][1] / 2**30:.2f} GiB; "
              f"diffusers {r['diffusers'][0]:.4f} s/step, peak {r['diffusers'][1] / 2**30:.2f} GiB; ratio "
              f"{r['ratio'][0]:.3f}x ({r['ratio'][1]:.3f}-{r['ratio'][2]:.3f}){mfu}", flush=True)


def panorama(path: Path, folder: Path) -> None:
    """The outpainting panorama's shape on SDXL-shaped weights under a 12 GiB model budget (no IP-Adapter:
    it needs an image encoder of its own; the differential sampler, Telea prefill, overlay and merge run)."""
    import torch

    from nodegraph.api import Engine

    workflow = {"format": "nodegraph/1", "nodes": {
        "ckpt": {"type": "LoadCheckpoint", "params": {"path": str(path)}},
        "load": {"type": "LoadImage", "params": {"path": str(PHOTO)}},
        "big": {"type": "ImageResize", "inputs": {"image": "load.image"},
                "params": {"width": 1024, "height": 1024, "keep_aspect": False}},
        "grow": {"type": "ExpandCanvas", "inputs": {"image": "big.image"},
                 "params": {"expand_pixels": 256, "max_size": 1024}},
        "enc": {"type": "VAEEncode", "inputs": {"vae": "ckpt.vae", "image": "grow.image"}},
        "pos": {"type": "CLIPEncode", "inputs": {"clip": "ckpt.clip"}, "params": {"text": "a cafe"}},
        "s": {"type": "DifferentialSampler", "inputs": {"model": "ckpt.model", "positive": "pos.conditioning",
                                                        "latent": "enc.latent", "change_map": "grow.change"},
              "params": {"steps": 25, "guidance_scale": 4.0, "scheduler": "dpmpp_2m_karras"}},
        "dec": {"type": "VAEDecode", "inputs": {"vae": "ckpt.vae", "latent": "s.latent"}},
        "save": {"type": "SaveImage", "inputs": {"image": "dec.image"}}}}
    torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    Engine(cache_dir=False, vram="normal", vram_budget="12GiB").run(workflow, device="cuda", dtype="float16",
                                                                    out_dir=folder / "out")
    print(f"panorama step on SDXL-shaped weights under a 12 GiB budget: {time.perf_counter() - started:.1f} s, "
          f"peak {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
