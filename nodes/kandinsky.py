"""Kandinsky 2.2: LoadKandinsky (prior + decoder) and KandinskyPrior (text and images -> image embeddings).

Kandinsky 2.2 is two models. The prior (a PriorTransformer with a CLIP text encoder and a CLIP image
encoder) turns a prompt, or images, into a CLIP image embedding; the decoder (a UNet conditioned on that
embedding through ``added_cond_kwargs["image_embeds"]``, with no cross-attention on text) denoises MoVQ
latents, which MoVQ (a VQ autoencoder) turns into pixels. Here the prior makes CONDITIONING values, the
decoder is a MODEL that the ordinary samplers run (its family object, ``_families.KANDINSKY22``, tells them
how to pass the embeddings, that the UNet also predicts its variance, and how its inpainting UNet takes the
mask), and MoVQ is a VAE for VAEEncode / VAEDecode / InpaintModelConditioning. MoVQ latents are not scaled.

KandinskyPrior runs diffusers' own ``KandinskyV22PriorPipeline`` (``__call__`` for a prompt, ``interpolate``
for images mixed with a prompt) on the loaded modules, with a fresh scheduler per run and one CPU
``torch.Generator(seed)`` for all of the pipeline's draws, so its embeddings are the pipeline's for that seed.

A Kandinsky latent is in the MoVQ latent space: linked into a Stable Diffusion sampler or VAE (or the
reverse) it is a validation error (``SpaceRule``), since the two only look alike.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

from pydantic import Field

from nodegraph import node
from nodegraph.context import RunContext
from nodegraph.devices import resolve_dtype
from nodegraph.errors import NodeError
from nodegraph.lazy import lazy
from nodegraph.sockets import CONDITIONING, MODEL, VAE, Image, InputPath, SpaceRule, socket

from ._detection import _cached_snapshot, looks_like_hub_id
from ._families import KANDINSKY22
from ._files import files_identity, weights_folder_problem
from ._handles import ModelHandle, VaeHandle
from ._loading import LoadedOnce
from ._memory import MANAGER, compute_device, on_device
from ._params import Guidance, Seed, Steps

torch = lazy("torch")
log = logging.getLogger("nodegraph.models")

KANDINSKY_PRIOR = "KANDINSKY_PRIOR"
KandinskyPrior = socket(KANDINSKY_PRIOR)
SPACE = KANDINSKY22.space

PRIOR_HUB_ID = "kandinsky-community/kandinsky-2-2-prior"
DECODER_HUB_ID = "kandinsky-community/kandinsky-2-2-decoder"
PRIOR_PARTS = ("prior", "text_encoder", "tokenizer", "image_processor", "scheduler")
DECODER_PARTS = ("unet", "movq", "scheduler")

_LOADED = LoadedOnce()


# ---------------------------------------------------------------------------------------------- folders

def resolve_folder(value: str, what: str) -> Path:
    """A local diffusers folder, or a hub id's snapshot in the local Hugging Face cache (nothing is fetched)."""
    local = Path(value).expanduser()
    if local.exists():
        return local
    if looks_like_hub_id(value):
        snapshot = _cached_snapshot(value)
        if snapshot is not None:
            return snapshot
        raise NodeError(f"the {what} '{value}' is not in the local Hugging Face cache and is not fetched: get it with "
                        f"`huggingface-cli download {value}` on a machine with network, or give a local folder")
    raise NodeError(f"no such {what} folder '{value}' (nor a hub id 'owner/name')")


def folder_problem(folder: Path, what: str) -> str | None:
    """Why ``folder`` is not a Kandinsky 2.2 prior (``what`` "prior") or decoder folder (None: it looks fine)."""
    if not folder.is_dir():
        return f"the {what} '{folder}' is not a folder: give a diffusers folder with " + \
            ", ".join(f"{p}/" for p in (PRIOR_PARTS if what == "prior" else DECODER_PARTS))
    if what == "prior":
        missing = [p for p in PRIOR_PARTS if not (folder / p).is_dir()]
        if not missing and not (folder / "image_encoder").is_dir():
            return (f"the prior folder '{folder}' has no image_encoder/: KandinskyPrior needs the CLIP image encoder "
                    f"for its default negative (a blank image's embedding) and for image prompts; use the full "
                    f"{PRIOR_HUB_ID} folder")
        modules = ("prior", "text_encoder", "image_encoder")
    else:
        missing = [p for p in DECODER_PARTS if not (folder / p).is_dir()]
        modules = ("unet", "movq")
    if missing:
        hint = " (this looks like a decoder folder)" if what == "prior" and (folder / "unet").is_dir() else \
            " (this looks like a prior folder)" if what == "decoder" and (folder / "prior").is_dir() else ""
        return f"the {what} folder '{folder}' has no {', '.join(m + '/' for m in missing)}{hint}"
    for name in modules:
        problem = weights_folder_problem(folder / name, f"{what} {name}", "save them with safe_serialization=True")
        if problem:
            return problem
    return None


