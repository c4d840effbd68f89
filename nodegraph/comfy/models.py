"""Converters of ComfyUI loader, conditioning, latent and sampler types (docs/comfy.md).

Some ComfyUI values carry more than their nodegraph counterpart: a LATENT its noise mask (SetLatentNoiseMask,
VAEEncodeForInpaint), a CLIP its last layer (CLIPSetLastLayer), a MODEL the differential-diffusion patch. Those
are recorded as facts on the ComfyUI output (``Builder.tag``) and read where nodegraph takes them: CLIPEncode's
clip_skip, and the sampler type that KSampler becomes (Sampler, LatentBlendSampler or DifferentialSampler).
"""
from __future__ import annotations

import math
from typing import Any

from .convert import Builder, ComfyNode, ComfyType, converts

# ComfyUI sampler_name -> nodegraph scheduler (diffusers class); names not here have no diffusers equivalent
SAMPLERS = {
    "euler": "euler", "euler_ancestral": "euler_a", "heun": "heun", "dpm_2": "dpm_2", "lms": "lms",
    "dpmpp_2m": "dpmpp_2m", "dpmpp_2m_sde": "dpmpp_2m_sde", "dpmpp_2m_sde_gpu": "dpmpp_2m_sde",
    "dpmpp_sde": "dpmpp_sde", "dpmpp_sde_gpu": "dpmpp_sde", "ddim": "ddim",
    # ComfyUI's uni_pc is the bh1 variant; diffusers' bh1 diverges (NaN) at small step counts, so both take bh2
    "uni_pc": "unipc", "uni_pc_bh2": "unipc",
}
# ComfyUI scheduler -> suffix of the nodegraph scheduler name (diffusers' sigma / timestep spacing options)
SCHEDULES = {"normal": "_linspace", "karras": "_karras", "exponential": "_exponential", "sgm_uniform": "_trailing",
             "simple": "_trailing"}

MAX_SEED = 0xFFFFFFFFFFFFFFFF
MAX_RESOLUTION = 16384
_SEED = ("INT", {"default": 0, "min": 0, "max": MAX_SEED, "control_after_generate": True})
_STEPS = ("INT", {"default": 20, "min": 1, "max": 10000})
_CFG = ("FLOAT", {"default": 8.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01})
_SAMPLER_CHOICES = (list(SAMPLERS),)
_SCHEDULER_CHOICES = (list(SCHEDULES),)
_STRENGTH = ("FLOAT", {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01})


def scheduler_name(node: ComfyNode, b: Builder) -> str | None:
    """The nodegraph scheduler for ComfyUI's sampler_name + scheduler, or a problem naming what has none."""
    from nodegraph.nodes.schedulers import SCHEDULER_NAMES  # light: a table, no diffusers

    sampler, schedule = b.value(node, "sampler_name"), b.value(node, "scheduler")
    found = sampler is not None and schedule is not None  # a missing one is reported; still check the other
    if sampler is not None and (not isinstance(sampler, str) or sampler not in SAMPLERS):
        b.problem(node, "sampler_name", "has no diffusers equivalent in nodegraph; use one of "
                                        f"{', '.join(SAMPLERS)}")
        found = False
    if schedule is not None and (not isinstance(schedule, str) or schedule not in SCHEDULES):
        b.problem(node, "scheduler", "has no diffusers equivalent in nodegraph; use one of "
                                     f"{', '.join(SCHEDULES)}")
        found = False
    if not found:
        return None
    name = SAMPLERS[sampler] + SCHEDULES[schedule]
    if name not in SCHEDULER_NAMES:
        b.problem(node, "scheduler", f"'{schedule}' sigmas are not available for sampler '{sampler}' in diffusers; "
                                     "use normal, sgm_uniform or simple with it")
        return None
    return name


# ---------------------------------------------------------------------------------------------- loaders

@converts("CheckpointLoaderSimple", spec=ComfyType({"ckpt_name": ([],)}, files={"ckpt_name": "checkpoints"}, outputs=("MODEL", "CLIP", "VAE"),
                                                   category="loaders"))
def checkpoint_loader(node: ComfyNode, b: Builder) -> list:
    """LoadCheckpoint; the name is looked up in the models folders' checkpoints/."""
    params: dict = {}
    inputs: dict = {}
    b.either(node, "ckpt_name", inputs, params, to="path")
    nid = b.add(node, "LoadCheckpoint", inputs=inputs, params=params)
    return [f"{nid}.model", f"{nid}.clip", f"{nid}.vae"]


