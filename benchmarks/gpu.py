"""GPU figures (needs CUDA; exits with a message without one): float16, random weights of the real
architectures, written as single files and loaded the way users load theirs.

    PYTHONPATH=. python benchmarks/gpu.py [--dir /tmp/gpubench] [--steps 20] [--skip-sdxl] [--skip-panorama]

- SD 1.5-shaped at 512x512 and SDXL-shaped at 1024x1024: seconds per step and peak GPU memory, ours (through
  the engine) vs the diffusers pipeline on the same weights, interleaved pairs (median, min-max), with and
  without --compile; the UNet's model FLOPs utilisation: SD 1.5's UNet is about 0.80 TFLOP per evaluation of
  a 64x64 latent, SDXL's about 6.8 at 128x128; with classifier-free guidance a step evaluates a batch of 2;
  the peak is the card's dense float16 rate (--peak-tflops, 990 for an H100 SXM).
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


def build(folder: Path, kind: str) -> Path:
    from tests.full_size_models import sd15_file, sdxl_file

    path = folder / f"{kind}.safetensors"
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        (sd15_file if kind == "sd15" else sdxl_file)(path)
    return path


def ours(path: Path, size: int, steps: int, compile: bool) -> tuple[float, int]:
    import torch

    from nodegraph.api import Engine

    step_times: list[float] = []
    last = [0.0]

    def on_step(event):
        now = time.perf_counter()
        if event.step > 1:
            step_times.append(now - last[0])
        last[0] = now

    workflow = {"format": "nodegraph/1", "nodes": {
        "ckpt": {"type": "LoadCheckpoint", "params": {"path": str(path)}},
        "pos": {"type": "CLIPEncode", "inputs": {"clip": "ckpt.clip"}, "params": {"text": "a castle"}},
        "empty": {"type": "EmptyLatent", "params": {"width": size, "height": size}},
        "s": {"type": "Sampler", "inputs": {"model": "ckpt.model", "positive": "pos.conditioning",
                                            "latent": "empty.latent"}, "params": {"steps": steps, "seed": 1}}}}
    torch.cuda.reset_peak_memory_stats()
    Engine(cache_dir=False, vram="high", compile=compile).run(workflow, targets=["s"], device="cuda",
                                                               dtype="float16", progress=on_step)
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
    step_times: list[float] = []
    last = [0.0]

    def on_step(pipeline, i, t, kwargs):
        now = time.perf_counter()
        if i > 0:
            step_times.append(now - last[0])
        last[0] = now
        return kwargs

    torch.cuda.reset_peak_memory_stats()
    pipe("a castle", num_inference_steps=steps, height=size, width=size, output_type="latent",
         generator=torch.Generator().manual_seed(1), callback_on_step_end=on_step)
    torch.cuda.synchronize()
    return statistics.median(step_times), torch.cuda.max_memory_allocated()


def pairs(path: Path, size: int, steps: int, compile: bool, repeat: int) -> dict:
    import torch

    from nodegraph.nodes.models import clear_loaded_models

    runs = {"ours": [], "diffusers": []}
    for i in range(repeat + 1):  # the first pair warms up (and compiles): not counted
        order = [("ours", ours), ("diffusers", theirs)][:: 1 if i % 2 else -1]
        for name, fn in order:
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
    parser.add_argument("--skip-sdxl", action="store_true")
    parser.add_argument("--skip-panorama", action="store_true")
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        sys.exit("benchmarks/gpu.py needs a CUDA GPU; none is visible to torch here")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, float16, random weights")
    for kind in ("sd15",) + (() if args.skip_sdxl else ("sdxl",)):
        path = build(Path(args.dir), kind)
        for compile in (False, True):
            r = pairs(path, SIZES[kind], args.steps, compile, args.repeat)
            mfu = 2 * FLOPS[kind] / r["ours"][0] / (args.peak_tflops * 1e12)
            print(f"{kind} {SIZES[kind]}px{' --compile' if compile else ''}: ours {r['ours'][0]:.3f} s/step, "
                  f"peak {r['ours'][1] / 2**30:.2f} GiB; diffusers {r['diffusers'][0]:.3f} s/step, peak "
                  f"{r['diffusers'][1] / 2**30:.2f} GiB; ratio {r['ratio'][0]:.3f}x ({r['ratio'][1]:.3f}-"
                  f"{r['ratio'][2]:.3f}); UNet MFU {mfu:.1%}", flush=True)
    if not args.skip_panorama and not args.skip_sdxl:
        panorama(build(Path(args.dir), "sdxl"), Path(args.dir))


def panorama(path: Path, folder: Path) -> None:
    """The outpainting panorama's shape on SDXL-shaped weights under a 12 GiB model budget (no IP-Adapter:
    it needs an image encoder of its own; the differential sampler, Telea prefill, overlay and merge run)."""
    import torch

    from nodegraph.api import Engine

    photo = REPO / "workflows" / "images" / "coffee_256.jpg"
    workflow = {"format": "nodegraph/1", "nodes": {
        "ckpt": {"type": "LoadCheckpoint", "params": {"path": str(path)}},
        "load": {"type": "LoadImage", "params": {"path": str(photo)}},
        "big": {"type": "ImageResize", "inputs": {"image": "load.image"}, "params": {"width": 1024, "height": 1024}},
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
