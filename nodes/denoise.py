"""The one denoising loop every sampler shares, its hooks, and the plain sampling functions.

The arithmetic is diffusers' (StableDiffusionPipeline, StableDiffusionImg2ImgPipeline,
StableDiffusionInpaintPipeline), so that the same seed, scheduler and initial noise give the same
latents:

- text2img: ``x = noise * init_noise_sigma``, all N timesteps;
- img2img: the last ``int(N * strength)`` timesteps, ``x = add_noise(x0, noise, t_start)``;
- classifier-free guidance ``uncond + g * (cond - uncond)`` with [uncond, cond] in one UNet batch, when
  ``g > 1``;
- hooks change the loop without copying it: ``LatentBlend`` (docs/design.md §4.3: after each step the
  unmasked latents become ``add_noise(x0, noise, t_{i+1})``, clean ``x0`` after the last),
  ``ChannelConcat`` (inpainting UNets see ``cat([x, mask, masked_image_latents])``),
  ``DifferentialThreshold`` (docs/design.md §4.5: before step ``i >= 1`` pixels with ``1 - c > i/N`` are reset
  to ``add_noise(x0, noise, t_i)``).

Every random draw comes from one CPU ``torch.Generator(seed)`` and is moved to the device, like diffusers'
``randn_tensor`` with a CPU generator, in the order the pipeline draws from the caller's generator: the
image's VAE sample (for a LATENT encoded in mode "sampler"), the initial noise, the inpaint pipelines'
masked-image VAE sample, then the stochastic schedulers' steps (euler_a). See ``prepare``.

Runs on one UNet take turns (``unet_lock``): patches such as an IP-Adapter are installed on the shared UNet
for the length of a run, and a run with the plain MODEL must not see them.

SDXL (StableDiffusionXLPipeline / ...Img2ImgPipeline / ...InpaintPipeline): ``UNetConditioning`` carries
``added_cond_kwargs`` = pooled text embeds and the micro-conditioning ``time_ids`` (original size, crop,
target size, or aesthetic score for the refiner), made here from the sampled pixel size and the
CONDITIONING's ``size`` settings; IP-Adapter image embeds join them per step through ``ModelPatch.hooks``.

Refiner hand-off (``denoising_start`` / ``denoising_end``, diffusers' semantics): the schedule is cut at
the discrete timestep ``round(T - f * T)``; ``denoising_end`` stops early and returns the still noisy
latents; ``denoising_start`` continues such latents (strength is ignored, nothing is re-noised).
"""
from __future__ import annotations

from nodegraph.lazy import lazy

import contextlib
import inspect
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

torch = lazy("torch")

from nodegraph.errors import NodeError

from ._families import FAMILY_NAMES, family, micro_conditioning, space_mismatch, takes_image_embeds, takes_text_time
from ._handles import module_lock
from ._memory import compute_device
from .schedulers import make_scheduler

Progress = Callable[[int, int], None]


# ---------------------------------------------------------------------------------------------- conditioning

@dataclass
class UNetConditioning:
    """Everything the UNet gets besides latents and timestep, batched [uncond, cond] when guiding."""

    encoder_hidden_states: torch.Tensor
    added_cond_kwargs: Optional[dict] = None
    timestep_cond: Optional[torch.Tensor] = None
    cross_attention_kwargs: Optional[dict] = None


def _repeat_to(tensor: torch.Tensor, batch: int, what: str) -> torch.Tensor:
    if tensor.shape[0] == batch:
        return tensor
    if tensor.shape[0] == 1:
        return tensor.repeat(batch, *([1] * (tensor.ndim - 1)))
    raise NodeError(f"{what} has batch {tensor.shape[0]} but the latent has batch {batch}")


def _pad_tokens(embeds: torch.Tensor, length: int, filler: Optional[torch.Tensor]) -> torch.Tensor:
    """Lengthen chunked prompt embeddings to ``length`` tokens with empty-prompt chunks."""
    if embeds.shape[1] == length:
        return embeds
    if filler is None or (length - embeds.shape[1]) % filler.shape[1]:
        raise NodeError(f"positive and negative conditioning have different lengths ({embeds.shape[1]} and "
                        f"{length} tokens); encode both with the same long_prompt setting")
    reps = (length - embeds.shape[1]) // filler.shape[1]
    filler = filler.to(embeds.device, embeds.dtype).expand(embeds.shape[0], -1, -1)
    return torch.cat([embeds] + [filler] * reps, dim=1)


def _batched(value, batch: int, device, dtype, what: str):
    if isinstance(value, torch.Tensor):
        return _repeat_to(value.to(device=device, dtype=dtype if value.is_floating_point() else value.dtype), batch, what)
    if isinstance(value, (list, tuple)):
        return [_batched(v, batch, device, dtype, what) for v in value]
    return value