@converts("VAELoader", spec=ComfyType({"vae_name": ([],)}, files={"vae_name": "vae"}, outputs=("VAE",), category="loaders"))
def vae_loader(node: ComfyNode, b: Builder) -> list:
    """LoadVAE; family sdxl when the name says "xl", else sd1 (ComfyUI reads it from the weights)."""
    name = b.value(node, "vae_name")
    if name is None:
        return None
    if name in ("taesd", "taesdxl", "taesd3", "taef1"):
        b.problem(node, "vae_name", f"'{name}' (ComfyUI's tiny preview VAE) has no nodegraph counterpart")
        return None
    family = "sdxl" if "xl" in str(name).lower() else "sd1"
    nid = b.add(node, "LoadVAE", params={"path": name, "family": family})
    return [f"{nid}.vae"]


@converts("LoraLoader", spec=ComfyType({"model": ("MODEL",), "clip": ("CLIP",), "lora_name": ([],),
                                        "strength_model": _STRENGTH, "strength_clip": _STRENGTH},
                                       files={"lora_name": "loras"}, outputs=("MODEL", "CLIP"), category="loaders"))
def lora_loader(node: ComfyNode, b: Builder) -> list:
    """LoadLoRA + ApplyLoRA with both strengths."""
    inputs = {"model": b.link(node, "model"), "clip": b.link(node, "clip")}
    file_params: dict = {}
    file_inputs: dict = {}
    b.either(node, "lora_name", file_inputs, file_params, to="path")
    lora = b.add(node, "LoadLoRA", suffix="file", inputs=file_inputs, params=file_params)
    params: dict = {}
    for name in ("strength_model", "strength_clip"):
        b.either(node, name, inputs, params, default=1.0)
    nid = b.add(node, "ApplyLoRA", inputs={**inputs, "lora": f"{lora}.lora"}, params=params)
    b.tag(node, 0, **b.source_facts(node, "model"))
    b.tag(node, 1, **b.source_facts(node, "clip"))
    return [f"{nid}.model", f"{nid}.clip"]


@converts("ControlNetLoader", spec=ComfyType({"control_net_name": ([],)}, files={"control_net_name": "controlnet"},
                                             outputs=("CONTROL_NET",), category="loaders"))
def controlnet_loader(node: ComfyNode, b: Builder) -> list:
    """LoadControlNet; the name is looked up in the models folders' controlnet/."""
    params: dict = {}
    inputs: dict = {}
    b.either(node, "control_net_name", inputs, params, to="path")
    nid = b.add(node, "LoadControlNet", inputs=inputs, params=params)
    return [f"{nid}.control_net"]


@converts("CLIPVisionLoader", spec=ComfyType({"clip_name": ([],)}, files={"clip_name": "clip_vision"}, outputs=("CLIP_VISION",), category="loaders"))
def clip_vision_loader(node: ComfyNode, b: Builder) -> list:
    """No node of its own: nodegraph loads the CLIP vision encoder inside LoadIPAdapter (image_encoder), so the
    name is kept for the node that uses it; no core ComfyUI type that nodegraph maps takes a CLIP_VISION."""
    name = b.value(node, "clip_name")
    b.tag(node, 0, clip_vision=name)
    return [None]


# ---------------------------------------------------------------------------------------------- conditioning

@converts("CLIPTextEncode", spec=ComfyType({"text": ("STRING", {"multiline": True, "dynamicPrompts": True}),
                                            "clip": ("CLIP",)}, outputs=("CONDITIONING",), category="conditioning"))
def clip_text_encode(node: ComfyNode, b: Builder) -> list:
    """CLIPEncode with syntax "comfy": ComfyUI's (word:1.2) weighting and its 75-token windows; a
    CLIPSetLastLayer before it becomes clip_skip."""
    inputs = {"clip": b.link(node, "clip")}
    params: dict = {}
    b.either(node, "text", inputs, params)
    if "embedding:" in str(params.get("text", "")):
        b.problem(node, "text", "names a textual-inversion embedding ('embedding:...'), which nodegraph does not "
                                "load; remove it from the prompt")
    skip = b.source_facts(node, "clip").get("clip_skip")
    if skip:
        params["clip_skip"] = skip
    params["syntax"] = "comfy"
    nid = b.add(node, "CLIPEncode", inputs=inputs, params=params)
    return [f"{nid}.conditioning"]