def _implied_snapshot(value: str) -> list[str]:
    """A hub id's local snapshot: its content goes into the cache key."""
    if not Path(value).exists() and looks_like_hub_id(value):
        snapshot = _cached_snapshot(value)
        return [str(snapshot)] if snapshot is not None else []
    return []


# ---------------------------------------------------------------------------------------------- loading

@dataclass(eq=False)
class PriorHandle:
    """KANDINSKY_PRIOR: the prior transformer, its CLIP text and image encoders and its scheduler config."""

    prior: Any
    text_encoder: Any
    tokenizer: Any
    image_encoder: Any
    image_processor: Any
    scheduler_config: dict
    source: str

    def modules(self) -> list[tuple[str, Any]]:
        return [("prior", self.prior), ("prior_text_encoder", self.text_encoder),
                ("prior_image_encoder", self.image_encoder)]

    def pipeline(self):
        """diffusers' prior pipeline on these modules with a fresh scheduler (it keeps per-run state)."""
        from diffusers import KandinskyV22PriorPipeline, UnCLIPScheduler

        pipe = KandinskyV22PriorPipeline(prior=self.prior, image_encoder=self.image_encoder,
                                         text_encoder=self.text_encoder, tokenizer=self.tokenizer,
                                         scheduler=UnCLIPScheduler.from_config(self.scheduler_config),
                                         image_processor=self.image_processor)
        pipe.set_progress_bar_config(disable=True)
        return pipe


def load_prior(folder: Path, source: str, dtype=None, device="cpu") -> PriorHandle:
    """The prior folder's modules, loaded once per content, dtype and device."""
    dtype = resolve_dtype(dtype)
    device = torch.device(device)

    def load() -> PriorHandle:
        from diffusers import PriorTransformer
        from transformers import CLIPImageProcessor, CLIPTextModelWithProjection, CLIPVisionModelWithProjection

        from ._detection import _read_json
        from ._shipped_configs import load_clip_tokenizer

        common = dict(torch_dtype=dtype, use_safetensors=True, local_files_only=True)
        modules = [PriorTransformer.from_pretrained(str(folder), subfolder="prior", **common),
                   CLIPTextModelWithProjection.from_pretrained(str(folder), subfolder="text_encoder", **common),
                   CLIPVisionModelWithProjection.from_pretrained(str(folder), subfolder="image_encoder", **common)]
        for module in modules:
            module.to("cpu" if MANAGER.offloads else device).eval().requires_grad_(False)
        processor = CLIPImageProcessor.from_pretrained(str(folder), subfolder="image_processor", local_files_only=True)
        config = _read_json(folder / "scheduler" / "scheduler_config.json")
        return PriorHandle(modules[0], modules[1], load_clip_tokenizer(folder, "tokenizer"), modules[2], processor,
                           config, source)

    identity = files_identity([folder])
    return _LOADED.get((str(folder.resolve()), str(dtype), str(device), "prior"), identity, load)