def _check_fits(unet, conditioning, side: str) -> None:
    """SD 1.x/2.x conditioning on an SDXL model (or the reverse), or prompt embeddings on a model conditioned on
    image embeddings (Kandinsky 2.2, or the reverse), fail with a clear message."""
    label = family(conditioning.family).label if conditioning.family in FAMILY_NAMES else conditioning.family
    as_image = conditioning.family in FAMILY_NAMES and family(conditioning.family).embeds_as == "image_embeds"
    if takes_image_embeds(unet) != as_image:
        want = "image embeddings (KandinskyPrior)" if takes_image_embeds(unet) else "prompt embeddings (CLIPEncode)"
        raise NodeError(f"the {side} conditioning comes from {label} but the model takes {want}: link conditioning "
                        "made for this model")
    if takes_text_time(unet) and conditioning.pooled is None:
        raise NodeError(f"the {side} conditioning comes from an {label} CLIP but the model is SDXL, which needs both "
                        "text encoders' embeddings and the pooled embedding: encode the prompt with the SDXL "
                        "checkpoint's clip")
    if not takes_text_time(unet) and conditioning.pooled is not None:
        raise NodeError(f"the {side} conditioning comes from an {label} CLIP but the model is not SDXL: encode the "
                        "prompt with this checkpoint's clip")


def unet_conditioning(unet, positive, negative, batch: int, guide: bool,
                      pixel_size: Optional[tuple[int, int]] = None) -> UNetConditioning:
    """The UNet's conditioning from CONDITIONING values: ``negative`` None means the empty prompt.

    ``pixel_size`` (height, width) is the image size being sampled: SD 1.x/2.x do not need it; SDXL's
    default time ids (original size, crop, target size) are made from it when a conditioning has none."""
    dtype, device = unet.dtype, compute_device(unet)
    _check_fits(unet, positive, "positive")
    if negative is not None:
        _check_fits(unet, negative, "negative")
    embeds_as = family(positive.family).embeds_as if positive.family in FAMILY_NAMES else None
    if embeds_as is not None:
        return _added_conditioning(unet, positive, negative, batch, guide, embeds_as)
    width = unet.config.cross_attention_dim
    time_ids = None
    if takes_text_time(unet) and "time_ids" not in positive.added:
        time_ids = micro_conditioning(unet.config, positive.pooled.shape[-1], pixel_size, positive.size,
                                      negative.size if negative is not None else None)
    if positive.embeds.shape[-1] != width:
        raise NodeError(f"the positive conditioning is {positive.embeds.shape[-1]} wide but this model expects "
                        f"{width}: encode the prompt with this checkpoint's CLIP")
    pos = _repeat_to(positive.embeds.to(device=device, dtype=dtype), batch, "positive conditioning")
    added = {k: _batched(v, batch, device, dtype, f"conditioning '{k}'") for k, v in positive.added.items()}
    if positive.pooled is not None:
        added["text_embeds"] = _batched(positive.pooled, batch, device, dtype, "pooled conditioning")
    if time_ids is not None:
        added["time_ids"] = _batched(time_ids[0], batch, device, dtype, "time ids")
    if not guide:
        return UNetConditioning(pos, added or None)
    negative = negative if negative is not None else positive.uncond
    if negative is None:
        raise NodeError("no negative conditioning linked and the positive one carries no empty-prompt embedding; "
                        "link a negative CLIPEncode")
    if negative.embeds.shape[-1] != width:
        raise NodeError(f"the negative conditioning is {negative.embeds.shape[-1]} wide but this model expects {width}")
    neg = _repeat_to(negative.embeds.to(device=device, dtype=dtype), batch, "negative conditioning")
    length = max(pos.shape[1], neg.shape[1])
    filler = (positive.uncond or negative.uncond or negative).embeds
    pos, neg = _pad_tokens(pos, length, filler), _pad_tokens(neg, length, filler)
    neg_added = {k: _batched(v, batch, device, dtype, f"negative conditioning '{k}'") for k, v in negative.added.items()}
    if negative.pooled is not None:
        neg_added["text_embeds"] = _batched(negative.pooled, batch, device, dtype, "negative pooled conditioning")
    if time_ids is not None:
        neg_added["time_ids"] = _batched(time_ids[1], batch, device, dtype, "negative time ids")
    merged = {}
    for key, value in added.items():
        other = neg_added.get(key)
        if other is None:  # e.g. IP-Adapter image embeds given on the positive side only: zeros for uncond
            other = [torch.zeros_like(v) for v in value] if isinstance(value, list) else torch.zeros_like(value)
        merged[key] = ([torch.cat([o, v]) for o, v in zip(other, value)] if isinstance(value, list)
                       else torch.cat([other, value]))
    return UNetConditioning(torch.cat([neg, pos]), merged or None)