@converts("CLIPSetLastLayer", spec=ComfyType({"clip": ("CLIP",), "stop_at_clip_layer": (
        "INT", {"default": -1, "min": -24, "max": -1, "step": 1})}, outputs=("CLIP",), category="conditioning"))
def clip_set_last_layer(node: ComfyNode, b: Builder) -> list:
    """No node of its own: stop_at_clip_layer -n becomes clip_skip n - 1 on the CLIPEncode nodes that use it."""
    clip = b.link(node, "clip")
    layer = b.value(node, "stop_at_clip_layer", -1)
    if layer is None:
        return None
    if not isinstance(layer, int) or isinstance(layer, bool) or not -12 <= layer <= -1:
        b.problem(node, "stop_at_clip_layer", f"{layer!r}: nodegraph takes -1 (the last layer) to -12")
        return None
    b.tag(node, 0, **{**b.source_facts(node, "clip"), "clip_skip": -layer - 1})
    return [clip]


# ---------------------------------------------------------------------------------------------- latents

@converts("EmptyLatentImage", spec=ComfyType({
        "width": ("INT", {"default": 512, "min": 16, "max": MAX_RESOLUTION, "step": 8}),
        "height": ("INT", {"default": 512, "min": 16, "max": MAX_RESOLUTION, "step": 8}),
        "batch_size": ("INT", {"default": 1, "min": 1, "max": 4096})}, outputs=("LATENT",), category="latent"))
def empty_latent_image(node: ComfyNode, b: Builder) -> list:
    """EmptyLatent."""
    inputs: dict = {}
    params: dict = {}
    b.either(node, "width", inputs, params, default=512)
    b.either(node, "height", inputs, params, default=512)
    b.either(node, "batch_size", inputs, params, to="batch", default=1)
    nid = b.add(node, "EmptyLatent", inputs=inputs, params=params)
    return [f"{nid}.latent"]


@converts("VAEEncode", spec=ComfyType({"pixels": ("IMAGE",), "vae": ("VAE",)}, outputs=("LATENT",),
                                      category="latent"))
def vae_encode(node: ComfyNode, b: Builder) -> list:
    """VAEEncode (the posterior's mean, as ComfyUI encodes)."""
    nid = b.add(node, "VAEEncode", inputs={"vae": b.link(node, "vae"), "image": b.link(node, "pixels")})
    return [f"{nid}.latent"]


@converts("VAEDecode", spec=ComfyType({"samples": ("LATENT",), "vae": ("VAE",)}, outputs=("IMAGE",),
                                      category="latent"))
def vae_decode(node: ComfyNode, b: Builder) -> list:
    """VAEDecode."""
    nid = b.add(node, "VAEDecode", inputs={"vae": b.link(node, "vae"), "latent": b.link(node, "samples")})
    return [f"{nid}.image"]


@converts("VAEEncodeForInpaint", spec=ComfyType({"pixels": ("IMAGE",), "vae": ("VAE",), "mask": ("MASK",),
                                                 "grow_mask_by": ("INT", {"default": 6, "min": 0, "max": 64,
                                                                          "step": 1})},
                                                outputs=("LATENT",), category="latent/inpaint"))
def vae_encode_for_inpaint(node: ComfyNode, b: Builder) -> list:
    """VAEEncodeForInpaint (greyed masked pixels); its grown mask is the latent's noise mask."""
    inputs = {"vae": b.link(node, "vae"), "image": b.link(node, "pixels"), "mask": b.link(node, "mask")}
    params: dict = {}
    b.either(node, "grow_mask_by", inputs, params, default=6)
    nid = b.add(node, "VAEEncodeForInpaint", inputs=inputs, params=params)
    b.tag(node, 0, noise_mask=f"{nid}.mask")
    return [f"{nid}.latent"]


@converts("SetLatentNoiseMask", spec=ComfyType({"samples": ("LATENT",), "mask": ("MASK",)}, outputs=("LATENT",),
                                               category="latent/inpaint"))
def set_latent_noise_mask(node: ComfyNode, b: Builder) -> list:
    """No node of its own: the mask goes to the sampler (LatentBlendSampler's mask)."""
    latent, mask = b.link(node, "samples"), b.link(node, "mask")
    b.tag(node, 0, **{**b.source_facts(node, "samples"), "noise_mask": mask})
    return [latent]


@converts("InpaintModelConditioning", spec=ComfyType(
        {"positive": ("CONDITIONING",), "negative": ("CONDITIONING",), "vae": ("VAE",), "pixels": ("IMAGE",),
         "mask": ("MASK",), "noise_mask": ("BOOLEAN", {"default": True})},
        outputs=("CONDITIONING", "CONDITIONING", "LATENT"), output_names=("positive", "negative", "latent"),
        category="conditioning/inpaint"))
