"""The the outpainting article panorama: our workflow vs the article's script logic, same models and settings.

    PYTHONPATH=. python benchmarks/outpaint.py [--repeat 3] [--size 64] [--times 2] [--steps 25]

Both sides use the tiny random SDXL checkpoint and IP-Adapter Plus of the tests, DPM++ 2M Karras,
guidance 4.0, IP-Adapter scale 0.1 from 6 slices, strength 1.0, and square the photo once, then
widen it `--times` times by size/4 pixels. Ours: workflows/outpaint_differential_sdxl.json through
the engine (fresh caches each run). The article's side: its process_image / slice_image /
merge_images on 8-bit OpenCV images (the plain re-implementations of tests/test_outpaint_seed.py)
and, for generate_image, StableDiffusionXLPipeline with load_ip_adapter for the prompt and image
embeddings plus the differential img2img loop of diffusers' community pipeline
(pipeline_stable_diffusion_xl_differential_img2img: latents reset to the noised original where
map > i/N), written out here because community pipelines are fetched from the hub.
Also: a rerun with one more expansion vs the first run (cached expansions reused). CPU only.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]

WORKFLOW = REPO / "workflows" / "outpaint_differential_sdxl.json"
PHOTO = REPO / "workflows" / "images" / "rocket_portrait.jpg"
GUIDANCE, IP_SCALE, SEED = 4.0, 0.1, 0


def build_models():
    from diffusers import UNet2DConditionModel

    from tests.tiny_ipadapter import build_tiny_ipadapters
    from tests.tiny_sdxl import build_tiny_sdxl_set

    base = build_tiny_sdxl_set().base
    unet = UNet2DConditionModel.from_pretrained(str(base / "unet"))
    return base, build_tiny_ipadapters(Path(tempfile.mkdtemp(prefix="nodegraph-bench-ip-")), unet)


def ours(base, adapters, size: int, times: int, steps: int):
    from nodegraph.api import Engine

    overrides = {
        "ckpt.path": str(base), "ipadapter.path": str(adapters.plus), "ipadapter.image_encoder": str(adapters.encoder),
        "size.value": size, "pixels.value": size // 4, "expand.repeat": times,
        "group:widen/sample.steps": steps, "group:widen/canvas.blur_kernel": size // 2 * 2 + 1,
        "group:widen/canvas.mask_offset": size // 20,
    }
    out = tempfile.mkdtemp(prefix="nodegraph-bench-out-")

    def first_run():
        engine = Engine(cache_dir=False)  # measure the work, not the disk cache
        engine.run(WORKFLOW, overrides=overrides, out_dir=out)
        return engine

    def rerun_one_more(engine):
        start = time.perf_counter()
        engine.run(WORKFLOW, overrides={**overrides, "expand.repeat": times + 1}, out_dir=out)
        return time.perf_counter() - start

    return first_run, rerun_one_more


def article(base, adapters, size: int, times: int, steps: int):
    """The outpainting article's script, on the same models."""
    import cv2
    import torch
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionXLPipeline

    from tests.test_outpaint_seed import article_merge_images, article_process_image, article_slice_image

    pipe = StableDiffusionXLPipeline.from_pretrained(str(base))
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, use_karras_sigmas=True)
    pipe.load_ip_adapter(str(adapters.plus.parent), subfolder="", weight_name=adapters.plus.name,
                         image_encoder_folder=str(adapters.encoder))
    pipe.set_ip_adapter_scale(IP_SCALE)
    pipe.set_progress_bar_config(disable=True)
    offset, blur, pixels = size // 20, size // 2 * 2 + 1, size // 4

    @torch.no_grad()
    def generate(canvas_bgr, keep_map, slices):
        """generate_image: differential img2img (map = keep), strength 1, with the IP-Adapter."""
        device = pipe.device
        pe, ne, ppe, npe = pipe.encode_prompt("", negative_prompt="", device=device, do_classifier_free_guidance=True)
        rgb = [cv2.cvtColor(s, cv2.COLOR_BGR2RGB) for s in slices]
        image_embeds = pipe.prepare_ip_adapter_image_embeds([rgb], None, device, 1, True)
        image = torch.from_numpy(cv2.cvtColor(canvas_bgr, cv2.COLOR_BGR2RGB)).permute(2, 0, 1)[None].float() / 127.5 - 1
        x0 = pipe.vae.encode(image).latent_dist.mean * pipe.vae.config.scaling_factor
        pipe.scheduler.set_timesteps(steps)
        timesteps = pipe.scheduler.timesteps
        generator = torch.Generator("cpu").manual_seed(SEED)
        noise = torch.randn(x0.shape, generator=generator)
        noised = [pipe.scheduler.add_noise(x0, noise, t[None]) for t in timesteps]
        keep = torch.from_numpy(keep_map).float()[None, None] / 255
        keep = torch.nn.functional.interpolate(keep, size=x0.shape[-2:], mode="bilinear")
        time_ids = torch.tensor([[size, size, 0, 0, size, size]] * 2, dtype=pe.dtype)
        added = {"text_embeds": torch.cat([npe, ppe]), "time_ids": time_ids, "image_embeds": image_embeds}
        latents = noised[0]
        for i, t in enumerate(timesteps):
            if i > 0:
                mask = (keep > i / steps).to(latents.dtype)
                latents = noised[i] * mask + latents * (1 - mask)
            model_input = pipe.scheduler.scale_model_input(torch.cat([latents] * 2), t)
            pred = pipe.unet(model_input, t, encoder_hidden_states=torch.cat([ne, pe]),
                             added_cond_kwargs=added, return_dict=False)[0]
            uncond, cond = pred.chunk(2)
            latents = pipe.scheduler.step(uncond + GUIDANCE * (cond - uncond), t, latents, return_dict=False)[0]
        decoded = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False)[0]
        rgb_out = ((decoded[0].permute(1, 2, 0).clamp(-1, 1) + 1) * 127.5).round().byte().numpy()
        return cv2.cvtColor(rgb_out, cv2.COLOR_RGB2BGR)

    def run():
        original = cv2.imread(str(PHOTO))
        h, w = original.shape[:2]
        scale = size / max(h, w)
        image = cv2.resize(original, (int(w * scale), int(h * scale)), interpolation=cv2.INTER_LANCZOS4)
        canvas, keep, _ = article_process_image(image, offset=offset, blur=blur, grow=size - image.shape[1],
                                                side="right", limit=size)
        generated = generate(canvas, keep, article_slice_image(original))
        final = generated
        for _ in range(times):
            canvas, keep, _ = article_process_image(final, offset=offset, blur=blur, grow=pixels, side="right",
                                                    limit=size)
            generated = generate(canvas, keep, article_slice_image(generated))
            final = article_merge_images(final, generated, pixels, "right")
        return final

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--times", type=int, default=2)
    parser.add_argument("--steps", type=int, default=25)
    args = parser.parse_args()
    from diffusion import interleaved, quiet  # benchmarks/diffusion.py

    quiet()
    base, adapters = build_models()
    first_run, rerun_one_more = ours(base, adapters, args.size, args.times, args.steps)
    reference = article(base, adapters, args.size, args.times, args.steps)
    first_run(), reference()  # warm-up
    best = interleaved({"ours": first_run, "article": reference}, args.repeat)
    reruns = [rerun_one_more(first_run()) for _ in range(args.repeat)]
    print(f"panorama {args.size}px: square + {args.times} expansions, {args.steps} steps each, tiny SDXL + IP-Adapter Plus, CPU")
    print(f"  workflow, first run        {best['ours']:.3f} s")
    print(f"  article's script logic     {best['article']:.3f} s")
    print(f"  ratio ours / article       {best['ours'] / best['article']:.3f}x")
    print(f"  rerun with repeat {args.times + 1} (one more expansion) {min(reruns):.3f} s = "
          f"{min(reruns) / best['ours']:.3f}x the first run of {args.times}")


if __name__ == "__main__":
    main()