def _added_conditioning(unet, positive, negative, batch: int, guide: bool, key: str) -> UNetConditioning:
    """A family whose embeddings go into ``added_cond_kwargs[key]`` and not to cross-attention (Kandinsky 2.2's
    image embeddings): no encoder_hidden_states, [negative, positive] under guidance, as its pipelines batch them."""
    dtype, device = unet.dtype, compute_device(unet)
    width = unet.config.encoder_hid_dim
    sides = [positive]
    if guide:
        negative = negative if negative is not None else positive.uncond
        if negative is None:
            raise NodeError("no negative conditioning linked and the positive one carries none; link the prior's "
                            "negative output")
        sides.insert(0, negative)
    embeds = []
    for name, side in zip(("negative", "positive")[-len(sides):], sides):
        if width is not None and side.embeds.shape[-1] != width:
            raise NodeError(f"the {name} conditioning is {side.embeds.shape[-1]} wide but this model expects {width}: "
                            "make it with this model's prior")
        embeds.append(_repeat_to(side.embeds.to(device=device, dtype=dtype), batch, f"{name} conditioning"))
    return UNetConditioning(None, {key: torch.cat(embeds)})


def guidance_enabled(unet, guidance_scale: float) -> bool:
    """diffusers' do_classifier_free_guidance."""
    return guidance_scale > 1 and unet.config.time_cond_proj_dim is None


# ---------------------------------------------------------------------------------------------- hooks

@dataclass
class Step:
    """One UNet call of the loop, as hooks see it: step ``index`` of ``total`` at ``timestep``; ``model_input`` the
    (scaled, CFG-doubled when ``guide``) latents; ``kwargs`` the UNet's keyword arguments for this call only
    (``encoder_hidden_states``, ``added_cond_kwargs``, ``cross_attention_kwargs``, ... and, for a ControlNet,
    ``down_block_additional_residuals`` / ``mid_block_additional_residual``), a fresh dict every step.
    ``latent_input`` is ``model_input`` before the ``unet_input`` hooks: the scaled latents alone, without an
    inpainting UNet's extra channels (what diffusers gives a ControlNet)."""

    index: int
    total: int
    timestep: torch.Tensor
    model_input: torch.Tensor
    kwargs: dict
    guide: bool
    latent_input: Optional[torch.Tensor] = None

    def add_cond(self, key: str, value) -> None:
        """Set one of the UNet's ``added_cond_kwargs`` for this call (the shared dict is not touched)."""
        self.kwargs["added_cond_kwargs"] = {**(self.kwargs.get("added_cond_kwargs") or {}), key: value}


class Hook:
    """Per-step behaviour plugged into ``denoise``; override what you need. Samplers pass their own hooks and
    every model patch adds its own (``ModelPatch.hooks``), so an extension works with every sampler.

    Order within a step: ``before_step`` (latents), ``unet_input`` (the UNet's input tensor), ``unet_kwargs``
    (the UNet's other arguments, through ``step.kwargs``), the UNet call, ``after_unet`` (its raw output, both
    halves under guidance), guidance, the scheduler step, ``after_step`` (latents)."""

    def before_step(self, latents: torch.Tensor, i: int, t: torch.Tensor) -> torch.Tensor:
        return latents

    def unet_input(self, model_input: torch.Tensor, i: int, t: torch.Tensor) -> torch.Tensor:
        return model_input

    def unet_kwargs(self, step: Step) -> None:
        """Change ``step.kwargs`` for this call (e.g. add a ControlNet's residuals, image embeds)."""

    def after_unet(self, step: Step, noise_pred: torch.Tensor) -> torch.Tensor:
        return noise_pred

    def after_step(self, latents: torch.Tensor, i: int, t: torch.Tensor) -> torch.Tensor:
        return latents


class LatentBlend(Hook):
    """Base-model inpainting (the latent-blending article): keep the unmasked latents on the noised original.

    After step i: ``x = (1 - m) * add_noise(x0, noise, t_{i+1}) + m * x``; after the last step the clean x0.
    ``m`` is the binary mask at latent size (1 = repaint)."""

    def __init__(self, scheduler, timesteps, x0: torch.Tensor, noise: torch.Tensor, mask: torch.Tensor):
        self.scheduler, self.timesteps, self.x0, self.noise, self.mask = scheduler, timesteps, x0, noise, mask

    def after_step(self, latents, i, t):
        proper = self.x0
        if i < len(self.timesteps) - 1:
            proper = self.scheduler.add_noise(self.x0, self.noise, torch.tensor([self.timesteps[i + 1]]))
        return (1 - self.mask) * proper + self.mask * latents


class ChannelConcat(Hook):
    """Inpainting UNet: append the mask and masked-image latents to the (scaled) model input."""

    def __init__(self, extra: torch.Tensor):
        self.extra = extra  # already batched like the model input (doubled for guidance)

    def unet_input(self, model_input, i, t):
        return torch.cat([model_input, self.extra], dim=1)