def inpaint_model_conditioning(node: ComfyNode, b: Builder) -> list:
    """InpaintModelConditioning: the latent carries the inpainting UNet's extra channels (so the conditionings
    pass through unchanged); with noise_mask the sampler blends with the mask (LatentBlendSampler, or
    DifferentialSampler with DifferentialDiffusion), without it Sampler (an inpainting checkpoint)."""
    positive, negative = b.link(node, "positive"), b.link(node, "negative")
    mask = b.link(node, "mask")
    nid = b.add(node, "InpaintModelConditioning",
                inputs={"vae": b.link(node, "vae"), "image": b.link(node, "pixels"), "mask": mask})
    noise_mask = b.value(node, "noise_mask", True)
    b.tag(node, 0, **b.source_facts(node, "positive"))
    b.tag(node, 1, **b.source_facts(node, "negative"))
    b.tag(node, 2, inpaint_model=True, **({"noise_mask": mask} if noise_mask else {}))
    return [positive, negative, f"{nid}.latent"]


# ---------------------------------------------------------------------------------------------- sampling

@converts("DifferentialDiffusion", spec=ComfyType(
        {"model": ("MODEL",)}, optional={"strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01})},
        outputs=("MODEL",), category="_for_testing"))
def differential_diffusion(node: ComfyNode, b: Builder) -> list:
    """No node of its own: a KSampler with this model and a noise mask becomes DifferentialSampler."""
    model = b.link(node, "model")
    strength = b.value(node, "strength", 1.0)
    if strength is not None and strength != 1:
        b.problem(node, "strength", "below 1 (the thresholded mask blended with the soft one) is not reproduced; "
                                    "nodegraph's DifferentialSampler is strength 1")
    b.tag(node, 0, **{**b.source_facts(node, "model"), "differential": True})
    return [model]


_CN_STRENGTH = ("FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.01})
_PERCENT_START = ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.001})
_PERCENT_END = ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.001})


def _control_entry(node: ComfyNode, b: Builder, start: Any, end: Any) -> dict | None:
    """One ControlNet carried by a conditioning until a sampler puts it on the model (None: strength 0, which
    ComfyUI ignores)."""
    strength = b.value(node, "strength", 1.0)
    if strength == 0:
        return None
    return {"id": node.id, "control_net": b.link(node, "control_net"), "image": b.link(node, "image"),
            "strength": strength, "start": start, "end": end}


def _tag_control(node: ComfyNode, b: Builder, slot: int, source: str, entry: dict | None) -> None:
    facts = b.source_facts(node, source)
    if entry is not None:
        facts["controlnets"] = (*facts.get("controlnets", ()), entry)
    b.tag(node, slot, **facts)


@converts("ControlNetApply", spec=ComfyType(
        {"conditioning": ("CONDITIONING",), "control_net": ("CONTROL_NET",), "image": ("IMAGE",),
         "strength": _CN_STRENGTH}, outputs=("CONDITIONING",), category="conditioning/controlnet"))
def controlnet_apply(node: ComfyNode, b: Builder) -> list:
    """No node of its own: the sampler that uses this conditioning as its positive prompt gets ApplyControlNet
    (sides "positive": ComfyUI does not steer the negative prompt's half) on its model."""
    conditioning = b.link(node, "conditioning")
    _tag_control(node, b, 0, "conditioning", _control_entry(node, b, 0.0, 1.0))
    return [conditioning]


@converts("ControlNetApplyAdvanced", spec=ComfyType(
        {"positive": ("CONDITIONING",), "negative": ("CONDITIONING",), "control_net": ("CONTROL_NET",),
         "image": ("IMAGE",), "strength": _CN_STRENGTH, "start_percent": _PERCENT_START, "end_percent": _PERCENT_END},
        optional={"vae": ("VAE",)}, outputs=("CONDITIONING", "CONDITIONING"), output_names=("positive", "negative"),
        category="conditioning/controlnet"))
def controlnet_apply_advanced(node: ComfyNode, b: Builder) -> list:
    """No node of its own: the sampler using these conditionings gets ApplyControlNet (both sides) on its model,
    start_percent / end_percent as start / end (fractions of the steps; ComfyUI's are of the sigma range)."""
    positive, negative = b.link(node, "positive"), b.link(node, "negative")
    entry = _control_entry(node, b, b.value(node, "start_percent", 0.0), b.value(node, "end_percent", 1.0))
    _tag_control(node, b, 0, "positive", entry)
    _tag_control(node, b, 1, "negative", entry)
    return [positive, negative]