def load_decoder(folder: Path, source: str, dtype=None, device="cpu") -> tuple[ModelHandle, VaeHandle]:
    """The decoder folder's UNet (a MODEL) and MoVQ (a VAE), loaded once per content, dtype and device."""
    dtype = resolve_dtype(dtype)
    device = torch.device(device)

    def load() -> tuple[ModelHandle, VaeHandle]:
        from diffusers import UNet2DConditionModel, VQModel

        from ._detection import _read_json

        common = dict(torch_dtype=dtype, use_safetensors=True, local_files_only=True)
        unet = UNet2DConditionModel.from_pretrained(str(folder), subfolder="unet", **common)
        movq = VQModel.from_pretrained(str(folder), subfolder="movq", **common)
        for module in (unet, movq):
            module.to("cpu" if MANAGER.offloads else device).eval().requires_grad_(False)
        if getattr(unet.config, "addition_embed_type", None) != "image":
            raise NodeError(f"the decoder '{source}' has a UNet that is not conditioned on image embeddings "
                            "(addition_embed_type is not 'image'); it is not a Kandinsky 2.2 decoder")
        vae = VaeHandle(movq, KANDINSKY22.name, source)
        model = ModelHandle(unet, _read_json(folder / "scheduler" / "scheduler_config.json"), KANDINSKY22.name,
                            source, vae.scale_factor)
        return model, vae

    identity = files_identity([folder])
    return _LOADED.get((str(folder.resolve()), str(dtype), str(device), "decoder"), identity, load)


# ---------------------------------------------------------------------------------------------- the prior