class DifferentialThreshold(Hook):
    """Differential diffusion (the outpainting article): a pixel with change c is free only for the last c*N steps.

    Before step i >= 1, where ``keep_map > i / N`` (keep_map = 1 - c) the latents are reset to
    ``add_noise(x0, noise, t_i)``, one noise tensor throughout."""

    def __init__(self, scheduler, timesteps, x0: torch.Tensor, noise: torch.Tensor, keep_map: torch.Tensor,
                 total: Optional[int] = None):
        self.scheduler, self.timesteps, self.x0, self.noise = scheduler, timesteps, x0, noise
        self.keep_map = keep_map
        self.total = total or len(timesteps)  # N: the run's steps before a denoising_end cut

    def before_step(self, latents, i, t):
        if i == 0:
            return latents
        reset = (self.keep_map > i / self.total).to(latents.dtype)
        original = self.scheduler.add_noise(self.x0, self.noise, self.timesteps[i:i + 1].repeat(self.x0.shape[0]))
        return original * reset + latents * (1 - reset)


# ---------------------------------------------------------------------------------------------- the loop

def learns_variance(scheduler) -> bool:
    """Whether a scheduler uses a UNet's predicted variance (``variance_type`` learned / learned_range)."""
    return getattr(scheduler.config, "variance_type", None) in ("learned", "learned_range")


def for_scheduler(noise_pred: torch.Tensor, channels: int, scheduler) -> torch.Tensor:
    """A UNet that predicts its variance too (2 x the latent channels, Kandinsky 2.2's) keeps it only for a
    scheduler that uses it; the others get the noise alone."""
    if noise_pred.shape[1] == channels or learns_variance(scheduler):
        return noise_pred
    return noise_pred[:, :channels]


def guided(noise_pred: torch.Tensor, guidance_scale: float, channels: int, scheduler) -> torch.Tensor:
    """Classifier-free guidance on an [uncond, cond] batch: ``uncond + g * (cond - uncond)`` on the noise; a
    predicted variance (channels beyond the latent's) is taken from the conditioned half, as diffusers'
    Kandinsky and UnCLIP pipelines do."""
    uncond, cond = noise_pred.chunk(2)
    noise = uncond[:, :channels] + guidance_scale * (cond[:, :channels] - uncond[:, :channels])
    if noise_pred.shape[1] > channels:
        noise = torch.cat([noise, cond[:, channels:]], dim=1)
    return for_scheduler(noise, channels, scheduler)


def step_kwargs(scheduler, generator: Optional[torch.Generator], eta: float = 0.0) -> dict:
    """diffusers' prepare_extra_step_kwargs: eta for DDIM, the generator for stochastic schedulers."""
    accepted = set(inspect.signature(scheduler.step).parameters)
    kwargs = {}
    if "eta" in accepted:
        kwargs["eta"] = eta
    if "generator" in accepted:
        kwargs["generator"] = generator
    return kwargs


def denoise(unet, scheduler, timesteps: torch.Tensor, latents: torch.Tensor, cond: UNetConditioning,
            guidance_scale: float, hooks: Sequence[Hook] = (), generator: Optional[torch.Generator] = None,
            eta: float = 0.0, progress: Optional[Progress] = None) -> torch.Tensor:
    """Run the scheduler over ``timesteps`` from ``latents``; hooks adjust it per step.

    Runs under ``torch.inference_mode`` (a few percent faster than no_grad) and returns a normal tensor,
    so later nodes may use the result freely."""
    guide = guidance_enabled(unet, guidance_scale)
    extra = step_kwargs(scheduler, generator, eta)
    total = len(timesteps)
    with torch.inference_mode():
        for i, t in enumerate(timesteps):
            for hook in hooks:
                latents = hook.before_step(latents, i, t)
            model_input = torch.cat([latents] * 2) if guide else latents
            model_input = latent_input = scheduler.scale_model_input(model_input, t)
            for hook in hooks:
                model_input = hook.unet_input(model_input, i, t)
            step = Step(i, total, t, model_input, dict(
                encoder_hidden_states=cond.encoder_hidden_states, timestep_cond=cond.timestep_cond,
                cross_attention_kwargs=cond.cross_attention_kwargs, added_cond_kwargs=cond.added_cond_kwargs), guide, latent_input)
            for hook in hooks:
                hook.unet_kwargs(step)
            noise_pred = unet(step.model_input, t, **step.kwargs, return_dict=False)[0]
            for hook in hooks:
                noise_pred = hook.after_unet(step, noise_pred)
            noise_pred = guided(noise_pred, guidance_scale, latents.shape[1], scheduler) if guide else \
                for_scheduler(noise_pred, latents.shape[1], scheduler)
            latents = scheduler.step(noise_pred, t, latents, **extra, return_dict=False)[0]
            for hook in hooks:
                latents = hook.after_step(latents, i, t)
            if progress is not None:
                progress(i + 1, total)
    return latents.clone()  # outside inference mode: a normal tensor


# ---------------------------------------------------------------------------------------------- setup