def _controlled_model(node: ComfyNode, b: Builder, model: str | None) -> str | None:
    """The sampler's model with an ApplyControlNet (``<id>_controlnet<k>``) for each ControlNet on its prompts."""
    positive = b.source_facts(node, "positive").get("controlnets", ())
    negative = b.source_facts(node, "negative").get("controlnets", ())
    both = {e["id"] for e in negative}
    for entry in negative:
        if entry["id"] not in {e["id"] for e in positive}:
            b.problem(node, "negative", f"carries ControlNet '{entry['id']}' that the positive prompt does not; a "
                                        "ControlNet on the negative prompt only is not reproduced")
    for k, entry in enumerate(positive):
        params = {"strength": entry["strength"], "start": entry["start"], "end": entry["end"],
                  "sides": "both" if entry["id"] in both else "positive"}
        nid = b.add(node, "ApplyControlNet", suffix=f"controlnet{k}", params=params,
                    inputs={"model": model, "control_net": entry["control_net"], "image": entry["image"]})
        model = f"{nid}.model"
    return model


_KSAMPLER = ComfyType({"model": ("MODEL",), "seed": _SEED, "steps": _STEPS, "cfg": _CFG,
                       "sampler_name": _SAMPLER_CHOICES, "scheduler": _SCHEDULER_CHOICES,
                       "positive": ("CONDITIONING",), "negative": ("CONDITIONING",), "latent_image": ("LATENT",),
                       "denoise": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01})},
                      outputs=("LATENT",), category="sampling")

_KSAMPLER_ADVANCED = ComfyType({"model": ("MODEL",), "add_noise": (["enable", "disable"],), "noise_seed": _SEED,
                                "steps": _STEPS, "cfg": _CFG, "sampler_name": _SAMPLER_CHOICES,
                                "scheduler": _SCHEDULER_CHOICES, "positive": ("CONDITIONING",),
                                "negative": ("CONDITIONING",), "latent_image": ("LATENT",),
                                "start_at_step": ("INT", {"default": 0, "min": 0, "max": 10000}),
                                "end_at_step": ("INT", {"default": 10000, "min": 0, "max": 10000}),
                                "return_with_leftover_noise": (["disable", "enable"],)},
                               outputs=("LATENT",), category="sampling")


def denoise_steps(steps: int, denoise: float) -> tuple[int, float]:
    """ComfyUI's denoise d with S steps runs the last S steps of an int(S / d)-step schedule: nodegraph steps
    int(S / d) and the smallest strength whose int(steps * strength) is S (diffusers' img2img step count)."""
    total = int(steps / denoise)
    if total <= steps:
        return steps, 1.0
    strength = math.ceil(steps / total * 1e6) / 1e6  # readable, and at most 1e-6 * total steps above
    while int(total * strength) < steps:  # float rounding: at most an ulp or two
        strength = math.nextafter(strength, 2.0)
    return total, strength


def _max_steps() -> int:
    """The most steps nodegraph's samplers take (their ``steps`` bound)."""
    from nodegraph.nodes._params import Steps  # light: pydantic types only

    return next(m.le for info in Steps.__metadata__ for m in getattr(info, "metadata", ()) if hasattr(m, "le"))


def _sampler(node: ComfyNode, b: Builder, seed_name: str) -> tuple[dict, dict, dict] | None:
    """Inputs and params shared by KSampler and KSamplerAdvanced, and the latent's and model's facts."""
    inputs = {name: b.link(node, source) for name, source in
              (("model", "model"), ("positive", "positive"), ("negative", "negative"), ("latent", "latent_image"))}
    params: dict = {}
    b.either(node, seed_name, inputs, params, to="seed", default=0)
    b.either(node, "cfg", inputs, params, to="guidance_scale", default=8.0)
    steps = b.value(node, "steps", 20)
    params["steps"] = steps
    params["scheduler"] = scheduler_name(node, b)
    facts = {**b.source_facts(node, "model"), **b.source_facts(node, "latent_image")}
    inputs["model"] = _controlled_model(node, b, inputs["model"])
    return inputs, params, facts