def _pil(image: torch.Tensor):
    """One IMAGE (3, H, W) in [0, 1] as the PIL image the prior pipeline's image processor expects."""
    from PIL import Image as PILImage

    array = (image.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype("uint8")
    return PILImage.fromarray(array)


def prior_embeddings(prior: PriorHandle, prompt: str, negative_prompt: Optional[str], image: Optional[torch.Tensor],
                     image_weight: float, seed: int, steps: int, guidance_scale: float):
    """(image_embeds, negative_image_embeds) from diffusers' KandinskyV22PriorPipeline with a CPU generator(seed).

    Without images: ``pipe(prompt, negative_prompt=...)``; None gives the pipeline's default negative, a blank
    image's embedding. With images: ``pipe.interpolate`` of the prompt (weight 1 - image_weight; left out at 0) and
    each image of the batch (image_weight shared equally), the negative then being the prior's embedding of
    ``negative_prompt`` (a blank image's for None or "")."""
    pipe = prior.pipeline()
    generator = torch.Generator("cpu").manual_seed(seed)
    with torch.inference_mode():
        if image is None:
            out = pipe(prompt, negative_prompt=negative_prompt, num_inference_steps=steps, generator=generator,
                       guidance_scale=guidance_scale, output_type="pt")
        else:
            items, weights = [], []
            if image_weight < 1:
                items.append(prompt)
                weights.append(1.0 - image_weight)
            if image_weight > 0:
                items.extend(_pil(picture) for picture in image)
                weights.extend([image_weight / image.shape[0]] * image.shape[0])
            out = pipe.interpolate(items, weights, num_inference_steps=steps, generator=generator,
                                   negative_prompt=negative_prompt or "", guidance_scale=guidance_scale,
                                   device=compute_device(prior.prior))
    return out.image_embeds.float().clone(), out.negative_image_embeds.float().clone()


# ---------------------------------------------------------------------------------------------- nodes

def _check_load(params: dict):
    for name in ("prior", "decoder"):
        value = params.get(name)
        if not isinstance(value, str):
            continue
        try:
            folder = resolve_folder(value, name)
        except NodeError as exc:
            yield name, str(exc)
            continue
        problem = folder_problem(folder, name)
        if problem:
            yield name, problem


def _folder_param(what: str, default_id: str, extra: str = ""):
    return Annotated[str, InputPath(kind="any", must_exist=False, folder="diffusers", remote=looks_like_hub_id,
                                    implies=_implied_snapshot),
                     Field(description=f"the {what}: a name in the models folders' diffusers/, a diffusers folder, or a "
                                       f"hub id in the local Hugging Face cache (default {default_id}){extra}")]


@node("LoadKandinsky", version=1, category="loaders", outputs={"prior": KANDINSKY_PRIOR, "model": MODEL, "vae": VAE},
      check=_check_load, space=SpaceRule(("prior", "model", "vae"), SPACE),
      reference="diffusers KandinskyV22PriorPipeline / KandinskyV22Pipeline / KandinskyV22InpaintPipeline "
                "from_pretrained")
def load_kandinsky_node(
    ctx: RunContext,
    prior: _folder_param("prior (prior/, text_encoder/, tokenizer/, image_encoder/, image_processor/, scheduler/)",
                         PRIOR_HUB_ID) = PRIOR_HUB_ID,
    decoder: _folder_param("decoder (unet/, movq/, scheduler/)", DECODER_HUB_ID,
                           "; kandinsky-community/kandinsky-2-2-decoder-inpaint for inpainting") = DECODER_HUB_ID,
    dtype: Annotated[Literal["auto", "float32", "float16", "bfloat16"],
                     Field(description="weights' dtype; auto follows the run's --dtype")] = "auto",
):
    """Load Kandinsky 2.2: the prior (for KandinskyPrior), the decoder UNet (model) and MoVQ (vae).

    Folders in diffusers' layout (kandinsky-community/kandinsky-2-2-prior and -decoder or -decoder-inpaint), a name
    in the models folders' diffusers/, or hub ids found in the local Hugging Face cache (nothing is downloaded).
    The model goes into the usual samplers with the prior's conditioning: Sampler for text2img from an
    EmptyLatent, LatentBlendSampler with an inpainting decoder and a latent from InpaintModelConditioning (this
    vae) for inpainting, as KandinskyV22InpaintPipeline does. Its latents are MoVQ's: decode them with this vae;
    linking them into a Stable Diffusion model or VAE is a validation error. A prior without its image encoder
    is refused at validation."""
    torch_dtype = resolve_dtype(dtype, auto=ctx.dtype)
    prior_dir, decoder_dir = resolve_folder(prior, "prior"), resolve_folder(decoder, "decoder")
    for folder, what in ((prior_dir, "prior"), (decoder_dir, "decoder")):
        problem = folder_problem(folder, what)
        if problem:
            raise NodeError(problem)
    prior_handle = load_prior(prior_dir, prior, torch_dtype, ctx.device)
    model, vae = load_decoder(decoder_dir, decoder, torch_dtype, ctx.device)
    ctx.record("models", {"source": f"{prior} + {decoder}", "family": KANDINSKY22.name, "kind": model.label,
                          "inpainting": model.inpainting, "dtype": str(torch_dtype).removeprefix("torch.")})
    log.info("LoadKandinsky: %s", model.describe())
    return {"prior": prior_handle, "model": model, "vae": vae}


@node("KandinskyPrior", version=1, category="conditioning",
      outputs={"positive": CONDITIONING, "negative": CONDITIONING}, space=SpaceRule(("positive", "negative"), SPACE),
      reference="diffusers KandinskyV22PriorPipeline (__call__; interpolate with images)")
def kandinsky_prior_node(
    prior: KandinskyPrior,
    ctx: RunContext,
    image: Optional[Image] = None,
    prompt: Annotated[str, Field(description="what to show")] = "",
    negative_prompt: Annotated[Optional[str], Field(description="what to avoid; unset: the embedding of a blank "
                                                                "image, the pipeline's default")] = None,
    image_weight: Annotated[float, Field(ge=0.0, le=1.0, description="with an image linked: its share of the mix "
                                                                     "(1: the image alone, 0: the prompt alone)")] = 1.0,
    seed: Seed = 0,
    steps: Annotated[Steps, Field(description="the prior's denoising steps")] = 25,
    guidance_scale: Annotated[Guidance, Field(description="the prior's classifier-free guidance")] = 4.0,
):
    """Kandinsky 2.2 image embeddings from a prompt, or from images mixed with a prompt: positive and negative.

    Runs diffusers' KandinskyV22PriorPipeline on the loaded prior with torch.Generator("cpu").manual_seed(seed)
    for all its draws. With no image linked: the prompt's embedding, and as negative the embedding of
    negative_prompt (the prior run on both) or, unset, of a blank image. With an image (a batch: each image
    gets an equal share) the pipeline's interpolate mixes image_weight of the images' CLIP embeddings with
    1 - image_weight of the prompt's; the negative is then negative_prompt's embedding (a blank image's when
    unset). Link positive and negative into a sampler with a Kandinsky model; the positive also carries the
    negative, so a sampler with no negative linked uses it."""
    from .conditioning import PromptEmbeds

    with on_device(ctx, *prior.modules()):
        positive, negative = prior_embeddings(prior, prompt, negative_prompt, image, image_weight, seed, steps,
                                              guidance_scale)
    neg = PromptEmbeds(negative, family=KANDINSKY22.name, text=negative_prompt or "")
    return {"positive": PromptEmbeds(positive, family=KANDINSKY22.name, text=prompt, uncond=neg), "negative": neg}