# The random draws each diffusers pipeline makes from the caller's generator before its loop, in order.
TEXT2IMG = ("noise",)
IMG2IMG = ("image", "noise")  # StableDiffusion(XL)Img2ImgPipeline.prepare_latents: encode, then noise
HANDOFF = ("image",)  # StableDiffusionXLImg2ImgPipeline with denoising_start: no noise (add_noise=False)
# StableDiffusion(XL)InpaintPipeline: prepare_latents (image, when the UNet has 4 channels or strength < 1;
# then noise, also with denoising_start), then prepare_mask_latents (the masked image, whatever the UNet)
INPAINT = ("image", "noise", "masked_image")
INPAINT_FROM_NOISE = ("noise", "masked_image")  # 9-channel UNet at strength 1: the image is not encoded


def vae_sample(mean: torch.Tensor, std: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """diffusers' ``DiagonalGaussianDistribution.sample`` in the scaled space: eps of the posterior's shape and
    dtype from the generator on the CPU, then ``mean + std * eps`` (in the latents' dtype)."""
    eps = torch.randn(tuple(std.shape), generator=generator, dtype=std.dtype).to(std.device)
    return (mean.to(std) + std * eps).to(mean.dtype)


# The lock of one UNet object, held by a sampler run from applying its patches to the end of its loop.
unet_lock = module_lock


def _cutoff(scheduler, fraction: float) -> int:
    """diffusers' discrete_timestep_cutoff for a denoising_start / denoising_end fraction."""
    train = scheduler.config.num_train_timesteps
    return int(round(train - fraction * train))


def schedule(scheduler, steps: int, strength: float, device, partial: bool, denoising_start: float = 0.0,
             denoising_end: float = 1.0, begin_at_zero: bool = False, start_step: int = 0,
             end_step: int = 0) -> tuple[torch.Tensor, int]:
    """Timesteps to run and N, their count before a ``denoising_end`` cut.

    All of them (text2img); the last ``int(steps * strength)`` (img2img, inpaint); with ``denoising_start``
    those below its cutoff, strength ignored (SDXL img2img/inpaint ``get_timesteps``); ``denoising_end``
    then keeps those at or above its cutoff (the SDXL pipelines' step 8.1). ``start_step`` / ``end_step`` (0 =
    the last) run steps start_step .. end_step - 1 of the ``steps`` (ComfyUI's start_at_step / end_at_step)."""
    scheduler.set_timesteps(steps, device=device)
    if start_step or end_step:
        end = end_step if 0 < end_step < steps else steps
        if start_step >= end:
            raise NodeError(f"start_step {start_step} leaves no step to run before step {end} of {steps}; "
                            "lower start_step or raise end_step / steps")
        first = start_step * scheduler.order
        timesteps = scheduler.timesteps[first:end * scheduler.order]
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(first)
        return timesteps, len(timesteps)
    if 0 < denoising_start < 1:
        count = int((scheduler.timesteps < _cutoff(scheduler, denoising_start)).sum().item())
        if scheduler.order == 2 and count % 2 == 0:
            count += 1  # do not stop between a second-order scheduler's two evaluations
        t_start = len(scheduler.timesteps) - count
        timesteps = scheduler.timesteps[t_start:]
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(t_start)
    elif partial:
        init_timestep = min(int(steps * strength), steps)
        t_start = max(steps - init_timestep, 0)
        if steps - t_start < 1:
            raise NodeError(f"strength {strength} with {steps} steps leaves no step to run (int(steps * strength) = 0); "
                            "raise steps or strength")
        timesteps = scheduler.timesteps[t_start * scheduler.order:]
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(t_start * scheduler.order)
    else:
        timesteps = scheduler.timesteps
        if begin_at_zero and hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(0)  # StableDiffusionXLPipeline does; SD 1.x looks the first step up
    total = len(timesteps)
    if 0 < denoising_end < 1:
        cutoff = _cutoff(scheduler, denoising_end)
        timesteps = timesteps[:len([t for t in timesteps if t >= cutoff])]
    if len(timesteps) == 0:
        raise NodeError(f"no step to run: with {steps} steps, denoising_start {denoising_start} and denoising_end "
                        f"{denoising_end} leave no timestep in between; raise steps or move the fractions apart")
    return timesteps, total


@dataclass
class Run:
    """Shared setup of one sampler run."""

    unet: object
    scheduler: object
    timesteps: torch.Tensor
    noise: Optional[torch.Tensor]  # None when the pipeline draws none (HANDOFF)
    generator: torch.Generator
    cond: UNetConditioning
    guidance_scale: float
    x0: torch.Tensor  # the image latents (drawn for mode "sampler"); unused by text2img
    patches: Sequence["ModelPatch"] = ()
    total: int = 0  # N: steps before a denoising_end cut (differential thresholds)
    handoff: bool = False  # denoising_start: continue the given latents as they are
    masked_image_latents: Optional[torch.Tensor] = None  # inpainting UNet conditioning (drawn for "sampler")

    def start_from_image(self) -> torch.Tensor:
        """img2img start: x0 noised to the first timestep."""
        t0 = self.timesteps[:1].repeat(self.noise.shape[0])
        return self.scheduler.add_noise(self.x0, self.noise, t0)

    def start_from_noise(self) -> torch.Tensor:
        return self.noise * self.scheduler.init_noise_sigma

    def denoise(self, latents, hooks=(), progress=None) -> torch.Tensor:
        """The loop with the sampler's ``hooks`` and, before them, the model patches' own."""
        with unet_lock(self.unet), contextlib.ExitStack() as stack:
            for patch in self.patches:
                stack.enter_context(patch.applied(self.unet))
            hooks = [*(h for patch in self.patches for h in patch.hooks(self)), *hooks]
            return denoise(self.unet, self.scheduler, self.timesteps, latents, self.cond, self.guidance_scale, hooks,
                           self.generator, progress=progress)

    @property
    def guide(self) -> bool:
        return guidance_enabled(self.unet, self.guidance_scale)


class ModelPatch:
    """A change to the shared UNet that lives only for one sampler run (an IP-Adapter, say).

    A patched MODEL is a copy of the handle with the patch appended to ``patches``; the
    UNet itself is changed only inside ``applied`` and restored after, and runs on one UNet
    take turns (``unet_lock``), so nodes using the unpatched MODEL never see the change.
    """

    def applied(self, unet) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def hooks(self, run: "Run") -> Sequence[Hook]:
        """The patch's per-step hooks for this run (e.g. image embeds or a ControlNet's residuals added to the
        UNet's arguments); they run in every sampler, before the sampler's own."""
        return ()


def prepare(model, positive, negative, latents, *, seed: int | Sequence[int], steps: int, guidance_scale: float, scheduler: str,
            strength: float, partial: bool, draws: Sequence[str], denoising_start: float = 0.0,
            denoising_end: float = 1.0, start_step: int = 0, end_step: int = 0, add_noise: bool = True) -> Run:
    """Shared setup: conditioning, scheduler, timesteps and the random draws.

    One CPU ``torch.Generator(seed)`` makes ``draws`` in order, as the diffusers pipeline draws from the
    caller's generator, and then feeds the scheduler's steps. A list of seeds (one per latent row, for jobs run
    as one batch) gives each row its own generator: its draws, and a stochastic scheduler's per-step draws, are
    then exactly those of its own run with that seed:

    - "image": the VAE sample of a LATENT encoded in mode "sampler" (``Latents.sample_std``); other latents
      are used as they are, as the pipelines use latents given to them;
    - "noise": the initial noise;
    - "masked_image": the masked image's VAE sample (mode "sampler"); with a 4-channel UNet the pipeline
      encodes the masked photo too and ignores it, so only the draw is made, to keep the generator in step."""
    samples = latents.samples
    unet = model.unet
    device, dtype = compute_device(unet), unet.dtype
    mismatch = space_mismatch(getattr(latents, "space", None), model.kind.space, "the model")
    if mismatch:
        raise NodeError(mismatch)
    if unet.config.out_channels not in (samples.shape[1], 2 * samples.shape[1]):  # 2x: noise and variance
        raise NodeError(f"the latent has {samples.shape[1]} channels but the model's UNet makes "
                        f"{unet.config.out_channels}; use a latent from this checkpoint's VAE / EmptyLatent")
    if 0 < denoising_start < 1 and 0 < denoising_end < 1 and denoising_start >= denoising_end:
        raise NodeError(f"denoising_start {denoising_start} must be below denoising_end {denoising_end}")
    batch = samples.shape[0]
    guide = guidance_enabled(unet, guidance_scale)
    factor = getattr(model, "vae_scale_factor", 8)
    cond = unet_conditioning(unet, positive, negative, batch, guide,
                             (samples.shape[-2] * factor, samples.shape[-1] * factor))
    sched = make_scheduler(scheduler, model.scheduler_config)
    timesteps, total = schedule(sched, steps, strength, device, partial, denoising_start, denoising_end,
                                begin_at_zero=takes_text_time(unet), start_step=start_step, end_step=end_step)
    if isinstance(seed, int):
        generator = torch.Generator("cpu").manual_seed(seed)
        x0, noise, masked = _draw(latents, draws, generator, dtype)
    else:  # one seed per item: each item's draws are exactly those of its own run
        # (diffusers' randn_tensor draws row i from generator i, so a list needs one row per seed)
        if len(seed) != batch:
            raise NodeError(f"{len(seed)} seeds for a latent batch of {batch}: give one seed per item")
        generator = [torch.Generator("cpu").manual_seed(s) for s in seed]
        parts = [_draw(latents, draws, g, dtype, slice(i, i + 1)) for i, g in enumerate(generator)]
        x0, noise, masked = (None if part[0] is None else torch.cat(part) for part in zip(*parts))
    noise = noise.to(device) if noise is not None else None
    patches = tuple(getattr(model, "patches", ()))
    return Run(unet, sched, timesteps, noise, generator, cond, guidance_scale, x0.to(device=device, dtype=dtype),
               patches, total, handoff=0 < denoising_start < 1 or not add_noise, masked_image_latents=masked)


def _draw(latents, draws: Sequence[str], generator: torch.Generator, dtype, rows: slice = slice(None)):
    """The draws of one run (``rows`` of the latent batch) from its generator, in the pipeline's order:
    (x0, noise, masked-image latents)."""
    samples = latents.samples[rows]
    x0, noise = samples, None
    masked = latents.masked_image_latents[rows] if latents.masked_image_latents is not None else None
    for draw in draws:
        if draw == "image" and latents.sample_std is not None:
            x0 = vae_sample(samples, latents.sample_std[rows], generator)
        elif draw == "noise":
            noise = torch.randn(tuple(samples.shape), generator=generator, dtype=dtype)
        elif draw == "masked_image" and latents.masked_image_std is not None:
            masked = vae_sample(masked, latents.masked_image_std[rows], generator)
        elif draw == "masked_image" and latents.sample_std is not None:
            std = latents.sample_std[rows]
            torch.randn(tuple(std.shape), generator=generator, dtype=std.dtype)
    return x0, noise, masked


def _latent_size_mask(mask: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    return _repeat_to(mask.to(device=x0.device, dtype=x0.dtype), x0.shape[0], "mask")


# ---------------------------------------------------------------------------------------------- samplers

def sample(model, positive, negative, latents, *, seed: int, steps: int, guidance_scale: float, scheduler: str,
           strength: float, denoising_start: float = 0.0, denoising_end: float = 1.0, start_step: int = 0,
           end_step: int = 0, add_noise: bool = True, progress: Optional[Progress] = None) -> torch.Tensor:
    """Text2img (empty latent), img2img (image latent), or inpainting-checkpoint sampling (latent from
    InpaintModelConditioning, 9-channel UNet). Returns the final latents.

    ``denoising_end`` < 1 stops at that fraction of the schedule (the latents stay noisy, for a hand-off);
    ``denoising_start`` > 0 continues such latents from that fraction: strength is ignored and the latents
    are used as they are (SDXL img2img / inpaint pipelines' ``denoising_start``). ``start_step`` / ``end_step``
    do the same by step number; ``add_noise`` False continues the latents as they are (ComfyUI's
    KSamplerAdvanced), True noises an image latent to the first step run."""
    handoff = 0 < denoising_start < 1 or not add_noise
    inpaint = latents.has_inpaint_conditioning and (model.inpainting or not handoff)
    if model.inpainting and not inpaint:
        raise NodeError("the model is an inpainting checkpoint (9-channel UNet): make the latent with "
                        "InpaintModelConditioning (vae, image, mask), or load a normal checkpoint for text2img/img2img")
    if inpaint and not model.inpainting:
        raise NodeError(f"the latent carries inpainting-model conditioning (InpaintModelConditioning) but the model "
                        f"has a normal {model.in_channels}-channel UNet: inpaint with LatentBlendSampler "
                        "(VAEEncode + mask) for a normal checkpoint, or load an inpainting checkpoint")
    if latents.empty and strength < 1:
        raise NodeError(f"strength {strength} < 1 keeps part of the input image, but an EmptyLatent has none: use "
                        "strength 1 for text2img, or VAEEncode an image for img2img")
    if latents.empty and 0 < denoising_start < 1:
        raise NodeError("denoising_start continues a partly denoised latent (from a sampler with denoising_end), "
                        "but an EmptyLatent has none: link that sampler's latent, or set denoising_start 0")
    fractions = dict(denoising_start=denoising_start, denoising_end=denoising_end, start_step=start_step,
                     end_step=end_step, add_noise=add_noise)
    from_noise = latents.empty and start_step == 0 and add_noise  # text2img
    if inpaint:
        draws = INPAINT_FROM_NOISE if strength == 1.0 and not handoff and not start_step else INPAINT
        run = prepare(model, positive, negative, latents, seed=seed, steps=steps, guidance_scale=guidance_scale,
                      scheduler=scheduler, strength=strength, partial=True, draws=draws, **fractions)
        return run.denoise(_inpaint_start(run, strength if not start_step else 0.0),
                           [_channel_concat(run, latents, model, guidance_scale)], progress)
    draws = TEXT2IMG if from_noise else HANDOFF if handoff else IMG2IMG
    run = prepare(model, positive, negative, latents, seed=seed, steps=steps, guidance_scale=guidance_scale,
                  scheduler=scheduler, strength=strength, partial=not from_noise, draws=draws, **fractions)
    if from_noise:
        start = run.start_from_noise()
    else:
        start = run.x0 if handoff else run.start_from_image()
    return run.denoise(start, (), progress)


def _channel_concat(run: Run, latents, model, guidance_scale: float) -> ChannelConcat:
    """The inpainting UNet's extra channels: the mask and the masked image's latents, in the order the model's
    family feeds them (doubled when guiding)."""
    mask = _latent_size_mask(latents.inpaint_mask, run.x0)
    parts = {"mask": mask, "keep_mask": 1 - mask,
             "masked_image": _repeat_to(run.masked_image_latents.to(run.x0.device, run.x0.dtype), run.x0.shape[0],
                                        "masked image latents")}
    extra = torch.cat([parts[name] for name in model.kind.inpaint_channels], dim=1)
    return ChannelConcat(torch.cat([extra] * 2) if guidance_enabled(model.unet, guidance_scale) else extra)


def _inpaint_start(run: Run, strength: float) -> torch.Tensor:
    """The inpaint pipelines' first latents: the given ones (hand-off), pure noise (strength 1) or the noised image."""
    if run.handoff:
        return run.x0
    return run.start_from_noise() if strength == 1.0 else run.start_from_image()


def blend_inpaint(model, positive, negative, latents, mask: torch.Tensor, *, seed: int, steps: int,
                  guidance_scale: float, scheduler: str, strength: float, denoising_start: float = 0.0,
                  denoising_end: float = 1.0, progress: Optional[Progress] = None) -> torch.Tensor:
    """Base-model inpainting by latent blending (StableDiffusionInpaintPipeline / StableDiffusionXLInpaintPipeline
    with a 4-channel UNet). With ``denoising_start`` the given latents are continued and also serve as the
    latents blended back outside the mask, as the SDXL inpaint pipeline does with a refiner. An inpainting
    checkpoint (9-channel UNet) with a latent from InpaintModelConditioning gets its extra channels as well and is
    blended the same way (ComfyUI's InpaintModelConditioning with noise_mask)."""
    from .latent import latent_mask

    if model.inpainting and not latents.has_inpaint_conditioning:
        raise NodeError("this is an inpainting checkpoint (9-channel UNet): make the latent with "
                        "InpaintModelConditioning (vae, image, mask), or use InpaintModelConditioning -> Sampler")
    if latents.empty:
        raise NodeError("LatentBlendSampler needs the latents of an image to keep (VAEEncode or a previous sampler), "
                        "not an EmptyLatent")
    run = prepare(model, positive, negative, latents, seed=seed, steps=steps, guidance_scale=guidance_scale,
                  scheduler=scheduler, strength=strength, partial=True, draws=INPAINT, denoising_start=denoising_start,
                  denoising_end=denoising_end)
    grow = model.kind.latent_space_masking  # Kandinsky 2.2 blends with its grown latent mask
    m = _latent_size_mask(latent_mask(mask, tuple(run.x0.shape[-2:]), latents.vae_scale_factor, grow), run.x0)
    hooks = [LatentBlend(run.scheduler, run.timesteps, run.x0, run.noise, m)]
    if model.inpainting:
        hooks.insert(0, _channel_concat(run, latents, model, guidance_scale))
    return run.denoise(_inpaint_start(run, strength), hooks, progress)


def change_map_to_latent(change: torch.Tensor, latent_size: tuple[int, int]) -> torch.Tensor:
    """A soft change map (1 = change) averaged over each latent pixel's 8x8 footprint (area resize)."""
    import torch.nn.functional as F

    if change.ndim != 4 or change.shape[1] != 1:
        raise NodeError(f"change_map must be a MASK (B, 1, H, W), got shape {tuple(change.shape)}")
    return F.interpolate(change.float().clamp(0, 1), size=tuple(latent_size), mode="area")


def differential(model, positive, negative, latents, change: torch.Tensor, *, seed: int, steps: int,
                 guidance_scale: float, scheduler: str, strength: float, denoising_end: float = 1.0,
                 progress: Optional[Progress] = None) -> torch.Tensor:
    """Differential diffusion with a soft change map (1 = change fully, 0 = keep).

    ``denoising_end`` stops early for a hand-off; the thresholds i/N keep N = the uncut number of steps."""
    if model.inpainting:
        raise NodeError("DifferentialSampler needs a normal (4-channel) checkpoint; this is an inpainting checkpoint "
                        "(9-channel UNet)")
    if latents.empty:
        raise NodeError("DifferentialSampler needs the latents of an image (VAEEncode), not an EmptyLatent")
    # the community differential img2img pipeline prepares its latents as StableDiffusionXLImg2ImgPipeline
    run = prepare(model, positive, negative, latents, seed=seed, steps=steps, guidance_scale=guidance_scale,
                  scheduler=scheduler, strength=strength, partial=True, draws=IMG2IMG, denoising_end=denoising_end)
    keep = 1.0 - change_map_to_latent(change, tuple(run.x0.shape[-2:]))  # the article's map: white = keep
    keep = _latent_size_mask(keep, run.x0)
    hook = DifferentialThreshold(run.scheduler, run.timesteps, run.x0, run.noise, keep, run.total)
    return run.denoise(run.start_from_image(), [hook], progress)