def _sampler_type(inputs: dict, params: dict, facts: dict) -> str:
    """Sampler; with a noise mask LatentBlendSampler (which also gives an inpainting checkpoint the channels of
    InpaintModelConditioning's latent), or DifferentialSampler with DifferentialDiffusion."""
    mask = facts.get("noise_mask")
    if mask and facts.get("differential"):
        inputs["change_map"] = mask
        return "DifferentialSampler"
    if mask:
        inputs["mask"] = mask
        return "LatentBlendSampler"
    return "Sampler"


@converts("KSampler", spec=_KSAMPLER)
def ksampler(node: ComfyNode, b: Builder) -> list:
    """Sampler / LatentBlendSampler / DifferentialSampler with the mapped diffusers scheduler; denoise d with S
    steps runs the last S steps of an int(S / d)-step schedule, as ComfyUI does."""
    inputs, params, facts = _sampler(node, b, "seed")
    denoise = b.value(node, "denoise", 1.0)
    steps = params["steps"]
    number = isinstance(denoise, (int, float)) and not isinstance(denoise, bool)
    if denoise is not None and not number:
        b.problem(node, "denoise", f"{denoise!r}: must be a number")
    elif number and isinstance(steps, int):  # a steps that is no int is reported on steps
        if not 0 < denoise <= 1:
            b.problem(node, "denoise", f"{denoise}: must be above 0 and at most 1")
        elif denoise < 1:
            try:
                total = int(steps / denoise)
            except OverflowError:  # a denoise near 0 or an enormous steps: no schedule of that length
                total = None
            if total is None or total > _max_steps():
                schedule = (f"with {steps} steps runs the last steps of a {total}-step schedule" if total is not None
                            else "with these steps runs the last steps of a schedule too long to count")
                b.problem(node, "denoise", f"{schedule} (steps / denoise, as ComfyUI counts), longer than the "
                                           f"{_max_steps()} steps nodegraph's samplers take; raise denoise or lower "
                                           "steps")
            else:
                params["steps"], params["strength"] = denoise_steps(steps, denoise)
    kind = _sampler_type(inputs, params, facts)
    nid = b.add(node, kind, inputs=inputs, params={k: v for k, v in params.items() if v is not None})
    b.tag(node, 0, **b.source_facts(node, "latent_image"))  # ComfyUI returns the latent's copy: its mask stays
    return [f"{nid}.latent"]


@converts("KSamplerAdvanced", spec=_KSAMPLER_ADVANCED)
def ksampler_advanced(node: ComfyNode, b: Builder) -> list:
    """Sampler with start_step / end_step / add_noise (ComfyUI's start_at_step, end_at_step, add_noise);
    return_with_leftover_noise "enable" returns the noisy latent where end_at_step stops."""
    inputs, params, facts = _sampler(node, b, "noise_seed")
    steps = params["steps"]
    add_noise = b.value(node, "add_noise", "enable")
    start = b.value(node, "start_at_step", 0)
    end = b.value(node, "end_at_step", 10000)
    leftover = b.value(node, "return_with_leftover_noise", "disable")
    for name, value in (("add_noise", add_noise), ("return_with_leftover_noise", leftover)):
        if value not in ("enable", "disable", None):
            b.problem(node, name, f"{value!r}: must be 'enable' or 'disable'")
    stepped = {}
    if isinstance(start, int) and isinstance(end, int) and isinstance(steps, int):
        if start >= min(end, steps):
            b.problem(node, "start_at_step", f"{start} leaves no step to run (steps {steps}, end_at_step {end})")
        if end < steps and leftover == "disable":
            b.problem(node, "return_with_leftover_noise", "'disable' with end_at_step below steps (ComfyUI then "
                                                          "jumps to sigma 0 in the last step) is not reproduced; "
                                                          "use 'enable' or end_at_step >= steps")
        if start:
            stepped["start_step"] = start
        if end < steps:
            stepped["end_step"] = end
    if add_noise == "disable":
        stepped["add_noise"] = False
    kind = _sampler_type(inputs, params, facts)
    if kind != "Sampler" and stepped:
        b.problem(node, "start_at_step", "steps windows or add_noise 'disable' with a noise mask are not "
                                         "reproduced (nodegraph's LatentBlendSampler / DifferentialSampler run "
                                         "whole schedules)")
    params.update(stepped)
    nid = b.add(node, kind, inputs=inputs, params={k: v for k, v in params.items() if v is not None})
    b.tag(node, 0, **b.source_facts(node, "latent_image"))  # ComfyUI returns the latent's copy: its mask stays
    return [f"{nid}.latent"]
